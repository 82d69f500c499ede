"""Non-finite checks cheap enough for every batch: one reduction and one host synchronisation when all is finite."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

__all__ = ["NonFiniteError", "all_finite", "first_non_finite", "recording_graph"]


class NonFiniteError(FloatingPointError):
    """Raised when data (observations, actions, rewards) holds NaN or inf; the message names the key and its source."""


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-d bool tensor: no host synchronisation, so a
    compiled graph can compute it."""
    return torch.stack([torch.isfinite(value).all() for value in tensors]).all()


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor in ``tensors`` holding a NaN or an inf, or ``None`` when all are finite."""
    if all_finite(tensors.values()):
        return None
    return next(name for name, value in tensors.items() if not torch.isfinite(value).all())


def recording_graph() -> bool:
    """Whether this call is traced by :func:`torch.compile` or captured in a CUDA graph, where neither a host
    synchronisation nor a data-dependent branch may run: checks are then left to the caller, on the outputs."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
