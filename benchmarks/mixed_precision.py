"""Mixed precision in S2AC's SVGD score path: what bf16 saves in time and what it costs in accuracy.

    python benchmarks/mixed_precision.py [--checkpoint RUN_OR_CKPT_DIR] [--threads N] [--out results/mixed_precision.md]

``score_dtype=torch.bfloat16`` evaluates the score (the critic's closed-form input gradient
:math:`\\nabla_a Q / \\alpha`) under ``torch.autocast``; the kernel, the SVGD direction, the Stein trace and
:math:`\\log q` stay in fp32. Printed as Markdown tables:

1. The update (Hopper-v5 shapes, batch 100, m = 10, L = 3, twin 2 x 256 critics), fp32 vs bf16 score,
   eager and compiled, measured interleaved.
2. Targets of known entropy: Gaussians with a full covariance at the MuJoCo action dimensions
   (d = 3, 6, 8, 17), the actor's sampler settings (eps = 0.1, median bandwidth, step cap 0.5). The score
   :math:`-\\Sigma^{-1}(u - \\mu)` is a matrix product, so autocast computes it in bf16. Both precisions start
   from the same particles; reported: the closed-form entropy in each, and per particle the error of
   :math:`\\log q^L` and of the final position (in kernel length scales).
3. A trained critic (``--checkpoint``, an ``s2ac.py`` run): its actor on observations from its replay buffer,
   the same initial draws in both precisions; the same errors, plus that of :math:`\\min_k Q_k` at the final
   particles against the spread of Q over the particles (what the policy distinguishes).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "sota-implementations")]
import bench_update  # noqa: E402
import checkpoint  # noqa: E402
import harness  # noqa: E402
import s2ac  # noqa: E402

from torchrl_s2ac import RBFKernel, SteinEntropy, describe_device  # noqa: E402

DIMS = {3: "Hopper", 6: "HalfCheetah, Walker2d", 8: "Ant", 17: "Humanoid"}
STEP_SIZE, NUM_STEPS, NUM_PARTICLES, MAX_STEP_RATIO, INIT_STD = 0.1, 3, 10, 0.5, 0.5
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def update_times(repeats: int) -> list[str]:
    obs_dim, act_dim = bench_update.SHAPES["Hopper-v5"]
    data = bench_update.transitions(100, obs_dim, act_dim)
    updates = {}
    for name, dtype in DTYPES.items():
        for compiled in (False, True):
            actor, loss = bench_update.s2ac_agent(obs_dim, act_dim)
            actor.stein.score_dtype = dtype
            update = bench_update.update_fn(loss, data)
            updates[(name, compiled)] = torch.compile(update) if compiled else update
    times = bench_update.interleaved_ms(updates, repeats)
    rows = [
        "## Update time (Hopper-v5 shapes, batch 100, m = 10, L = 3), interleaved",
        "",
        "| score path | eager ms | compiled ms | speed-up over fp32 (eager / compiled) |",
        "| --- | --- | --- | --- |",
    ]
    for name in DTYPES:
        eager, compiled = times[(name, False)], times[(name, True)]
        rows.append(
            f"| {name} | {eager:.1f} | {compiled:.1f} | {times[('fp32', False)] / eager:.2f}x / "
            f"{times[('fp32', True)] / compiled:.2f}x |"
        )
    return rows + [""]


def compare(sample) -> dict:
    """Run ``sample(dtype)`` (returning particles, log q, length scale ``[*batch]`` and extras) in both
    precisions and measure the bf16 errors."""
    ref, low = sample(None), sample(torch.bfloat16)
    log_q_error = (low["log_q"] - ref["log_q"]).abs()
    displacement = (low["particles"] - ref["particles"]).norm(dim=-1) / ref["length_scale"].unsqueeze(-1)
    return {
        "entropy": (-ref["log_q"].mean(-1).mean().item(), -low["log_q"].mean(-1).mean().item()),
        "log_q_mean": log_q_error.mean().item(),
        "log_q_max": log_q_error.max().item(),
        "displacement_mean": displacement.mean().item(),
        "displacement_max": displacement.max().item(),
        "ref": ref,
        "low": low,
    }


def gaussian_targets(states: int) -> list[str]:
    rows = [
        "## Targets of known entropy (Gaussian, full covariance), actor settings, q0 = N(0, 0.5^2 I)",
        "",
        "| d (task) | target H* | entropy fp32 | entropy bf16 | bf16 - fp32 | mean / max abs error of log q | "
        "mean / max position error (length scales) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dim, tasks in DIMS.items():
        generator = torch.Generator().manual_seed(dim)
        mean = 0.5 * torch.randn(dim, generator=generator)
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        scales = torch.exp(torch.empty(dim).uniform_(math.log(0.15), math.log(0.6), generator=generator))
        precision = rotation @ torch.diag(scales**-2) @ rotation.T  # Sigma^{-1}
        target_entropy = 0.5 * dim * math.log(2 * math.pi * math.e) + scales.log().sum().item()
        u0 = INIT_STD * torch.randn(states, NUM_PARTICLES, dim, generator=generator)
        log_q0 = torch.distributions.Normal(0.0, INIT_STD).log_prob(u0).sum(-1)

        def sample(dtype, u0=u0, log_q0=log_q0, mean=mean, precision=precision):
            stein = SteinEntropy(
                RBFKernel(), STEP_SIZE, NUM_STEPS, max_step_ratio=MAX_STEP_RATIO, warn_ratio=None, score_dtype=dtype
            )
            with torch.no_grad():
                out = stein.sample(None, u0, log_q0, score_fn=lambda u: -(u - mean) @ precision)
            return {
                "particles": out.particles,
                "log_q": out.log_prob,
                "length_scale": RBFKernel()(out.particles).bandwidth.sqrt().flatten(-3),
            }

        r = compare(sample)
        fp32, bf16 = r["entropy"]
        rows.append(
            f"| {dim} ({tasks}) | {target_entropy:.2f} | {fp32:.3f} | {bf16:.3f} | {bf16 - fp32:+.4f} | "
            f"{r['log_q_mean']:.4f} / {r['log_q_max']:.3f} | {r['displacement_mean']:.4f} / "
            f"{r['displacement_max']:.3f} |"
        )
    return rows + [""]


def trained_critic(path: Path, states: int) -> list[str]:
    run_dir = path if (path / ".hydra").is_dir() else path.parent
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    ckpt_root = path if (path / "latest").exists() else Path(cfg.checkpoint.dir)
    if not ckpt_root.is_absolute():
        ckpt_root = run_dir / ckpt_root
    agent = s2ac.make_agent(cfg, harness.env_specs(cfg))
    counters = checkpoint.load_weights(ckpt_root, agent.loss)
    directory, _ = checkpoint.read_manifest(ckpt_root)
    rows = torch.load(directory / "buffer.pt", weights_only=True, map_location="cpu")
    observations = rows["observation"]
    generator = torch.Generator().manual_seed(0)
    observation = observations[torch.randperm(len(observations), generator=generator)[:states]]
    actor = agent.policy

    def sample(dtype):
        actor.stein.score_dtype = dtype
        torch.manual_seed(0)  # the same initial draws in both precisions
        with torch.no_grad():
            out = actor.sample_particles(observation)
            q = actor.critic.min_values(observation.unsqueeze(-2), out.action)
        # back to the pre-squash space where SVGD moved them (and its kernel length scale is defined)
        u = torch.atanh(((out.action - actor.squash.loc) / actor.squash.scale).clamp(-1 + 1e-6, 1 - 1e-6))
        return {
            "particles": u,
            "log_q": out.log_prob,
            "length_scale": actor.stein.kernel(u).bandwidth.sqrt().flatten(-3),
            "q": q,
            "action": out.action,
        }

    r = compare(sample)
    fp32, bf16 = r["entropy"]
    # Which twin critic min_k Q_k picks, at the fp32 particles, with the score path's hidden layers in bf16.
    with torch.no_grad():
        action = r["ref"]["action"]
        members = actor.critic.values_and_action_grad(observation.unsqueeze(-2), action)[0].argmin(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_members = actor.critic.values_and_action_grad(observation.unsqueeze(-2), action)[0].argmin(0)
    flips = (members != low_members).float().mean().item()
    q_error = (r["low"]["q"] - r["ref"]["q"]).abs().mean().item()
    q_spread = r["ref"]["q"].std(-1).mean().item()
    return [
        f"## A trained critic: {cfg.env.name}, {counters['frames']} frames ({run_dir})",
        "",
        f"{len(observation)} observations from the run's replay buffer, m = {actor.num_particles}, "
        f"L = {actor.stein.num_steps}, the run's sampler settings; the same initial draws in both precisions.",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| entropy estimate fp32 / bf16 | {fp32:.3f} / {bf16:.3f} ({bf16 - fp32:+.4f}) |",
        f"| abs error of log pi(a_i|s), mean / max | {r['log_q_mean']:.4f} / {r['log_q_max']:.3f} |",
        f"| particle position error (kernel length scales), mean / max | {r['displacement_mean']:.4f} / "
        f"{r['displacement_max']:.3f} |",
        f"| abs error of min_k Q_k at the final particles, mean | {q_error:.4f} |",
        f"| spread of Q over the particles (std, mean over states) | {q_spread:.4f} |",
        f"| particles whose min_k Q_k member differs (bf16 hidden layers, fp32 output layer) | {flips:.1%} |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="an s2ac.py run (or its checkpoint dir)")
    parser.add_argument("--states", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python benchmarks/mixed_precision.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
    command += f" --threads {args.threads}" if args.threads is not None else ""
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe_device()}",
        f"command: `{command}`",
        "",
        *update_times(args.repeats),
        *gaussian_targets(args.states),
    ]
    if args.checkpoint is not None:
        lines += trained_critic(args.checkpoint, args.states)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
