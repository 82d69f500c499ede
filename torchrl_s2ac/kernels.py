"""RBF kernel on SVGD particles, with a per-state bandwidth.

The kernel is ``k(x, y) = exp(-||x - y||^2 / (2 h))`` with ``h = sigma^2``.
Particles are shaped ``[*batch, m, d]``: each leading index is one state
(one independent particle system); the bandwidth is chosen per state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["KernelMatrix", "RBFKernel"]


class KernelMatrix(NamedTuple):
    """Pairwise quantities shared by the SVGD update and the Stein trace.

    Attributes:
        value: ``k_ij = k(u_i, u_j)``, shape ``[*batch, m, m]``.
        diff: ``u_i - u_j``, shape ``[*batch, m, m, d]``.
        sq_dist: ``||u_i - u_j||^2``, shape ``[*batch, m, m]``.
        bandwidth: ``h = sigma^2`` (detached), shape ``[*batch, 1, 1]``.
    """

    value: torch.Tensor
    diff: torch.Tensor
    sq_dist: torch.Tensor
    bandwidth: torch.Tensor


class RBFKernel(nn.Module):
    r"""Gaussian (RBF) kernel :math:`k(x, y) = \exp(-\|x - y\|^2 / (2\sigma^2))`.

    Args:
        sigma (float, optional): a fixed length scale :math:`\sigma > 0`. When
            ``None`` (default) the bandwidth :math:`h = \sigma^2` is recomputed
            from the particles of each state at each SVGD step and detached.
        rule (str): bandwidth rule used when ``sigma`` is ``None``.

            - ``"median"``: :math:`h = \mathrm{med}_{i \neq j}\|u_i - u_j\|^2 / (2 \log(m + 1))`
              (Liu & Wang's median heuristic);
            - ``"mean"``: the authors' release rule, the mean of all :math:`m^2`
              squared distances (diagonal included) in place of the median,
              halved: :math:`h = \overline{\|u_i - u_j\|^2} / 2 / (2 \log(m + 1))`.
        min_bandwidth (float): floor on an adaptive :math:`h`, so that collapsed
            particles do not divide by zero. Defaults to ``1e-6``.

    Examples:
        >>> kernel = RBFKernel(rule="median")(torch.randn(5, 10, 2))  # 5 states, 10 particles each
        >>> kernel.value.shape, kernel.bandwidth.shape
        (torch.Size([5, 10, 10]), torch.Size([5, 1, 1]))
    """

    RULES = ("median", "mean")

    def __init__(self, sigma: float | None = None, rule: str = "median", min_bandwidth: float = 1e-6) -> None:
        super().__init__()
        if sigma is not None and not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"RBFKernel: sigma must be a positive finite number or None, got {sigma!r}.")
        if rule not in self.RULES:
            raise ValueError(f"RBFKernel: rule must be one of {self.RULES}, got {rule!r}.")
        if not min_bandwidth > 0:
            raise ValueError(f"RBFKernel: min_bandwidth must be > 0, got {min_bandwidth!r}.")
        self.sigma = None if sigma is None else float(sigma)
        self.rule = rule
        self.min_bandwidth = float(min_bandwidth)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}" if self.sigma is not None else f"rule={self.rule!r}"

    def bandwidth(self, sq_dist: torch.Tensor) -> torch.Tensor:
        """Bandwidth ``h`` per state from squared distances ``[*batch, m, m]`` -> ``[*batch, 1, 1]``."""
        batch_shape = sq_dist.shape[:-2]
        if self.sigma is not None:
            return sq_dist.new_full((*batch_shape, 1, 1), self.sigma**2)
        m = sq_dist.shape[-1]
        sq_dist = sq_dist.detach()
        if self.rule == "median":
            # Lower median of the m (m - 1) off-diagonal entries: the diagonal holds the m
            # smallest values (zeros), so it is the (m + (m (m - 1) - 1) // 2 + 1)-th smallest overall.
            rank = m + (m * (m - 1) - 1) // 2 + 1
            h = sq_dist.flatten(-2).kthvalue(rank, dim=-1).values / (2 * math.log(m + 1))
        else:
            h = sq_dist.mean(dim=(-2, -1)) / 2 / (2 * math.log(m + 1))
        return h.clamp_min(self.min_bandwidth).reshape(*batch_shape, 1, 1)

    def forward(self, particles: torch.Tensor) -> KernelMatrix:
        """Kernel matrix and the pairwise terms it was built from.

        Args:
            particles: ``[*batch, m, d]``.
        """
        if particles.ndim < 2:
            raise ValueError(f"RBFKernel: particles must be shaped [*batch, m, d], got shape {tuple(particles.shape)}.")
        diff = particles.unsqueeze(-2) - particles.unsqueeze(-3)
        sq_dist = diff.square().sum(-1)
        h = self.bandwidth(sq_dist)
        return KernelMatrix(torch.exp(-sq_dist / (2 * h)), diff, sq_dist, h)
