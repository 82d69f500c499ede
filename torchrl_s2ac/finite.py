"""Non-finite checks cheap enough for every batch: one reduction and one host synchronisation when all is finite."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["NonFiniteError", "first_non_finite"]


class NonFiniteError(FloatingPointError):
    """Raised when data (observations, actions, rewards) holds NaN or inf; the message names the key and its source."""


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor in ``tensors`` holding a NaN or an inf, or ``None`` when all are finite."""
    if torch.stack([torch.isfinite(value).all() for value in tensors.values()]).all():
        return None
    return next(name for name, value in tensors.items() if not torch.isfinite(value).all())
