"""One-command GPU check: S2AC's sampler, update and acting on CUDA agree with the CPU.

    python benchmarks/gpu_check.py [--updates 20] [--device cuda:0] [--checks parity acting update training]

Without a visible GPU it prints "no GPU: skipped" and exits with status 0. With one it checks, from the
same weights:

1. the SVGD sampler (particles and closed-form log-density, from the same initial particles) and the
   critic's closed-form action gradient match the CPU to float tolerance;
2. every parameter and buffer is on the device, and sampling makes no host synchronisation
   (``torch.cuda.set_sync_debug_mode``, with the once-per-call finite check and warning turned off);
3. the S2AC loss outputs and every gradient match the CPU for the same batch (the initial particles are
   drawn on the CPU for both, so the two runs see the same randomness); then a few timed updates;
4. acting through a TorchRL ``Collector`` with the policy on the device (the env cast there, or on the CPU as
   the scripts run it), and a weight sync;
5. the scripts' update (``harness.make_update``) eager, compiled (``compile.compile``), captured in a CUDA graph
   (``compile.cudagraphs``) and both gives finite losses, with its time per update;
6. ``s2ac.py`` (compiled update in a CUDA graph) and ``sql.py`` train and evaluate a few hundred Hopper frames
   with ``network.device`` on the GPU (skipped without mujoco).

It prints one line per check and the time per update on each device; it exits with status 1 if a check fails.
``--checks`` runs a subset (parity: 1-3, acting: 4, update: 5, training: 6), to spend a borrowed GPU's minutes on
what is still unverified.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
from omegaconf import OmegaConf
from tensordict import TensorDict  # noqa: E402
from torchrl.collectors import Collector  # noqa: E402
from torchrl.data import Bounded  # noqa: E402
from torchrl.envs import InitTracker, TransformedEnv  # noqa: E402
from torchrl.objectives import SoftUpdate, group_optimizers  # noqa: E402

from torchrl_s2ac import S2ACLoss, SoftQCritic, SVGDActor, sample_truncated_normal  # noqa: E402
from torchrl_s2ac.envs import MultiGoalEnv  # noqa: E402

OBS, ACT, BATCH = 17, 6, 100  # HalfCheetah shapes, the authors' batch


def build(device: torch.device) -> S2ACLoss:
    torch.manual_seed(0)
    spec = Bounded(-torch.ones(ACT), torch.ones(ACT), (ACT,))
    actor = SVGDActor(spec, SoftQCritic(OBS, ACT), max_step_ratio=0.5, warn_ratio=None).to(device)
    return S2ACLoss(actor, fixed_alpha=False).make_value_estimator(gamma=0.99)


def batch(generator: torch.Generator) -> TensorDict:
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return TensorDict(
        {
            "observation": randn(BATCH, OBS),
            "action": torch.rand(BATCH, ACT, generator=generator) * 2 - 1,
            "next": {
                "observation": randn(BATCH, OBS),
                "reward": randn(BATCH, 1),
                "done": torch.zeros(BATCH, 1, dtype=torch.bool),
                "terminated": torch.zeros(BATCH, 1, dtype=torch.bool),
            },
        },
        [BATCH],
    )


def report(name: str, ok: bool, detail: str = "") -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
    return ok


def sampler_parity(cpu: S2ACLoss, gpu: S2ACLoss, device: torch.device) -> bool:
    observation = torch.randn(BATCH, OBS)
    particles = torch.randn(BATCH, 10, ACT)
    log_q0 = torch.zeros(BATCH, 10)
    results = []
    for loss, dev in ((cpu, torch.device("cpu")), (gpu, device)):
        actor = loss.actor_network
        obs = observation.to(dev).unsqueeze(-2)
        q, grad = actor.critic.values_and_action_grad(obs, actor.squash(particles.to(dev)))
        out = actor.stein.sample(
            lambda u, actor=actor, obs=obs: actor.critic.min_values(obs, actor.squash(u)) / actor.alpha,
            particles.to(dev),
            log_q0.to(dev),
        )
        results.append([t.cpu() for t in (q, grad, out.particles, out.log_prob)])
    close = all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(*results))
    worst = max((a - b).abs().max().item() for a, b in zip(*results))
    return report("sampler and critic gradient match the CPU", close, f"largest difference {worst:.2e}")


def update(loss: S2ACLoss, optimizer: torch.optim.Optimizer, data: TensorDict) -> TensorDict:
    out = loss(data)
    sum(value for key, value in out.items() if key.startswith("loss_")).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.detach()


def timed_updates(loss: S2ACLoss, device: torch.device, updates: int) -> tuple[float, list[TensorDict]]:
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    data = [batch(generator).to(device) for _ in range(updates)]
    outs = [update(loss, optimizer, data[0])]  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outs += [update(loss, optimizer, d) for d in data[1:]]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / max(1, updates - 1), outs


def placement_and_syncs(gpu: S2ACLoss, device: torch.device) -> bool:
    tensors = {**gpu.state_dict(), **{f"actor.{k}": v for k, v in gpu.actor_network.state_dict().items()}}
    stray = [name for name, tensor in tensors.items() if tensor.device.type != device.type]
    ok = report("every parameter and buffer is on the device", not stray, ", ".join(stray[:5]))
    stein = gpu.actor_network.stein
    stein.check_finite, stein.warn_ratio = False, None
    observation = torch.randn(BATCH, OBS, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gpu.actor_network.sample_particles(observation)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stein.check_finite, stein.warn_ratio = True, 1.0
    # Each synchronising op warns "called a synchronizing CUDA operation"; the mode's own notice does not count.
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    return report("no host synchronisation while sampling", not syncs, "; ".join(syncs[:3])) and ok


def draws_from_the_cpu(loc, scale, num_samples, bound=3.0):
    """``sample_truncated_normal`` with the standard draws taken from the CPU generator, on any device."""
    zeros = torch.zeros(loc.shape, dtype=loc.dtype)
    z, log_q_standard = sample_truncated_normal(zeros, torch.ones_like(zeros), num_samples, bound)
    z, log_q_standard = z.to(loc.device), log_q_standard.to(loc.device)
    return loc.unsqueeze(-2) + scale.unsqueeze(-2) * z, log_q_standard - scale.log().sum(-1, keepdim=True)


def loss_parity(cpu: S2ACLoss, gpu: S2ACLoss, device: torch.device) -> bool:
    data = batch(torch.Generator().manual_seed(2))
    results = []
    with mock.patch("torchrl_s2ac.modules.actor.sample_truncated_normal", draws_from_the_cpu):
        for loss, dev in ((cpu, torch.device("cpu")), (gpu, device)):
            torch.manual_seed(3)
            out = loss(data.to(dev))
            sum(value for key, value in out.items() if key.startswith("loss_")).backward()
            grads = [p.grad.cpu() for p in loss.parameters()]
            loss.zero_grad(set_to_none=True)
            results.append([*(v.detach().cpu() for v in out.values()), *grads])
    worst = max(((a - b).abs().max() / (1 + a.abs().max())).item() for a, b in zip(*results))
    return report(
        "S2AC loss outputs and gradients match the CPU", worst < 1e-3, f"largest relative difference {worst:.2e}"
    )


def acting(device: torch.device) -> bool:
    """A Collector acting with the policy on the device: the env cast there too (``device=``), and the env on the
    CPU with the policy on the device (as the scripts collect)."""
    ok = True
    for name, devices in (
        ("env on the device", {"device": device}),
        ("env on the CPU", {"env_device": "cpu", "policy_device": device, "storing_device": device}),
    ):
        env = TransformedEnv(MultiGoalEnv(max_steps=10, device="cpu"), InitTracker())
        critic = SoftQCritic(2, 2, num_cells=(32,))
        policy = SVGDActor(env.action_spec, critic, num_particles=8, num_cells=(32,), warn_ratio=None).to(device)
        collector = Collector(env, policy, frames_per_batch=20, total_frames=40, **devices)
        try:
            shapes = []
            for data in collector:
                shapes.append(tuple(data["action"].shape))
                collector.update_policy_weights_()
        finally:
            collector.shutdown()
        name = f"acting in a Collector, policy on the device and {name}, with weight syncs"
        ok = report(name, shapes == [(20, 2), (20, 2)], str(shapes)) and ok
    return ok


def scripts_update(device: torch.device, updates: int) -> bool:
    """The scripts' update (``harness.make_update``: loss, backward, Adam, target update), eager, compiled
    (``compile.compile=true``), captured (``compile.cudagraphs=true``) and both, with its time per update."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sota-implementations"))
    import harness

    ok = True
    for compiled, cudagraphs in ((False, False), (True, False), (False, True), (True, True)):
        # Fresh batches per variant: the loss writes its td_error into the batch, and a CUDA graph's outputs are
        # overwritten by its next replay.
        data = [batch(torch.Generator().manual_seed(4)).to(device) for _ in range(updates)]
        optim = {"lr_actor": 1e-4, "lr_critic": 1e-4, "lr_alpha": 1e-4, "max_grad_norm": None}
        cfg = OmegaConf.create(
            {"optim": optim, "compile": {"compile": compiled, "compile_mode": None, "cudagraphs": cudagraphs}}
        )
        loss = build(device)
        agent = harness.Agent(loss=loss, policy=loss.actor_network, optimizers=harness.make_optimizers(cfg, loss))
        optimizer = group_optimizers(*agent.optimizers.values())
        update = harness.make_update(cfg, agent, optimizer, SoftUpdate(loss, eps=0.995))
        outs = [update(d) for d in data[: updates // 2]]  # warm-up: compilation, graph capture
        if not (compiled or cudagraphs):  # the eager update runs the sampler's checks: off, as when compiled
            loss.actor_network.stein.check_finite, loss.actor_network.stein.warn_ratio = False, None
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        outs += [update(d) for d in data[updates // 2 :]]
        torch.cuda.synchronize(device)
        per_update = (time.perf_counter() - start) / max(1, updates - updates // 2)
        finite = all(torch.isfinite(v).all() for out in outs for v in out.values())
        name = f"scripts' update, compile={compiled}, cudagraphs={cudagraphs}"
        ok = report(f"{name}: finite losses", finite, f"{1000 * per_update:.1f} ms per update") and ok
    return ok


def scripts_training(device: torch.device) -> bool:
    """A few hundred frames of ``s2ac.py`` (compiled update in a CUDA graph) and ``sql.py`` with the networks on
    the device: gymnasium envs step on the CPU, the collector and the evaluation move data across."""
    import subprocess
    import tempfile

    if importlib.util.find_spec("mujoco") is None:
        return report("training scripts on the device", True, "skipped: mujoco is not installed")
    scripts = Path(__file__).resolve().parents[1] / "sota-implementations"
    tiny = [
        "env=hopper", "env.max_episode_steps=50", "collector.frames_per_batch=50", "collector.total_frames=400",
        "collector.init_random_frames=100", "collector.learning_starts=100", "logger.backend=null",
        "logger.eval_every_frames=200", "logger.eval_episodes=2", f"network.device={device}",
    ]  # fmt: skip
    ok = True
    for script, extra in (("s2ac", ["compile.compile=true", "compile.cudagraphs=true"]), ("sql", [])):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            command = [sys.executable, str(scripts / f"{script}.py"), f"hydra.run.dir={out}", *tiny, *extra]
            try:  # a hang must not use up a borrowed GPU's time
                result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                report(f"{script}.py trains and evaluates", False, "no end within 300 s")
                ok = False
                continue
            seconds = time.perf_counter() - start
            metrics = Path(out, "metrics.jsonl")
            evaluations = metrics.read_text().count('"eval/return"') if metrics.is_file() else 0
            errors = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            detail = errors[-1] if result.returncode else f"{evaluations} evaluations, {seconds:.0f} s"
            name = f"{script}.py trains and evaluates ({' '.join(extra) or 'eager update'})"
            ok = report(name, evaluations > 1, detail) and ok
    return ok


CHECKS = ("parity", "acting", "update", "training")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return 0
    device = torch.device(args.device)
    ok = True
    if "parity" in args.checks:
        cpu, gpu = build(torch.device("cpu")), build(device)
        gpu.load_state_dict(cpu.state_dict())  # the same weights
        ok = sampler_parity(cpu, gpu, device)
        ok = placement_and_syncs(gpu, device) and ok
        ok = loss_parity(cpu, gpu, device) and ok
        cpu_time, _ = timed_updates(cpu, torch.device("cpu"), args.updates)
        gpu_time, gpu_outs = timed_updates(gpu, device, args.updates)
        finite = all(torch.isfinite(v).all() for out in gpu_outs for v in out.values())
        ok = report(f"{args.updates} updates on the device give finite losses", finite) and ok
        times = f"cpu {1000 * cpu_time:.1f} ms, {device} {1000 * gpu_time:.1f} ms"
        print(f"eager loss + Adam step (sampler checks on): {times}")
    if "acting" in args.checks:
        ok = acting(device) and ok
    if "update" in args.checks:
        ok = scripts_update(device, args.updates) and ok
    if "training" in args.checks:
        ok = scripts_training(device) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
