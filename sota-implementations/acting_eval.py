r"""How each way of acting of a finished S2AC run scores, and what it costs in acting time.

    python sota-implementations/acting_eval.py results/hopper_100k/s2ac/seed4 --episodes 10

Loads the run's checkpoint and plays the same episodes (same seeds) with each particle selection of the SVGD
policy: a random particle (the stochastic policy, what training collects with), the particle of highest
:math:`\min_k Q` (the scripts' evaluation) and a particle drawn with probability :math:`\propto \exp(Q/\alpha)`;
for a run trained with ``s2ac.amortized=true`` also the amortized sampler, with random and zero noise. Prints a
Markdown table: mean return ± std over the episodes and acting time per (batched) environment step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchrl.envs.utils import ExplorationType, set_exploration_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint  # noqa: E402
import harness  # noqa: E402
import s2ac  # noqa: E402


def play(cfg, policy, exploration: ExplorationType, episodes: int, seed: int) -> tuple[torch.Tensor, float]:
    """Returns of ``episodes`` episodes run side by side, and milliseconds per (batched) env step."""
    env = harness.make_env(cfg, episodes)
    env.set_seed(seed)
    start = time.perf_counter()
    with set_exploration_type(exploration), torch.no_grad():
        rollout = env.rollout(cfg.env.max_episode_steps, policy, break_when_any_done=False)
    milliseconds = 1000 * (time.perf_counter() - start) / rollout.shape[-1]
    env.close()
    return harness.returns_to_first_done(rollout), milliseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished s2ac.py run (its checkpoints/ and .hydra/)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    OmegaConf.update(cfg, "network.device", "cpu", force_add=True)  # acting timed on the CPU, beside its envs
    agent = s2ac.make_agent(cfg, harness.env_specs(cfg))
    counters = checkpoint.load_weights(args.run_dir / "checkpoints", agent.loss)
    actor, sampler = agent.policy, agent.policy.amortized_sampler
    print(f"{cfg.env.name}, {counters['frames']} frames, {args.episodes} episodes each, seed {args.seed}")
    print(f"m = {actor.num_particles}, L = {actor.stein.num_steps}\n")
    print("| acting | selection | return (mean ± std) | ms per env step |")
    print("| --- | --- | --- | --- |")

    def row(acting: str, selection: str, policy, exploration: ExplorationType) -> None:
        torch.manual_seed(args.seed)
        returns, milliseconds = play(cfg, policy, exploration, args.episodes, args.seed)
        print(f"| {acting} | {selection} | {returns.mean():.1f} ± {returns.std():.1f} | {milliseconds:.2f} |")

    for selection in ("random", "max", "softmax"):
        # Every rule acts through the exploring path (train_selection), so that only the rule differs.
        used = [phase for phase in ("train", "eval") if cfg.s2ac[f"{phase}_selection"] == selection]
        actor.train_selection = selection
        row("SVGD particles", selection + (f" (the run's {', '.join(used)} selection)" if used else ""), actor,
            ExplorationType.RANDOM)  # fmt: skip
    if sampler is not None:
        row("amortized sampler", "random noise", sampler, ExplorationType.RANDOM)
        row("amortized sampler", "noise 0", sampler, ExplorationType.DETERMINISTIC)


if __name__ == "__main__":
    main()
