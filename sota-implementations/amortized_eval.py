"""What S2AC's amortized sampler costs in return and saves in acting time, on a finished run.

    python sota-implementations/s2ac.py env=hopper s2ac.amortized=true hydra.run.dir=runs/hopper_amortized ...
    python sota-implementations/amortized_eval.py runs/hopper_amortized --episodes 10

Loads the run's checkpoint and plays the same number of episodes with each way of acting
(SVGD particles with the training / evaluation selection, and the amortized sampler with
random / zero noise), in the run's own environment. Prints a Markdown table: mean
return ± std and acting time per environment step.
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
    reward = rollout.get(("next", "reward")).squeeze(-1)
    return (reward * harness.until_first_done(rollout)).sum(-1), milliseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished s2ac.py run trained with s2ac.amortized=true")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    if not cfg.s2ac.get("amortized", False):
        raise SystemExit(f"{args.run_dir} was trained without s2ac.amortized=true: there is no sampler to compare.")
    OmegaConf.update(cfg, "network.device", "cpu", force_add=True)  # acting timed on the CPU, beside its envs
    agent = s2ac.make_agent(cfg, harness.env_specs(cfg))
    counters = checkpoint.load_weights(args.run_dir / "checkpoints", agent.loss)
    actor, sampler = agent.policy, agent.policy.amortized_sampler
    rows = [
        ("SVGD particles", f"training ({cfg.s2ac.train_selection})", agent.policy, ExplorationType.RANDOM),
        ("SVGD particles", f"evaluation ({cfg.s2ac.eval_selection})", agent.policy, ExplorationType.DETERMINISTIC),
        ("amortized sampler", "random noise", sampler, ExplorationType.RANDOM),
        ("amortized sampler", "noise 0", sampler, ExplorationType.DETERMINISTIC),
    ]
    print(f"{cfg.env.name}, {counters['frames']} frames, {args.episodes} episodes each, seed {args.seed}")
    print(f"m = {actor.num_particles}, L = {actor.stein.num_steps}\n")
    print("| acting | selection | return (mean ± std) | ms per env step |")
    print("| --- | --- | --- | --- |")
    for acting, selection, policy, exploration in rows:
        torch.manual_seed(args.seed)
        returns, milliseconds = play(cfg, policy, exploration, args.episodes, args.seed)
        print(f"| {acting} | {selection} | {returns.mean():.1f} ± {returns.std():.1f} | {milliseconds:.2f} |")


if __name__ == "__main__":
    main()
