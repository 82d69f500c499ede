r"""The densities around the samplers: the initial truncated normal :math:`q^0`,
the tanh squash onto the action box, and a sample-based entropy estimate for
policies without a density (SQL's implicit sampler).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.distributions.transforms import TanhTransform
from torchrl.data import Bounded

__all__ = ["sample_truncated_normal", "TanhSquash", "knn_entropy"]


@torch.library.custom_op("torchrl_s2ac::truncated_normal_icdf", mutates_args=())
def truncated_normal_icdf(v: torch.Tensor, bound: float) -> torch.Tensor:
    r"""The inverse CDF of :math:`\mathcal N(0, 1)` truncated to :math:`[-b, b]` at :math:`v \in [0, 1]`:
    :math:`z = \Phi^{-1}(\Phi(-b) + v\,Z)` with :math:`Z = \Phi(b) - \Phi(-b)`.

    One operator, so that :func:`torch.compile` keeps ``z`` as a buffer: left to itself, inductor inlines
    ``ndtri`` (a scalar loop on CPU) into every consumer of the draws and recomputes it per pair of particles
    in the SVGD kernel matrix (a quarter of the compiled bf16 update). Inductor lowers it to one fused kernel
    whose result it stores (:func:`_register_inductor_lowering`), so a compiled graph does not call back into
    Python for it. A pure function of ``v``; the uniform draws stay outside, where the compiler treats them
    as random. ``v`` carries no gradient, so no backward.
    """
    lower_cdf, mass, tiny = _icdf_constants(v.dtype, bound)
    return torch.special.ndtri((lower_cdf + v * mass).clamp(tiny, 1 - tiny)).clamp(-bound, bound)


def _icdf_constants(dtype: torch.dtype, bound: float) -> tuple[float, float, float]:
    r""":math:`\Phi(-b)`, :math:`Z` and the clamp keeping :math:`\Phi^{-1}`'s argument inside :math:`(0, 1)`."""
    return 0.5 * math.erfc(bound / math.sqrt(2)), math.erf(bound / math.sqrt(2)), torch.finfo(dtype).eps


@truncated_normal_icdf.register_fake
def _(v: torch.Tensor, bound: float) -> torch.Tensor:
    _register_inductor_lowering()  # tracing runs before lowering: the first compile of the op registers it
    return torch.empty_like(v)


@functools.cache  # once per process
def _register_inductor_lowering() -> None:
    """Teach inductor :func:`truncated_normal_icdf`: the same pointwise formula, realized into a buffer.

    Without a lowering inductor calls the operator's Python kernel from the compiled graph (with inductor's C++
    wrapper, through a proxy that costs more than the op: 82 us per single-environment acting call on a Xeon core,
    a sixth of it; ``benchmarks/acting_overhead.py``). Uses inductor's lowering table (a private API, pinned torch);
    if it is missing the op keeps its Python kernel, which is correct, only slower.
    """
    try:
        from torch._inductor.lowering import lowerings, register_lowering
    except ImportError:
        return
    aten = torch.ops.aten

    @register_lowering(torch.ops.torchrl_s2ac.truncated_normal_icdf.default, type_promotion_kind=None)
    def _lower(v, bound: float):
        lower_cdf, mass, tiny = _icdf_constants(v.get_dtype(), bound)
        p = lowerings[aten.add.Tensor](lowerings[aten.mul.Tensor](v, mass), lower_cdf)
        p = lowerings[aten.clamp_max.default](lowerings[aten.clamp_min.default](p, tiny), 1 - tiny)
        z = lowerings[aten.special_ndtri.default](p)
        z = lowerings[aten.clamp_max.default](lowerings[aten.clamp_min.default](z, -bound), bound)
        z.realize()  # stored once, read by every consumer
        return z


def sample_truncated_normal(
    loc: torch.Tensor, scale: torch.Tensor, num_samples: int, bound: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draw ``num_samples`` particles from :math:`\mathcal N(\mu, \mathrm{diag}\,\sigma^2)`
    truncated to :math:`\mu \pm \text{bound}\cdot\sigma`, by inverse-CDF (no rejection).

    Reparameterised: :math:`u = \mu + \sigma z` with :math:`z` the :func:`truncated_normal_icdf` of
    :math:`v \sim U(0, 1)`, so gradients reach ``loc`` and ``scale``. The bounds are Python floats: no host
    synchronisation and no graph break under :func:`torch.compile` (TorchRL's ``TruncatedStandardNormal`` checks
    its bounds with ``.tolist()``).

    Args:
        loc, scale: ``[*batch, d]``.
        num_samples: ``m``.

    Returns:
        particles ``[*batch, m, d]`` and their exact log-density
        :math:`\log q^0` (truncation constant included), ``[*batch, m]``.
    """
    if loc.shape != scale.shape:
        raise ValueError(f"loc and scale must have the same shape, got {tuple(loc.shape)} and {tuple(scale.shape)}.")
    v = torch.rand((*loc.shape[:-1], num_samples, loc.shape[-1]), dtype=loc.dtype, device=loc.device)
    z = truncated_normal_icdf(v, bound)
    loc, scale = loc.unsqueeze(-2), scale.unsqueeze(-2)
    mass = math.erf(bound / math.sqrt(2))
    log_standard = -0.5 * z.square() - 0.5 * math.log(2 * math.pi) - math.log(mass)
    log_q0 = (log_standard - scale.log()).sum(-1)
    return loc + scale * z, log_q0


class TanhSquash(nn.Module):
    r"""Maps unsquashed particles onto the action box: :math:`a = c + r\tanh(u)`.

    ``c = (high + low) / 2`` and ``r = (high - low) / 2``. The log-Jacobian is
    :math:`\sum_d \log r_d + \log(1 - \tanh^2 u_d)`, the second term in the stable form of
    :class:`torch.distributions.transforms.TanhTransform`.
    """

    _tanh = TanhTransform()

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        low, high = torch.as_tensor(low), torch.as_tensor(high)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise ValueError(f"TanhSquash needs finite action bounds, got low={low.tolist()}, high={high.tolist()}.")
        if not (high > low).all():
            raise ValueError(f"TanhSquash needs high > low, got low={low.tolist()}, high={high.tolist()}.")
        super().__init__()
        self.register_buffer("loc", (high + low) / 2)
        self.register_buffer("scale", (high - low) / 2)

    @classmethod
    def from_action_spec(cls, action_spec, owner: str) -> "TanhSquash":
        """The squash onto a :class:`torchrl.data.Bounded` spec's box (default dtype); ``owner`` names the caller
        in the error raised for any other spec."""
        space = getattr(action_spec, "space", None)
        if not isinstance(action_spec, Bounded) or space is None:
            raise ValueError(
                f"{owner} needs a bounded action spec (torchrl.data.Bounded), got {type(action_spec).__name__}."
            )
        dtype = torch.get_default_dtype()
        return cls(space.low.to(dtype), space.high.to(dtype))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.loc + self.scale * torch.tanh(u)

    def log_abs_det_jacobian(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_d \log|\partial a_d / \partial u_d|`, reduced over the last dim."""
        return (self.scale.log() + self._tanh.log_abs_det_jacobian(u, None)).sum(-1)

    def pullback(self, u: torch.Tensor, action_grad: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_u f(a(u))` from :math:`\nabla_a f`: :math:`\nabla_a f \odot r\,(1 - \tanh^2 u)` (the squash
        acts per dimension)."""
        return action_grad * self.scale * (1 - torch.tanh(u).square())

    def log_abs_det_jacobian_grad(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_u \sum_d \log|\partial a_d / \partial u_d| = -2\tanh u`."""
        return -2 * torch.tanh(u)


def knn_entropy(samples: torch.Tensor, k: int = 3) -> torch.Tensor:
    r"""Kozachenko-Leonenko :math:`k`-nearest-neighbour entropy estimate from samples ``[*batch, n, d]``.

    .. math::
        \hat H = \psi(n) - \psi(k) + \log V_d + \frac{d}{n}\sum_{i=1}^n \log r_{i,k},
        \qquad V_d = \frac{\pi^{d/2}}{\Gamma(d/2 + 1)},

    with :math:`r_{i,k}` the distance from sample :math:`i` to its :math:`k`-th nearest other
    sample. Consistent for any density; needs no density model. Returns ``[*batch]``.
    """
    n, d = samples.shape[-2:]
    if not 1 <= k < n:
        raise ValueError(f"knn_entropy: k must be in [1, n) with n={n} samples, got k={k}.")
    # Differences, not ||x||^2 + ||y||^2 - 2 x.y (cdist's default for n > 25), which cancels to noise or 0 for
    # a narrow policy away from the origin: 0.01-wide samples at 100 lose every digit in float32.
    distances = torch.cdist(samples, samples, compute_mode="donot_use_mm_for_euclid_dist")
    distances = distances + torch.diag(torch.full((n,), math.inf, dtype=samples.dtype, device=samples.device))
    radius = distances.kthvalue(k, dim=-1).values.clamp_min(torch.finfo(samples.dtype).tiny)
    log_unit_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    digamma = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return (digamma[0] - digamma[1]).item() + log_unit_ball + d * radius.log().mean(-1)
