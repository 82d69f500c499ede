r"""SVGD sampling and the closed-form log-density of its particles (S2AC §2).

Notation (per state; every tensor carries arbitrary leading batch dims):
``m`` particles :math:`u_i \in \mathbb{R}^d`, a target :math:`p \propto e^{f}` with
score :math:`s_i = \nabla_u f(u_i)`, the RBF kernel :math:`k_{ij} = k(u_i, u_j)`
with bandwidth :math:`h` and step size :math:`\epsilon`. One SVGD step is

.. math::
    u_i \leftarrow u_i + \epsilon \phi(u_i), \qquad
    \phi(u_i) = \frac{1}{m}\sum_j \big[k_{ij} s_j + \nabla_{u_j} k(u_j, u_i)\big]
              = \frac{1}{m}\sum_j k_{ij}\big[s_j + (u_i - u_j)/h\big].

For small :math:`\epsilon` the step is invertible and, to first order,
:math:`\log q^{l+1}(u_i^{l+1}) = \log q^l(u_i^l) - \epsilon\,\mathrm{Tr}\nabla\phi(u_i^l)`
with (keeping the :math:`j \neq i` terms)

.. math::
    \mathrm{Tr}\nabla\phi(u_i) = \frac{1}{m}\sum_{j\neq i}\frac{k_{ij}}{h}
        \Big[d - \frac{\|u_i - u_j\|^2}{h} - (u_i - u_j)^\top s_j\Big].
"""

from __future__ import annotations

import math
import platform
import warnings
from typing import Callable, NamedTuple

import torch
from torch import nn

from torchrl_s2ac.finite import recording_graph
from torchrl_s2ac.kernels import KernelMatrix, RBFKernel

__all__ = [
    "SVGDNumericalError",
    "SteinOutput",
    "SteinEntropy",
    "svgd_direction",
    "stein_trace",
    "exact_log_det",
    "score",
    "MIXED_PRECISION_DTYPES",
    "has_bf16_matmul",
    "describe_device",
]

MIXED_PRECISION_DTYPES = (None, torch.bfloat16, torch.float16)
LogDensity = Callable[[torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def has_bf16_matmul(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bf16 support, or a CPU
    with AVX-512 BF16 or AMX units. Elsewhere (an AVX2-only CPU) bf16 matmuls are emulated, about 50x
    slower than fp32, so ``score_dtype=torch.bfloat16`` only pays where this holds."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_bf16_units())
    return True


_CPU_BF16_UNITS = {"AVX-512 BF16": torch.cpu._is_avx512_bf16_supported, "AMX": torch.cpu._is_amx_tile_supported}


def _cpu_bf16_units() -> list[str]:
    return [unit for unit, present in _CPU_BF16_UNITS.items() if present()]


def describe_device(device: torch.device | str = "cpu") -> str:
    """The device's model and, for a CPU, its bf16 matrix units: what a timing (and the bf16 score path's speed)
    depends on, recorded beside benchmark tables and in each training run's ``run.json``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":  # no model name to read for other backends
        return f"device: {device}"
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    units = _cpu_bf16_units()
    return f"CPU: {name} (bf16 matrix units: {', '.join(units) or 'none, bf16 emulated'})"


class SVGDNumericalError(FloatingPointError):
    """Raised when NaN or inf appears in the SVGD particles, scores or log-densities."""


class SteinOutput(NamedTuple):
    """Result of :meth:`SteinEntropy.sample`.

    Attributes:
        particles: final particles :math:`u^L`, ``[*batch, m, d]``.
        log_prob: closed-form :math:`\\log q^L(u^L)`, ``[*batch, m]`` (``None`` when not tracked).
        step_ratio: invertibility diagnostic per SVGD step, ``[L]``: the largest
            (over states and particles) displacement :math:`\\epsilon\\|\\phi(u_i)\\|`
            actually taken, divided by the kernel length scale :math:`\\sqrt h`.
            The change of variables needs it well below 1.
        capped_fraction: per SVGD step, ``[L]``: the fraction of states whose step size
            ``max_step_ratio`` shortened (zeros without a cap).
    """

    particles: torch.Tensor
    log_prob: torch.Tensor
    step_ratio: torch.Tensor
    capped_fraction: torch.Tensor


def score(log_density: LogDensity, particles: torch.Tensor, create_graph: bool) -> torch.Tensor:
    r""":math:`\nabla_u f(u)` for each particle, with ``f = log_density`` mapping ``[*batch, m, d] -> [*batch, m]``.

    With ``create_graph=False`` the particles are detached first, so the result
    carries no graph; with ``create_graph=True`` it stays differentiable.
    """
    with torch.enable_grad():
        if not create_graph or not particles.requires_grad:
            particles = particles.detach().requires_grad_(True)
        log_p = log_density(particles)
        if log_p.shape != particles.shape[:-1]:
            raise ValueError(
                f"log_density must map particles of shape {tuple(particles.shape)} to shape "
                f"{tuple(particles.shape[:-1])}, got {tuple(log_p.shape)}."
            )
        (grad,) = torch.autograd.grad(log_p.sum(), particles, create_graph=create_graph)
    return grad


def svgd_direction(kernel: KernelMatrix, score: torch.Tensor) -> torch.Tensor:
    r"""SVGD direction :math:`\phi(u_i) = \frac1m\sum_j k_{ij}[s_j + (u_i - u_j)/h]`, ``[*batch, m, d]``."""
    m = score.shape[-2]
    # One broadcast product and sum over j (no batched [m, m] @ [m, d] product: at m = 10 its per-matrix
    # overhead dominates, where this fuses into one kernel when compiled).
    summand = kernel.value.unsqueeze(-1) * (score.unsqueeze(-3) + kernel.diff / kernel.bandwidth.unsqueeze(-1))
    return summand.sum(-2) / m


def stein_trace(kernel: KernelMatrix, score: torch.Tensor) -> torch.Tensor:
    r"""Closed-form :math:`\mathrm{Tr}\nabla\phi(u_i)` over the :math:`j \neq i` terms, ``[*batch, m]``.

    The :math:`j = i` term of the sum (:math:`k_{ii} = 1`, zero difference)
    equals :math:`d`; it is summed with the others and subtracted.
    """
    m, d = score.shape[-2:]
    h = kernel.bandwidth
    diff_dot_score = (kernel.diff * score.unsqueeze(-3)).sum(-1)  # (u_i - u_j)^T s_j
    summand = kernel.value * (d - kernel.sq_dist / h - diff_dot_score)
    return (summand.sum(-1) - d) / (m * h.squeeze(-1))


def _phi_from_others(x, index, particles, scores, h):
    # phi restricted to the j != index terms, as a function of x = u_index alone.
    diff = x - particles
    k = torch.exp(-diff.square().sum(-1) / (2 * h))
    k = torch.where(torch.arange(particles.shape[0], device=x.device) == index, 0.0, k)
    return (k.unsqueeze(-1) * (scores + diff / h)).sum(0) / particles.shape[0]


def exact_log_det(
    kernel: KernelMatrix, particles: torch.Tensor, score: torch.Tensor, step_size: torch.Tensor
) -> torch.Tensor:
    r"""Reference :math:`\log|\det(I + \epsilon J_i)|` with :math:`J_i` the autograd Jacobian of
    :math:`u_i \mapsto \phi_{j\neq i}(u_i)` (other particles held fixed), ``[*batch, m]``.

    Costs a ``d x d`` Jacobian and determinant per particle; meant for validation
    and small ``d``. ``step_size`` is a scalar or one value per state, ``[*batch]``.
    """
    batch_shape, (m, d) = particles.shape[:-2], particles.shape[-2:]
    flat_u = particles.reshape(-1, m, d)
    flat_s = score.reshape(-1, m, d)
    flat_h = kernel.bandwidth.reshape(-1)
    jac = torch.func.jacrev(_phi_from_others)
    per_particle = torch.func.vmap(jac, in_dims=(0, 0, None, None, None))
    per_state = torch.func.vmap(per_particle, in_dims=(0, None, 0, 0, 0))
    index = torch.arange(m, device=particles.device)
    jacobians = per_state(flat_u, index, flat_u, flat_s, flat_h).reshape(*batch_shape, m, d, d)
    eye = torch.eye(d, dtype=particles.dtype, device=particles.device)
    step = torch.as_tensor(step_size, dtype=particles.dtype, device=particles.device)
    step = step.reshape(*step.shape, 1, 1, 1) if step.ndim else step
    return torch.linalg.slogdet(eye + step * jacobians).logabsdet


class SteinEntropy(nn.Module):
    r"""Runs ``num_steps`` SVGD steps and tracks the particles' log-density in closed form.

    ``particles_L, log_q_L = stein(log_density, particles_0, log_q0)``

    :math:`\log q^L(u_i^L) = \log q^0(u_i^0) - \sum_{l<L} \epsilon_l\,\mathrm{Tr}\nabla\phi(u_i^l)`.
    When gradients are enabled the result is differentiable with respect to
    ``particles_0`` and ``log_q0`` through every step (the score is taken with
    ``create_graph=True``); under :func:`torch.no_grad` only the score's own
    graph is built, one step at a time.

    Args:
        kernel (RBFKernel): the SVGD kernel.
        step_size (float): :math:`\epsilon > 0`.
        num_steps (int): :math:`L \geq 0`.

    Keyword Args:
        exact (bool): accumulate the exact :math:`\log|\det(I + \epsilon J)|` by
            autograd instead of the first-order trace (reference mode, small ``d``).
        max_step_ratio (float, optional): cap on the invertibility diagnostic. When
            the largest displacement :math:`\epsilon\|\phi(u_i)\|` of a state exceeds
            ``max_step_ratio`` times :math:`\sqrt h`, that state's step size is
            scaled down for this step (by a detached factor, like the bandwidth), and
            the trace is scaled with it. ``None`` (default) keeps :math:`\epsilon`.
        warn_ratio (float, optional): warn when the diagnostic exceeds this value
            (default ``1.0``: a step as long as the kernel length scale). ``None``
            disables the check.
        check_finite (bool): raise :class:`SVGDNumericalError`, naming the step,
            when NaN or inf appears (default ``True``).
        score_dtype (torch.dtype, optional): mixed precision for the score path only. The score
            :math:`s_i = \nabla_u f(u_i)` is evaluated under :func:`torch.autocast` in this dtype
            (``torch.bfloat16`` or ``torch.float16``): matrix products, and what follows them, run in
            it, as on CPUs with AMX or AVX-512 BF16 and on GPU tensor cores. The score is cast back to
            the particles' dtype, so the kernel, :math:`\phi`, the trace and :math:`\log q` stay in full
            precision. ``None`` (default): the particles' dtype throughout. Autocast leaves float64
            tensors alone: with float64 particles and energy the option changes nothing.

    Checks and warnings synchronise with the device once per call, after the last step, not per step. Under
    :func:`torch.compile` or CUDA-graph capture both are left out of the graph (they would break it): the caller
    checks the outputs after the call (:meth:`warn_if_not_invertible` on the step ratios, ``isfinite`` on the
    results).

    Examples:
        >>> stein = SteinEntropy(RBFKernel(), step_size=0.1, num_steps=3)
        >>> particles, log_q0 = torch.randn(5, 10, 2), torch.zeros(5, 10)
        >>> out = stein.sample(lambda u: -0.5 * u.square().sum(-1), particles, log_q0)  # target N(0, I)
        >>> out.particles.shape, out.log_prob.shape, out.step_ratio.shape
        (torch.Size([5, 10, 2]), torch.Size([5, 10]), torch.Size([3]))
    """

    def __init__(
        self,
        kernel: RBFKernel,
        step_size: float,
        num_steps: int,
        *,
        exact: bool = False,
        max_step_ratio: float | None = None,
        warn_ratio: float | None = 1.0,
        check_finite: bool = True,
        score_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(kernel, RBFKernel):
            raise TypeError(f"SteinEntropy: kernel must be an RBFKernel, got {type(kernel).__name__}.")
        if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"SteinEntropy: step_size must be a positive finite number, got {step_size!r}.")
        if not (isinstance(num_steps, int) and num_steps >= 0):
            raise ValueError(f"SteinEntropy: num_steps must be a non-negative int, got {num_steps!r}.")
        if max_step_ratio is not None and not max_step_ratio > 0:
            raise ValueError(f"SteinEntropy: max_step_ratio must be > 0 or None, got {max_step_ratio!r}.")
        if score_dtype not in MIXED_PRECISION_DTYPES:
            raise ValueError(f"SteinEntropy: score_dtype must be one of {MIXED_PRECISION_DTYPES}, got {score_dtype!r}.")
        self.kernel = kernel
        self.score_dtype = score_dtype
        self.step_size = float(step_size)
        self.num_steps = num_steps
        self.exact = exact
        self.max_step_ratio = max_step_ratio
        self.warn_ratio = warn_ratio
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        precision = "" if self.score_dtype is None else f", score_dtype={self.score_dtype}"
        return f"step_size={self.step_size}, num_steps={self.num_steps}, exact={self.exact}{precision}"

    def forward(
        self,
        log_density: LogDensity | None,
        particles: torch.Tensor,
        log_q0: torch.Tensor,
        *,
        score_fn: ScoreFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.sample(log_density, particles, log_q0, score_fn=score_fn)
        return out.particles, out.log_prob

    def entropy(
        self,
        log_density: LogDensity | None,
        particles: torch.Tensor,
        log_q0: torch.Tensor,
        *,
        score_fn: ScoreFn | None = None,
    ) -> torch.Tensor:
        r"""Entropy estimate :math:`-\frac1m\sum_i \log q^L(u_i^L)` per state, ``[*batch]``."""
        return -self.sample(log_density, particles, log_q0, score_fn=score_fn).log_prob.mean(-1)

    def _check_inputs(self, particles: torch.Tensor, log_q0: torch.Tensor) -> None:
        if particles.ndim < 2:
            raise ValueError(f"particles must be shaped [*batch, m, d], got shape {tuple(particles.shape)}.")
        if particles.shape[-2] < 2:
            raise ValueError(f"SVGD needs m >= 2 particles per state, got m={particles.shape[-2]}.")
        if log_q0.shape != particles.shape[:-1]:
            raise ValueError(
                f"log_q0 must have shape {tuple(particles.shape[:-1])} (particles without the last dim), "
                f"got {tuple(log_q0.shape)}."
            )

    def _raise_if_not_finite(self, names: tuple[str, ...], finite: list[torch.Tensor]) -> None:
        """``finite[step][j]`` tells whether ``names[j]`` was finite after that step; one synchronisation."""
        flags = torch.stack(finite)  # [steps, len(names)]
        if flags.all():
            return
        step, index = (~flags).nonzero()[0].tolist()
        raise SVGDNumericalError(
            f"SVGD step {step} of {self.num_steps}: non-finite values in the {names[index]} "
            f"(step_size={self.step_size}, kernel={self.kernel.extra_repr()})."
        )

    def _score(
        self, log_density: LogDensity | None, score_fn: ScoreFn | None, particles: torch.Tensor, create_graph: bool
    ) -> torch.Tensor:
        """The score at ``particles``, evaluated in ``score_dtype`` when set and returned in the particles' dtype.

        A ``score_fn`` runs whole under autocast (it is a forward computation); with a ``log_density`` only its
        forward pass does, and autograd takes the gradient outside autocast, as PyTorch recommends.
        """
        if self.score_dtype is None:
            return score(log_density, particles, create_graph) if score_fn is None else score_fn(particles)
        low_precision = torch.autocast(particles.device.type, dtype=self.score_dtype)
        if score_fn is not None:
            with low_precision:
                return score_fn(particles).to(particles.dtype)

        def low_precision_log_density(u: torch.Tensor) -> torch.Tensor:
            with low_precision:
                return log_density(u).to(u.dtype)

        return score(low_precision_log_density, particles, create_graph)

    def sample(
        self,
        log_density: LogDensity | None,
        particles: torch.Tensor,
        log_q0: torch.Tensor | None,
        *,
        score_fn: ScoreFn | None = None,
    ) -> SteinOutput:
        r"""Like :meth:`forward`, also returning the invertibility diagnostic.

        Only the score :math:`\nabla_u \log p` enters SVGD and the trace. It is taken
        from ``log_density`` by autograd, or given directly by ``score_fn``
        (``[*batch, m, d] -> [*batch, m, d]``), for instance in closed form, which
        avoids a double backward when a loss differentiates through the sampler.

        With ``log_q0=None`` only the particles are moved (no trace, ``log_prob`` is
        ``None``): the cheap path for acting.
        """
        track_density = log_q0 is not None
        self._check_inputs(particles, log_q0 if track_density else particles[..., 0])
        if (log_density is None) == (score_fn is None):
            raise ValueError("SteinEntropy: pass exactly one of log_density and score_fn.")
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            particles = particles.detach()
            log_q0 = log_q0.detach() if track_density else None
        log_q, ratios, capped, finite = log_q0, [], [], []
        checked_names = ("score", "particles", "log_density") if track_density else ("score", "particles")
        # Compiled / captured callers check their outputs afterwards; eager calls check every step's tensors, on the
        # host once.
        in_graph = recording_graph()
        check_finite = self.check_finite and not in_graph
        for step in range(self.num_steps):
            grad = self._score(log_density, score_fn, particles, create_graph)
            if grad.shape != particles.shape:
                raise ValueError(
                    f"score_fn must return the particles' shape {tuple(particles.shape)}, got {tuple(grad.shape)}."
                )
            kernel = self.kernel(particles)
            phi = svgd_direction(kernel, grad)
            length_scale = kernel.bandwidth.sqrt().squeeze(-1)  # [*batch, 1]
            ratio = (self.step_size * phi.detach().norm(dim=-1) / length_scale).amax(-1)  # [*batch]
            step_size = torch.full_like(ratio, self.step_size)  # one per state: [*batch]
            if self.max_step_ratio is not None:
                shrink = (self.max_step_ratio / ratio).clamp(max=1.0)
                step_size, ratio = step_size * shrink, ratio * shrink
                capped.append((shrink < 1).float().mean() if shrink.numel() else shrink.new_zeros(()))
            else:
                capped.append(ratio.new_zeros(()))
            if track_density:
                if self.exact:
                    log_det = exact_log_det(kernel, particles, grad, step_size)
                else:
                    log_det = step_size.unsqueeze(-1) * stein_trace(kernel, grad)
                log_q = log_q - log_det
                if not create_graph:
                    log_q = log_q.detach()
            particles = particles + step_size[..., None, None] * phi
            if not create_graph:
                particles = particles.detach()
            if check_finite:
                checked = (grad, particles, log_q) if track_density else (grad, particles)
                finite.append(torch.stack([torch.isfinite(value).all() for value in checked]))
            ratios.append(ratio.max() if ratio.numel() else ratio.new_zeros(()))
        if finite:
            self._raise_if_not_finite(checked_names, finite)
        step_ratio = torch.stack(ratios) if ratios else particles.new_zeros(0)
        capped_fraction = torch.stack(capped) if capped else particles.new_zeros(0)
        if not in_graph:
            self.warn_if_not_invertible(step_ratio, stacklevel=3)
        return SteinOutput(particles, log_q, step_ratio, capped_fraction)

    def warn_if_not_invertible(self, step_ratio: torch.Tensor, stacklevel: int = 2) -> None:
        """Warn when a step ratio (any shape) exceeds ``warn_ratio``: one host synchronisation.

        :meth:`sample` calls it in eager mode. A data-dependent branch breaks a :func:`torch.compile` graph (and a
        CUDA graph cannot synchronise), so there it is skipped, and the caller calls it on the step ratios it
        returns, after the call.
        """
        if self.warn_ratio is not None and step_ratio.numel() and step_ratio.max() > self.warn_ratio:
            warnings.warn(
                f"SVGD invertibility condition violated: a step moved a particle by "
                f"{step_ratio.max().item():.3g} kernel length scales (warn_ratio={self.warn_ratio}); "
                "the closed-form log-density is unreliable. Reduce step_size or set max_step_ratio.",
                stacklevel=stacklevel,
            )
