"""Speed of S2AC against TorchRL's SACLoss, at the authors' settings, on this machine.

    python benchmarks/bench_update.py [--quick] [--out results/benchmarks.md]

Prints Markdown tables: the SVGD + Stein-entropy inner loop; the full update
(critic + actor + target update) of S2AC and of SACLoss at the same batch,
measured interleaved, and their ratio; acting rates; peak memory; how update
time scales with m, L and batch. Every figure is the median over repetitions
after warm-up.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
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
    sample_truncated_normal,
)

SHAPES = {"Hopper-v5": (11, 3), "HalfCheetah-v5": (17, 6)}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def interleaved_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median time per call of each function, calls alternating, so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def transitions(batch: int, obs_dim: int, act_dim: int) -> TensorDict:
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
    )


def s2ac_agent(obs_dim, act_dim, m=10, steps=3, compile_acting=False, amortized=False):
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
    )
    loss = S2ACLoss(actor)
    loss.make_value_estimator(gamma=0.99)
    return actor, loss


def sql_agent(obs_dim, act_dim):
    sampler = AmortizedSampler(Bounded(-1.0, 1.0, (act_dim,)), obs_dim)
    loss = SQLLoss(sampler, SoftQCritic(obs_dim, act_dim, num_qvalue_nets=1))
    loss.make_value_estimator(gamma=0.99)
    return sampler, loss


def sac_agent(obs_dim, act_dim):
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
    loss = SACLoss(actor, critic, num_qvalue_nets=2, fixed_alpha=True, alpha_init=0.2)
    loss.make_value_estimator(gamma=0.99)
    return actor, loss


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


def act_fn(actor, obs_dim, num_envs):
    td = TensorDict({"observation": torch.randn(num_envs, obs_dim)}, [num_envs])

    def act():
        with torch.no_grad():
            actor(td.clone())

    return act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions, smaller scaling grid")
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    repeats = 5 if args.quick else 21
    torch.manual_seed(0)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}",
        f"median over {repeats} repetitions after warm-up; command: `python benchmarks/bench_update.py`",
        "",
    ]

    # Inner loop: batch 100, m 10, L 3, d 6, energy = 2x256 ELU MLP.
    energy = MLP(in_features=17 + 6, out_features=1, num_cells=[256, 256], activation_class=nn.ELU)
    obs = torch.randn(100, 1, 17).expand(100, 10, 17)
    loc = torch.zeros(100, 6, requires_grad=True)
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

    # Full update, S2AC vs SAC, interleaved.
    lines += [
        "## Full update (critic + actor + target), batch 100, authors' settings (m = 10, L = 3)",
        "",
        "| task shapes | S2AC ms | S2AC updates/s | SAC ms | SAC updates/s | S2AC / SAC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (obs_dim, act_dim) in SHAPES.items():
        data = transitions(100, obs_dim, act_dim)
        times = interleaved_ms(
            {
                "s2ac": update_fn(s2ac_agent(obs_dim, act_dim)[1], data),
                "sac": update_fn(sac_agent(obs_dim, act_dim)[1], data),
            },
            repeats,
        )
        lines.append(
            f"| {name} ({obs_dim}, {act_dim}) | {times['s2ac']:.1f} | {1000 / times['s2ac']:.1f} | "
            f"{times['sac']:.1f} | {1000 / times['sac']:.0f} | {times['s2ac'] / times['sac']:.1f}x |"
        )

    # The amortized sampler's training cost, and the SQL baseline, on the same data.
    obs_dim, act_dim = SHAPES["Hopper-v5"]
    s2ac_actor, s2ac_loss = s2ac_agent(obs_dim, act_dim)
    amortized_actor, amortized_loss = s2ac_agent(obs_dim, act_dim, amortized=True)
    sql_sampler, sql_loss = sql_agent(obs_dim, act_dim)
    sac_actor, sac_loss = sac_agent(obs_dim, act_dim)
    data = transitions(100, obs_dim, act_dim)
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
    compiled_actor, _ = s2ac_agent(obs_dim, act_dim, compile_acting=True)
    lines += [
        "",
        "## Acting (Hopper-v5 shapes), actions per second",
        "",
        "| policy | selection | 1 env | 8 envs |",
        "| --- | --- | --- | --- |",
    ]
    for label, actor, exploration in (
        ("S2AC", s2ac_actor, ExplorationType.RANDOM),
        ("S2AC", s2ac_actor, ExplorationType.DETERMINISTIC),
        ("S2AC, compile_acting=True", compiled_actor, ExplorationType.RANDOM),
        ("S2AC, compile_acting=True", compiled_actor, ExplorationType.DETERMINISTIC),
        ("S2AC-amortized (one network pass)", amortized_actor, ExplorationType.RANDOM),
        ("SQL (one network pass)", sql_sampler, ExplorationType.RANDOM),
        ("SAC", sac_actor, ExplorationType.RANDOM),
    ):
        with set_exploration_type(exploration):
            rates = [n * 1000 / median_ms(act_fn(actor, obs_dim, n), repeats * 5) for n in (1, 8)]
        selection = {
            ExplorationType.RANDOM: "training (random particle / sample)",
            ExplorationType.DETERMINISTIC: "evaluation (argmax Q)",
        }[exploration]
        lines.append(f"| {label} | {selection} | {rates[0]:.0f} | {rates[1]:.0f} |")

    # Scaling, one factor at a time around (m, L, batch) = (10, 3, 100).
    grid = {"m": (5, 10, 20, 40), "L": (1, 3, 5, 10), "batch": (100, 256, 1024)}
    if args.quick:
        grid = {"m": (5, 10, 20), "L": (1, 3), "batch": (100, 256)}
    lines += [
        "",
        "## Scaling of the S2AC update (Hopper-v5 shapes), one factor varied",
        "",
        "| factor | value | ms / update | relative to default |",
        "| --- | --- | --- | --- |",
    ]

    def update_ms(m, steps, batch):
        data = transitions(batch, obs_dim, act_dim)
        return median_ms(update_fn(s2ac_agent(obs_dim, act_dim, m, steps)[1], data), max(3, repeats // 3))

    base = update_ms(10, 3, 100)
    for factor, values in grid.items():
        for value in values:
            ms = update_ms(
                value if factor == "m" else 10, value if factor == "L" else 3, value if factor == "batch" else 100
            )
            lines.append(f"| {factor} | {value} | {ms:.1f} | {ms / base:.2f}x |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += ["", f"Peak resident memory of the whole benchmark process: {peak_mb:.0f} MB."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
