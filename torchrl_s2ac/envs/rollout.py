"""Reading TorchRL rollouts of batched environments that keep stepping after an episode ends."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

__all__ = ["until_first_done"]


def until_first_done(rollout: TensorDictBase) -> torch.Tensor:
    """``[envs, T]`` mask of the steps of each env's first episode (up to and including its first done)."""
    done = rollout.get(("next", "done")).squeeze(-1).int()
    return (done.cumsum(-1) - done) == 0
