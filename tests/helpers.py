"""Helpers shared by the test modules."""

import torch
from tensordict import TensorDict


def transition_batch(n: int, obs_dim: int, act_dim: int, dtype: torch.dtype = torch.float32) -> TensorDict:
    """``n`` transitions with actions in [-1, 1]; every other one terminal."""
    terminated = torch.zeros(n, 1, dtype=torch.bool)
    terminated[::2] = True
    return TensorDict(
        {
            "observation": torch.randn(n, obs_dim, dtype=dtype),
            "action": torch.rand(n, act_dim, dtype=dtype) * 2 - 1,
            "next": {
                "observation": torch.randn(n, obs_dim, dtype=dtype),
                "reward": torch.randn(n, 1, dtype=dtype),
                "done": terminated.clone(),
                "terminated": terminated,
            },
        },
        [n],
    )


def assert_input_left_unchanged(loss, td: TensorDict) -> None:
    """Calls ``loss(td)``: only the declared output (the priority key) may be added; nothing is modified."""
    before = td.clone()
    loss(td)
    assert set(td.keys(True, True)) - set(before.keys(True, True)) == {loss.tensor_keys.priority}
    for key, value in before.items(True, True):
        assert torch.equal(td[key], value), key
