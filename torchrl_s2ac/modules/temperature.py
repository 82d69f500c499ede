r"""The temperature :math:`\alpha` of the energy :math:`\pi(a|s) \propto \exp(Q(s, a)/\alpha)`."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Temperature"]


class Temperature(nn.Module):
    r""":math:`\alpha = \exp(\mathrm{clamp}(\log\alpha, \log\alpha_{\min}, \log\alpha_{\max}))` as registered state.

    :class:`~torchrl_s2ac.SVGDActor` acts with it and :class:`~torchrl_s2ac.S2ACLoss` trains it (when
    learned) as the same module, so a policy handed to a collector, copied or saved always carries the
    temperature the loss uses. ``log_alpha`` is a parameter when learned and a buffer otherwise.

    Args:
        alpha (float): initial :math:`\alpha > 0`.

    Keyword Args:
        learnable (bool): make ``log_alpha`` a parameter. Defaults to ``False``.
        min_alpha, max_alpha (float, optional): the clamp. Default to no bound.

    Examples:
        >>> temperature = Temperature(0.2, learnable=True, max_alpha=1.0)
        >>> round(temperature().item(), 4), isinstance(temperature.log_alpha, torch.nn.Parameter)
        (0.2, True)
    """

    def __init__(
        self, alpha: float, *, learnable: bool = False, min_alpha: float | None = None, max_alpha: float | None = None
    ) -> None:
        super().__init__()
        alpha = float(alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"Temperature: alpha must be a positive finite number, got {alpha!r}.")
        for name, bound in (("min_alpha", min_alpha), ("max_alpha", max_alpha)):
            if bound is not None and not bound > 0:
                raise ValueError(f"Temperature: {name} must be > 0 or None, got {bound!r}.")
        log_alpha = torch.tensor(math.log(alpha))
        if learnable:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        self.register_buffer("min_log_alpha", torch.tensor(-math.inf if min_alpha is None else math.log(min_alpha)))
        self.register_buffer("max_log_alpha", torch.tensor(math.inf if max_alpha is None else math.log(max_alpha)))

    @property
    def learnable(self) -> bool:
        return isinstance(self.log_alpha, nn.Parameter)

    def forward(self) -> torch.Tensor:
        """:math:`\\alpha`, a scalar tensor (differentiable in ``log_alpha`` inside the clamp)."""
        return self.log_alpha.clamp(self.min_log_alpha, self.max_log_alpha).exp()
