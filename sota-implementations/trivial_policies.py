r"""What a policy that learned nothing scores on each MuJoCo task: the floor a learning curve must clear.

    python sota-implementations/trivial_policies.py --out results/trivial_policies.md

Plays ``--episodes`` episodes per task in the training scripts' environments (``harness.make_env``: the same
transforms and ``max_episode_steps``) with two policies that ignore the observation: the zero action
:math:`a = 0` and actions drawn uniformly from the action box. The return counts rewards up to each episode's
first done, as the scripts' evaluation does. Where the zero action scores like a trained policy (Ant-v5's healthy
reward pays standing still 1 per step), a comparison at a budget below that level says nothing about learning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torchrl.envs.utils import RandomPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

TASKS = ("hopper", "walker2d", "halfcheetah", "ant", "humanoid")


def play(cfg, policy_name: str, episodes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns and lengths (steps to the first done) of ``episodes`` episodes run side by side."""
    env = harness.make_env(cfg, episodes)
    env.set_seed(seed)
    torch.manual_seed(seed)
    action_spec = env.full_action_spec["action"]
    if policy_name == "zero":

        def policy(td):
            return td.set("action", action_spec.zero())

    else:
        policy = RandomPolicy(env.full_action_spec)
    with torch.no_grad():
        rollout = env.rollout(cfg.env.max_episode_steps, policy, break_when_any_done=False)
    env.close()
    return harness.returns_to_first_done(rollout), harness.until_first_done(rollout).sum(-1).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    lines = [
        f"{args.episodes} episodes per task and policy, seed {args.seed}; "
        "command: `python sota-implementations/trivial_policies.py`",
        "",
        "| task | policy | return (mean ± std) | episode length |",
        "| --- | --- | --- | --- |",
    ]
    config_dir = str(Path(__file__).resolve().parent / "config")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for task in TASKS:
            cfg = compose(config_name="sac", overrides=[f"env={task}"])
            for policy_name, label in (("zero", "zero action"), ("uniform", "uniform random")):
                returns, lengths = play(cfg, policy_name, args.episodes, args.seed)
                lines.append(
                    f"| {cfg.env.name} | {label} | {returns.mean():.0f} ± {returns.std():.0f} | {lengths.mean():.0f} |"
                )
                print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
