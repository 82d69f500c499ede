"""Speed of S2AC against TorchRL's SACLoss, at the authors' settings, on this machine.

    python benchmarks/bench_update.py [--quick] [--device cpu|cuda] [--threads N] [--out results/benchmarks.md]

Prints Markdown tables: the SVGD + Stein-entropy inner loop; the full update
(critic + actor + target update) of S2AC and of SACLoss at the same batch,
measured interleaved, and their ratio; where the S2AC update stands against the
hardware (GFLOP per update from ``FlopCounterMode``, the fp32 and bf16 matmul
rates at the update's shapes, the update time as a multiple of the fp32 matmul
floor, graph breaks and compiled vs eager time) and where its time goes (profiler
tables: the eager update's top ops, the compiled update's matrix products against its
fused kernels and overhead); acting rates; how update time and the update's peak memory scale with m,
L and batch. Every time is the median over repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import SACLoss, SoftUpdate

from torchrl_s2ac import (
    AmortizedSampler,
    RBFKernel,
    S2ACLoss,
    SoftQCritic,
    SQLLoss,
    SteinEntropy,
    SVGDActor,
    describe_device,
    sample_truncated_normal,
)

SHAPES = {"Hopper-v5": (11, 3), "HalfCheetah-v5": (17, 6)}


def synchronize() -> None:
    """Wait for queued GPU work (kernels run asynchronously: a time without it measures the launch only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds of one call of ``fn``, its device work included."""
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


class Report(list):
    """Markdown lines, each printed (and appended to ``out``, when given) as it is added: a long run shows its
    tables as they are measured, and a run stopped early (a time limit on a borrowed GPU) keeps what it measured."""

    def __init__(self, out: str | None = None) -> None:
        super().__init__()
        self.out = out
        if out:
            open(out, "w").close()

    def append(self, line: str) -> None:
        super().append(line)
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return 1000 * statistics.median(timed(fn) for _ in range(repeats))


def interleaved_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median time per call of each function, calls alternating, so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def transitions(batch: int, obs_dim: int, act_dim: int, device: torch.device | str = "cpu") -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(batch, obs_dim),
            "action": torch.rand(batch, act_dim) * 2 - 1,
            "next": {
                "observation": torch.randn(batch, obs_dim),
                "reward": torch.randn(batch, 1),
                "done": torch.zeros(batch, 1, dtype=torch.bool),
                "terminated": torch.zeros(batch, 1, dtype=torch.bool),
            },
        },
        [batch],
        device=device,
    )


def s2ac_agent(obs_dim, act_dim, m=10, steps=3, compile_acting=False, amortized=False, device="cpu"):
    critic = SoftQCritic(obs_dim, act_dim)
    spec = Bounded(-1.0, 1.0, (act_dim,))
    actor = SVGDActor(
        spec,
        critic,
        num_particles=m,
        num_steps=steps,
        max_step_ratio=0.5,
        warn_ratio=None,
        compile_acting=compile_acting,
        amortized_sampler=AmortizedSampler(spec, obs_dim) if amortized else None,
        train_selection="amortized" if amortized else "random",
    ).to(device)
    loss = S2ACLoss(actor)
    loss.make_value_estimator(gamma=0.99)
    return actor, loss


def sql_agent(obs_dim, act_dim, device="cpu"):
    sampler = AmortizedSampler(Bounded(-1.0, 1.0, (act_dim,)), obs_dim).to(device)
    loss = SQLLoss(sampler, SoftQCritic(obs_dim, act_dim, num_qvalue_nets=1, device=device))
    loss.make_value_estimator(gamma=0.99)
    return sampler, loss


def sac_agent(obs_dim, act_dim, device="cpu"):
    actor = ProbabilisticActor(
        TensorDictModule(
            nn.Sequential(
                MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=[256, 256], activation_class=nn.ELU),
                NormalParamExtractor(),
            ),
            in_keys=["observation"],
            out_keys=["loc", "scale"],
        ),
        in_keys=["loc", "scale"],
        spec=Bounded(-1.0, 1.0, (act_dim,)),
        distribution_class=TanhNormal,
    )
    critic = ValueOperator(
        MLP(in_features=obs_dim + act_dim, out_features=1, num_cells=[256, 256], activation_class=nn.ELU),
        in_keys=["observation", "action"],
    )
    actor, critic = actor.to(device), critic.to(device)
    loss = SACLoss(actor, critic, num_qvalue_nets=2, fixed_alpha=True, alpha_init=0.2)
    loss.make_value_estimator(gamma=0.99)
    return actor, loss.to(device)


def update_fn(loss, data):
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    updater = SoftUpdate(loss, tau=0.005)

    def update():
        out = loss(data)
        sum(value for key, value in out.items() if key.startswith("loss_")).backward()
        optimizer.step()
        optimizer.zero_grad()
        updater.step()

    return update


def act_fn(actor, obs_dim, num_envs, device="cpu"):
    td = TensorDict({"observation": torch.randn(num_envs, obs_dim)}, [num_envs], device=device)

    def act():
        with torch.no_grad():
            actor(td.clone())

    return act


MATMUL_SHAPE = (1000, 256, 256)  # batch 100 x m 10 particles through a 256-wide hidden layer


def matmul_gflops(dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Measured rate of ``[1000, 256] @ [256, 256]`` in ``dtype``: what this machine's matrix units give the
    update's dominant products."""
    rows, width, cols = MATMUL_SHAPE
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, cols, device=device, dtype=dtype)
    calls = 50

    def products():
        for _ in range(calls):
            a @ b

    return 2 * rows * width * cols * calls / (median_ms(products, repeats) / 1000) / 1e9


class FlopCount(TorchDispatchMode):
    """Floating-point operations of the ops run under it, by :class:`~torch.utils.flop_counter.FlopCounterMode`'s
    per-op formulas (matrix products and convolutions; elementwise work is not counted). ``FlopCounterMode``
    itself also attributes the counts to modules through global module hooks, which fail on TorchRL's
    parameter containers (``TensorDictParams`` refuses the comparison they make)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def update_gflop(update) -> float:
    """GFLOP of one call of ``update`` (an update's forward and backward, or one batch of actions)."""
    with FlopCount() as counter:
        update()
    return counter.total / 1e9


def loss_graph_breaks(loss, data: TensorDict) -> int:
    """Graph breaks :func:`torch._dynamo.explain` finds in the loss and the sum of its ``loss_*`` entries."""

    def forward(td):
        out = loss(td)
        return sum(value for key, value in out.items() if key.startswith("loss_"))

    return torch._dynamo.explain(forward)(data).graph_break_count


def profile_rows(update, device: torch.device, updates: int = 3, rows: int = 12) -> list[str]:
    """Markdown rows of the ops taking the most self time in ``update`` (device time on a GPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(updates):
            update()
        synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in prof.key_averages() if getattr(event, key) > 0]
    total = sum(getattr(event, key) for event in events)
    events.sort(key=lambda event: getattr(event, key), reverse=True)
    return [
        f"| {event.key} | {getattr(event, key) / 1000 / updates:.2f} | {100 * getattr(event, key) / total:.1f}% "
        f"| {event.count // updates} |"
        for event in events[:rows]
    ]


MATMUL_OPS = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")


def compiled_time_rows(loss, data: TensorDict, gflop: float, fp32_gflops: float, updates: int = 5) -> list[str]:
    """Markdown rows splitting a compiled update's wall time: the matrix products (ATen's, called from the graph;
    with their rate against the measured fp32 rate), inductor's fused kernels (elementwise work and reductions),
    the other ATen calls the graph makes, and what is in no kernel (wrappers, autograd, the optimiser's glue).
    CPU only: inductor's per-kernel profiler events exist for its C++ kernels."""
    # Options of its own: another compiler, so dynamo does not reuse a graph compiled earlier without the profiling.
    update = torch.compile(update_fn(loss, data), options={"cpp.enable_kernel_profile": True})
    for _ in range(3):
        update()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(updates):
            update()
        wall_ms = 1000 * (time.perf_counter() - start) / updates
    parts = dict.fromkeys(("matrix products", "inductor's fused kernels", "other ATen calls"), 0.0)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000 / updates
        if event.key in MATMUL_OPS:
            parts["matrix products"] += ms
        elif event.key.startswith("graph_") and "_cpp_fused_" in event.key:
            parts["inductor's fused kernels"] += ms
        elif event.key.startswith("aten::"):
            parts["other ATen calls"] += ms
    parts["in no kernel (wrappers, autograd, optimiser glue)"] = wall_ms - sum(parts.values())
    rate = gflop / parts["matrix products"] * 1000
    notes = {"matrix products": f" ({rate:.0f} GFLOP/s, {100 * rate / fp32_gflops:.0f}% of the measured fp32 rate)"}
    return [
        f"| {name}{notes.get(name, '')} | {ms:.1f} | {100 * ms / wall_ms:.0f}% |"
        for name, ms in [*parts.items(), ("whole update (under the profiler)", wall_ms)]
    ]


def _resident_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, from ``/proc/self/status``."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _first_update_growth_mb(obs_dim: int, act_dim: int, m: int, steps: int, batch: int) -> float:
    """In a fresh process (nothing freed and kept by the allocator yet): how far one S2AC update raises the
    resident memory's high-water mark, reset before it (Linux ``clear_refs``); Adam's state, created at the
    first step, is included."""
    torch.manual_seed(0)
    update = update_fn(s2ac_agent(obs_dim, act_dim, m, steps)[1], transitions(batch, obs_dim, act_dim))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _resident_mb("VmRSS")
    update()
    return _resident_mb("VmHWM") - before


def update_peak_mb(obs_dim: int, act_dim: int, m: int, steps: int, batch: int, device: torch.device) -> float:
    """Peak memory of one S2AC update beyond what the models and the batch hold: ``max_memory_allocated`` on a
    GPU; on the CPU, where the allocator keeps no count, the resident high-water mark's growth in a fresh
    process."""
    if device.type != "cuda":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_first_update_growth_mb, (obs_dim, act_dim, m, steps, batch))
    update = update_fn(
        s2ac_agent(obs_dim, act_dim, m, steps, device=device)[1], transitions(batch, obs_dim, act_dim, device)
    )
    update()  # Adam's state exists from here on
    synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    update()
    synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions, smaller scaling grid")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Every compiled update below is the same closure code (update_fn's), which dynamo counts against one
    # recompile limit; past it, a compiled update silently runs eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch.")
    hardware = describe_device(device)
    repeats = 5 if args.quick else 21
    torch.manual_seed(0)
    lines = Report(args.out)
    lines += [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {hardware}",
        f"median over {repeats} repetitions after warm-up; command: `python benchmarks/bench_update.py"
        f"{' --quick' if args.quick else ''}"
        f"{' --device ' + args.device if device.type != 'cpu' else ''}"
        f"{f' --threads {args.threads}' if args.threads is not None else ''}`",
        "",
    ]

    # Inner loop: batch 100, m 10, L 3, d 6, energy = 2x256 ELU MLP.
    energy = MLP(in_features=17 + 6, out_features=1, num_cells=[256, 256], activation_class=nn.ELU, device=device)
    obs = torch.randn(100, 1, 17, device=device).expand(100, 10, 17)
    loc = torch.zeros(100, 6, requires_grad=True, device=device)
    stein = SteinEntropy(RBFKernel(), 0.1, 3, warn_ratio=None)

    def log_density(u):
        return energy(torch.cat([obs, torch.tanh(u)], -1)).squeeze(-1)

    def inner(backward):
        u0, log_q0 = sample_truncated_normal(loc, torch.ones_like(loc), 10)
        _, log_q = stein(log_density, u0, log_q0)
        if backward:
            log_q.mean().backward()

    with torch.no_grad():
        no_grad = median_ms(lambda: inner(False), repeats)
    lines += [
        "## SVGD + Stein entropy inner loop (batch 100, m = 10, L = 3, d = 6, 2 x 256 MLP energy, autograd score)",
        "",
        "| pass | ms / call |",
        "| --- | --- |",
        f"| forward, no grad (critic target path) | {no_grad:.2f} |",
        f"| forward, create_graph | {median_ms(lambda: inner(False), repeats):.2f} |",
        f"| forward + backward | {median_ms(lambda: inner(True), repeats):.2f} |",
        "",
    ]

    # Full update, S2AC vs SAC, interleaved: eager against eager, and each at its fastest (compiled; S2AC also with
    # the bf16 score path).
    lines += [
        "## Full update (critic + actor + target), batch 100, authors' settings (m = 10, L = 3)",
        "",
        "ms per update, interleaved. S2AC / SAC: eager against eager, and compiled (S2AC's faster compiled variant: "
        "the bf16 score path where the CPU or GPU has bf16 matrix units, fp32 where bf16 is emulated) against "
        "compiled.",
        "",
        "| task shapes | S2AC eager | S2AC compiled | S2AC compiled, bf16 score | SAC eager | SAC compiled | "
        "S2AC / SAC eager | S2AC / SAC compiled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    shape_times = {}
    for name, (obs_dim, act_dim) in SHAPES.items():
        data = transitions(100, obs_dim, act_dim, device)
        mixed_actor, mixed_loss = s2ac_agent(obs_dim, act_dim, device=device)
        mixed_actor.stein.score_dtype = torch.bfloat16
        times = interleaved_ms(
            {
                "s2ac": update_fn(s2ac_agent(obs_dim, act_dim, device=device)[1], data),
                "s2ac compiled": torch.compile(update_fn(s2ac_agent(obs_dim, act_dim, device=device)[1], data)),
                "s2ac bf16": torch.compile(update_fn(mixed_loss, data)),
                "sac": update_fn(sac_agent(obs_dim, act_dim, device=device)[1], data),
                "sac compiled": torch.compile(update_fn(sac_agent(obs_dim, act_dim, device=device)[1], data)),
            },
            repeats,
        )
        shape_times[name] = times
        lines.append(
            f"| {name} ({obs_dim}, {act_dim}) | {times['s2ac']:.1f} | {times['s2ac compiled']:.1f} | "
            f"{times['s2ac bf16']:.1f} | {times['sac']:.1f} | {times['sac compiled']:.1f} | "
            f"{times['s2ac'] / times['sac']:.1f}x | "
            f"{min(times['s2ac compiled'], times['s2ac bf16']) / times['sac compiled']:.1f}x |"
        )

    # Against the hardware: FLOPs, matmul rates, the fp32 floor, compiled vs eager, graph breaks, memory.
    obs_dim, act_dim = SHAPES["Hopper-v5"]
    data = transitions(100, obs_dim, act_dim, device)
    eager_loss, compiled_loss = (s2ac_agent(obs_dim, act_dim, device=device)[1] for _ in range(2))
    mixed_actor, mixed_loss = s2ac_agent(obs_dim, act_dim, device=device)
    mixed_actor.stein.score_dtype = torch.bfloat16  # the SVGD score path in bf16, the rest fp32
    gflop = update_gflop(update_fn(s2ac_agent(obs_dim, act_dim, device=device)[1], data))
    fp32, bf16 = (matmul_gflops(dtype, device, repeats) for dtype in (torch.float32, torch.bfloat16))
    floor_ms = 1000 * gflop / fp32
    sac_gflop = update_gflop(update_fn(sac_agent(obs_dim, act_dim, device=device)[1], data))
    breaks = loss_graph_breaks(eager_loss, data)
    # torch.compile's first calls (the warm-up) compile; the loss is compiled as one graph, backward and the
    # optimiser step as TorchRL's sota scripts compile them.
    times = interleaved_ms(
        {
            "eager": update_fn(eager_loss, data),
            "compiled": torch.compile(update_fn(compiled_loss, data)),
            "compiled, bf16 score": torch.compile(update_fn(mixed_loss, data)),
        },
        repeats,
    )
    peak_mb = update_peak_mb(obs_dim, act_dim, 10, 3, 100, device)
    rows, width, cols = MATMUL_SHAPE
    lines += [
        "",
        "## The S2AC update against the hardware (Hopper-v5 shapes, batch 100, m = 10, L = 3)",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| GFLOP per update (FlopCounterMode's formulas: matrix products, forward + backward) | {gflop:.2f} |",
        f"| fp32 matmul [{rows}, {width}] @ [{width}, {cols}] | {fp32:.0f} GFLOP/s |",
        f"| bf16 matmul, same shapes | {bf16:.0f} GFLOP/s ({bf16 / fp32:.1f}x fp32) |",
        f"| fp32 floor (GFLOP / fp32 rate) | {floor_ms:.1f} ms |",
        f"| SAC's GFLOP per update, same batch | {sac_gflop:.3f} ({gflop / sac_gflop:.0f}x fewer than S2AC) |",
        f"| S2AC's fp32 floor against SAC's compiled update (the S2AC / SAC ratio no fp32 S2AC update "
        f"can beat) | {floor_ms / shape_times['Hopper-v5']['sac compiled']:.1f}x |",
        f"| eager update | {times['eager']:.1f} ms ({times['eager'] / floor_ms:.1f}x the floor) |",
        f"| compiled update (torch.compile) | {times['compiled']:.1f} ms "
        f"({times['compiled'] / floor_ms:.1f}x the floor) |",
        f"| compiled / eager | {times['compiled'] / times['eager']:.2f} |",
        f"| compiled update, SVGD score path in bf16 (`s2ac.score_dtype=bfloat16`) | "
        f"{times['compiled, bf16 score']:.1f} ms ({times['compiled, bf16 score'] / floor_ms:.1f}x the fp32 floor) |",
        f"| graph breaks in the S2AC loss (torch._dynamo.explain) | {breaks} |",
        f"| peak memory of one update (beyond models and batch) | {peak_mb:.1f} MB |",
        "",
        "Where the eager update's time goes (torch.profiler, self time, top ops):",
        "",
        "| op | ms / update | share | calls / update |",
        "| --- | --- | --- | --- |",
        *profile_rows(update_fn(eager_loss, data), device),
    ]
    if device.type == "cpu":
        lines += [
            "",
            "Where the compiled fp32 update's time goes (torch.profiler, self time; inductor's kernel profiling on):",
            "",
            "| part | ms / update | share |",
            "| --- | --- | --- |",
            *compiled_time_rows(s2ac_agent(obs_dim, act_dim, device=device)[1], data, gflop, fp32),
        ]

    # The amortized sampler's training cost, and the SQL baseline, on the same data.
    s2ac_actor, s2ac_loss = s2ac_agent(obs_dim, act_dim, device=device)
    amortized_actor, amortized_loss = s2ac_agent(obs_dim, act_dim, amortized=True, device=device)
    sql_sampler, sql_loss = sql_agent(obs_dim, act_dim, device=device)
    sac_actor, sac_loss = sac_agent(obs_dim, act_dim, device=device)
    variants = {
        "S2AC": s2ac_loss,
        "S2AC + amortized sampler": amortized_loss,
        "SQL (K = 16, M = 16, one Q)": sql_loss,
        "SAC": sac_loss,
    }
    times = interleaved_ms({name: update_fn(loss, data) for name, loss in variants.items()}, repeats)
    lines += [
        "",
        "## Update cost of the variants (Hopper-v5 shapes, batch 100, interleaved)",
        "",
        "| loss | ms / update | updates/s |",
        "| --- | --- | --- |",
        *(f"| {name} | {ms:.1f} | {1000 / ms:.0f} |" for name, ms in times.items()),
    ]

    # Acting.
    compiled_actor, _ = s2ac_agent(obs_dim, act_dim, compile_acting=True, device=device)
    compiled_bf16_actor, _ = s2ac_agent(obs_dim, act_dim, compile_acting=True, device=device)
    compiled_bf16_actor.stein.score_dtype = torch.bfloat16  # what s2ac.score_dtype=bfloat16 acts with
    lines += [
        "",
        "## Acting (Hopper-v5 shapes), actions per second",
        "",
        "| policy | selection | 1 env | 8 envs | MFLOP per action (matrix products) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, actor, exploration in (
        ("S2AC", s2ac_actor, ExplorationType.RANDOM),
        ("S2AC", s2ac_actor, ExplorationType.DETERMINISTIC),
        ("S2AC, compile_acting=True", compiled_actor, ExplorationType.RANDOM),
        ("S2AC, compile_acting=True", compiled_actor, ExplorationType.DETERMINISTIC),
        ("S2AC, compile_acting=True, bf16 score", compiled_bf16_actor, ExplorationType.RANDOM),
        ("S2AC, compile_acting=True, bf16 score", compiled_bf16_actor, ExplorationType.DETERMINISTIC),
        ("S2AC-amortized (one network pass)", amortized_actor, ExplorationType.RANDOM),
        ("SQL (one network pass)", sql_sampler, ExplorationType.RANDOM),
        ("SAC", sac_actor, ExplorationType.RANDOM),
    ):
        with set_exploration_type(exploration):
            rates = [n * 1000 / median_ms(act_fn(actor, obs_dim, n, device), repeats * 5) for n in (1, 8)]
            # Counted eagerly (a dispatch mode stops dynamo from compiling, and fused kernels hide products);
            # compiled acting does the same products.
            counted = s2ac_actor if any(actor is c for c in (compiled_actor, compiled_bf16_actor)) else actor
            mflop = 1000 * update_gflop(act_fn(counted, obs_dim, 8, device)) / 8
        selection = {
            ExplorationType.RANDOM: "training (random particle / sample)",
            ExplorationType.DETERMINISTIC: "evaluation (argmax Q)",
        }[exploration]
        lines.append(f"| {label} | {selection} | {rates[0]:.0f} | {rates[1]:.0f} | {mflop:.2f} |")

    # Scaling, one factor at a time around (m, L, batch) = (10, 3, 100).
    grid = {"m": (5, 10, 20, 40), "L": (1, 3, 5, 10), "batch": (100, 256, 1024)}
    if args.quick:
        grid = {"m": (5, 10, 20), "L": (1, 3), "batch": (100, 256)}
    lines += [
        "",
        "## Scaling of the S2AC update (Hopper-v5 shapes), one factor varied",
        "",
        "| factor | value | ms / update | relative to default | peak memory of one update (MB) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def update_ms(m, steps, batch):
        update = update_fn(
            s2ac_agent(obs_dim, act_dim, m, steps, device=device)[1], transitions(batch, obs_dim, act_dim, device)
        )
        return median_ms(update, max(3, repeats // 3))

    base = update_ms(10, 3, 100)
    for factor, values in grid.items():
        for value in values:
            setting = (
                value if factor == "m" else 10,
                value if factor == "L" else 3,
                value if factor == "batch" else 100,
            )
            ms = update_ms(*setting)
            peak = update_peak_mb(obs_dim, act_dim, *setting, device)
            lines.append(f"| {factor} | {value} | {ms:.1f} | {ms / base:.2f}x | {peak:.1f} |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += [
        "",
        "Peak memory of one update: `torch.cuda.max_memory_allocated` on a GPU; on the CPU, how far a fresh "
        "process's first update raises its resident high-water mark (Adam's state included).",
        f"Peak resident memory of the whole benchmark process: {peak_mb:.0f} MB.",
    ]


if __name__ == "__main__":
    main()
