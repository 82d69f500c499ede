"""The closed-form Stein log-density against autograd, closed forms and known entropies."""

import math
from pathlib import Path

import pytest
import torch
from torch._inductor import config as inductor_config

from torchrl_s2ac import (
    RBFKernel,
    SteinEntropy,
    SVGDNumericalError,
    describe_device,
    exact_log_det,
    has_bf16_matmul,
    knn_entropy,
    sample_truncated_normal,
    stein_trace,
    svgd_direction,
)
from torchrl_s2ac.stein import score

DT = torch.float64


def banana(u):
    """A non-quadratic log-density."""
    x, rest = u[..., 0], u[..., 1:]
    return -0.5 * x.square() - 0.5 * (rest - torch.sin(x).unsqueeze(-1)).square().sum(-1) - 0.1 * u.pow(4).sum(-1)


def phi_others_reference(x, i, particles, scores, h):
    """phi restricted to j != i, written with an explicit loop over the other particles."""
    m = particles.shape[0]
    total = torch.zeros_like(x)
    for j in range(m):
        if j == i:
            continue
        k = torch.exp(-(particles[j] - x).square().sum() / (2 * h))
        grad_k = k * (x - particles[j]) / h  # grad_{u_j} k(u_j, x)
        total = total + k * scores[j] + grad_k
    return total / m


@pytest.mark.parametrize("m,d", [(2, 1), (3, 2), (5, 3), (8, 4)])
@pytest.mark.parametrize("sigma", [0.7, None])
def test_trace_matches_autograd_jacobian(m, d, sigma):
    u = torch.randn(2, m, d, dtype=DT)
    s = score(banana, u, create_graph=False)
    kernel = RBFKernel(sigma=sigma)(u)
    closed = stein_trace(kernel, s)
    for b in range(u.shape[0]):
        h = kernel.bandwidth[b].squeeze()
        for i in range(m):
            jac = torch.autograd.functional.jacobian(lambda x: phi_others_reference(x, i, u[b], s[b], h), u[b, i])
            torch.testing.assert_close(closed[b, i], torch.trace(jac), rtol=1e-10, atol=1e-12)


def test_svgd_direction_matches_definition():
    u = torch.randn(3, 6, 2, dtype=DT)
    s = score(banana, u, create_graph=False)
    kernel = RBFKernel(sigma=1.3)(u)
    phi = svgd_direction(kernel, s)
    h = 1.3**2
    for b in range(3):
        for i in range(6):
            expected = (
                sum(
                    math.exp(-(u[b, j] - u[b, i]).square().sum().item() / (2 * h)) * (s[b, j] + (u[b, i] - u[b, j]) / h)
                    for j in range(6)
                )
                / 6
            )
            torch.testing.assert_close(phi[b, i], expected)


def test_exact_log_det_matches_reference_jacobian():
    u = torch.randn(4, 3, dtype=DT)
    s = score(banana, u, create_graph=False)
    kernel = RBFKernel(sigma=0.9)(u)
    eps = 0.05
    exact = exact_log_det(kernel, u, s, torch.tensor(eps, dtype=DT))
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda x: phi_others_reference(x, i, u, s, 0.81), u[i])
        torch.testing.assert_close(exact[i], torch.logdet(torch.eye(3, dtype=DT) + eps * jac))


def test_closed_form_log_density_error_is_second_order_in_step_size():
    u0 = torch.randn(2, 6, 3, dtype=DT)
    log_q0 = torch.zeros(2, 6, dtype=DT)
    errors = []
    for eps in (0.08, 0.04, 0.02):
        kwargs = dict(warn_ratio=None)
        _, closed = SteinEntropy(RBFKernel(sigma=1.0), eps, 4, **kwargs)(banana, u0, log_q0)
        _, exact = SteinEntropy(RBFKernel(sigma=1.0), eps, 4, exact=True, **kwargs)(banana, u0, log_q0)
        errors.append((closed - exact).abs().max().item())
    assert errors[0] > 0
    # Halving eps divides an O(eps^2) error by about 4.
    assert errors[1] / errors[0] == pytest.approx(0.25, abs=0.07)
    assert errors[2] / errors[1] == pytest.approx(0.25, abs=0.07)


def gaussian_target():
    mean = torch.tensor([-0.6871, 0.8010], dtype=DT)
    cov = 5 * torch.tensor([[0.2260, 0.1652], [0.1652, 0.6779]], dtype=DT)
    return torch.distributions.MultivariateNormal(mean, cov)


def test_svgd_moves_particles_to_gaussian_target():
    target = gaussian_target()
    u0 = 2.0 * torch.randn(1, 150, 2, dtype=DT) + 3.0
    stein = SteinEntropy(RBFKernel(sigma=2.0), 0.3, 400, warn_ratio=None)
    with torch.no_grad():
        u, _ = stein(target.log_prob, u0, torch.zeros(1, 150, dtype=DT))
    torch.testing.assert_close(u[0].mean(0), target.mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(u[0].T), target.covariance_matrix, atol=0.35, rtol=0.2)


def test_entropy_of_gaussian_target():
    target = gaussian_target()
    truth = target.entropy().item()
    assert truth == pytest.approx(3.411, abs=1e-3)
    u0 = math.sqrt(6) * torch.randn(2, 200, 2, dtype=DT)
    log_q0 = torch.distributions.Normal(0.0, math.sqrt(6)).log_prob(u0).sum(-1)
    stein = SteinEntropy(RBFKernel(sigma=5.0), 0.5, 200, warn_ratio=None)
    with torch.no_grad():
        entropy = stein.entropy(target.log_prob, u0, log_q0)
    assert entropy.shape == (2,)
    assert entropy.mean().item() == pytest.approx(truth, abs=0.15)


@pytest.mark.parametrize("components", [2, 4])
def test_entropy_of_gaussian_mixture(components):
    generator = torch.Generator().manual_seed(components)
    means = 3.0 * torch.randn(components, 2, generator=generator, dtype=DT) / math.sqrt(2)
    target = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(components, dtype=DT)),
        torch.distributions.Independent(torch.distributions.Normal(means, torch.ones_like(means)), 1),
    )
    # Ground truth by Monte Carlo with the (correctly normalised) mixture density.
    truth = -target.log_prob(target.sample((400_000,))).mean().item()
    u0 = math.sqrt(6) * torch.randn(1, 200, 2, dtype=DT)
    log_q0 = torch.distributions.Normal(0.0, math.sqrt(6)).log_prob(u0).sum(-1)
    stein = SteinEntropy(RBFKernel(sigma=3.0), 0.5, 200, warn_ratio=None)
    with torch.no_grad():
        entropy = stein.entropy(target.log_prob, u0, log_q0)
    assert entropy.item() == pytest.approx(truth, abs=0.15)


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(batch, dtype):
    u0 = torch.randn(*batch, 5, 3, dtype=dtype)
    log_q0 = torch.zeros(*batch, 5, dtype=dtype)
    stein = SteinEntropy(RBFKernel(), 0.1, 3)
    out = stein.sample(banana, u0, log_q0)
    assert out.particles.shape == u0.shape and out.particles.dtype == dtype
    assert out.log_prob.shape == log_q0.shape and out.log_prob.dtype == dtype
    assert out.step_ratio.shape == (3,)
    # Batched states are independent: each equals its own run.
    if batch:
        flat_u, flat_q = u0.reshape(-1, 5, 3), log_q0.reshape(-1, 5)
        alone = stein.sample(banana, flat_u[:1], flat_q[:1])
        torch.testing.assert_close(out.particles.reshape(-1, 5, 3)[:1], alone.particles)
        torch.testing.assert_close(out.log_prob.reshape(-1, 5)[:1], alone.log_prob)


def test_gradient_through_all_steps_matches_finite_differences():
    z = torch.randn(2, 4, 2, dtype=DT)
    stein = SteinEntropy(RBFKernel(sigma=1.0), 0.1, 3, warn_ratio=None)

    def entropy(loc, log_scale):
        u0 = loc.unsqueeze(-2) + log_scale.exp().unsqueeze(-2) * z
        log_q0 = torch.distributions.Normal(loc.unsqueeze(-2), log_scale.exp().unsqueeze(-2)).log_prob(u0).sum(-1)
        return stein.entropy(banana, u0, log_q0)

    loc = torch.randn(2, 2, dtype=DT, requires_grad=True)
    log_scale = (0.3 * torch.randn(2, 2, dtype=DT)).requires_grad_(True)
    assert torch.autograd.gradcheck(entropy, (loc, log_scale))


def test_no_graph_kept_under_no_grad():
    loc = torch.zeros(3, 2, requires_grad=True)
    with torch.no_grad():
        u, log_q = SteinEntropy(RBFKernel(), 0.1, 3)(banana, loc.unsqueeze(-2).expand(3, 4, 2), torch.zeros(3, 4))
    assert not u.requires_grad and not log_q.requires_grad


def test_score_fn_equals_autograd_score():
    u0 = torch.randn(3, 5, 2, dtype=DT)
    stein = SteinEntropy(RBFKernel(), 0.1, 3)

    def score_fn(u):
        return score(banana, u, create_graph=torch.is_grad_enabled())

    a = stein.sample(banana, u0, torch.zeros(3, 5, dtype=DT))
    b = stein.sample(None, u0, torch.zeros(3, 5, dtype=DT), score_fn=score_fn)
    torch.testing.assert_close(a.particles, b.particles)
    torch.testing.assert_close(a.log_prob, b.log_prob)


def test_max_step_ratio_caps_displacement():
    u0 = 0.01 * torch.randn(2, 6, 2)
    steep = lambda u: -50 * (u - 3).square().sum(-1)  # noqa: E731
    with pytest.warns(UserWarning, match="invertibility"):
        uncapped = SteinEntropy(RBFKernel(), 0.1, 2).sample(steep, u0, torch.zeros(2, 6))
    assert uncapped.step_ratio.max() > 1
    capped = SteinEntropy(RBFKernel(), 0.1, 2, max_step_ratio=0.5)
    kernel = RBFKernel()(u0)
    u1, _ = SteinEntropy(RBFKernel(), 0.1, 1, max_step_ratio=0.5)(steep, u0, torch.zeros(2, 6))
    moved = (u1 - u0).norm(dim=-1).amax(-1) / kernel.bandwidth.sqrt().reshape(-1)
    assert (moved <= 0.5 + 1e-4).all()
    assert torch.isfinite(capped.sample(steep, u0, torch.zeros(2, 6)).log_prob).all()


def test_truncated_normal_sampler():
    loc = torch.tensor([[1.0, -2.0]])
    scale = torch.tensor([[0.5, 2.0]])
    u, log_q = sample_truncated_normal(loc, scale, 200_000)
    assert u.shape == (1, 200_000, 2) and log_q.shape == (1, 200_000)
    z = (u - loc.unsqueeze(-2)) / scale.unsqueeze(-2)
    assert z.abs().max() <= 3.0 + 1e-5
    # Standard normal truncated to [-3, 3]: variance 1 - 6 phi(3) / Z.
    mass = math.erf(3 / math.sqrt(2))
    variance = 1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / mass
    assert z.std(dim=1).squeeze().tolist() == pytest.approx([math.sqrt(variance)] * 2, abs=5e-3)
    expected = torch.distributions.Normal(loc.unsqueeze(-2), scale.unsqueeze(-2)).log_prob(u).sum(-1) - 2 * math.log(
        mass
    )
    torch.testing.assert_close(log_q, expected, rtol=1e-5, atol=1e-4)


def test_kernel_bandwidth_rules():
    u = torch.randn(3, 7, 2, dtype=DT)
    sq = torch.stack([torch.pdist(x).square() for x in u])  # the m (m - 1) / 2 pairs i < j
    median = RBFKernel(rule="median")(u).bandwidth.reshape(-1)
    # torch.median of the doubled list (i != j) is the lower median of the i < j pairs.
    torch.testing.assert_close(median, sq.sort(-1).values[:, (sq.shape[-1] - 1) // 2] / (2 * math.log(8)))
    mean = RBFKernel(rule="mean")(u).bandwidth.reshape(-1)
    torch.testing.assert_close(mean, (2 * sq.sum(-1) / 49) / 2 / (2 * math.log(8)))
    fixed = RBFKernel(sigma=0.5)(u)
    torch.testing.assert_close(fixed.bandwidth.reshape(-1), torch.full((3,), 0.25, dtype=DT))
    torch.testing.assert_close(fixed.value, torch.exp(-torch.cdist(u, u).square() / 0.5))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: RBFKernel(sigma=0.0), "sigma"),
        (lambda: RBFKernel(sigma=-1.0), "sigma"),
        (lambda: RBFKernel(rule="mode"), "rule"),
        (lambda: SteinEntropy(RBFKernel(), 0.0, 3), "step_size"),
        (lambda: SteinEntropy(RBFKernel(), -0.1, 3), "step_size"),
        (lambda: SteinEntropy(RBFKernel(), 0.1, -1), "num_steps"),
        (lambda: SteinEntropy(RBFKernel(), 0.1, 3, score_dtype=torch.int8), "score_dtype"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    stein = SteinEntropy(RBFKernel(), 0.1, 2)
    with pytest.raises(ValueError, match="m >= 2"):
        stein(banana, torch.randn(3, 1, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="log_q0 must have shape"):
        stein(banana, torch.randn(3, 4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="log_density must map"):
        stein(lambda u: u.sum(), torch.randn(3, 4, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="exactly one"):
        stein(None, torch.randn(3, 4, 2), torch.zeros(3, 4))


def test_non_finite_values_name_the_step():
    def explodes(u):
        # Finite at the start, NaN once particles have moved.
        return -(u - 100).square().sum(-1) + torch.sqrt(10 - u.abs().amax(-1))

    stein = SteinEntropy(RBFKernel(), 0.5, 5, warn_ratio=None)
    with pytest.raises(SVGDNumericalError, match=r"SVGD step \d+ of 5: non-finite"):
        stein(explodes, torch.randn(2, 4, 2), torch.zeros(2, 4))


def test_knn_entropy_matches_closed_forms():
    """Kozachenko-Leonenko estimate vs exact entropies: a correlated Gaussian (d=2) and a uniform box (d=3)."""
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov)
    estimate = knn_entropy(gaussian.sample((4, 3000)))  # four independent sets
    assert estimate.shape == (4,)
    assert (estimate - gaussian.entropy()).abs().max() < 0.08
    box = torch.rand(3000, 3, dtype=torch.float64) * torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    assert knn_entropy(box) == pytest.approx(math.log(2.0 * 0.5 * 1.0), abs=0.1)
    with pytest.raises(ValueError, match="k must be in"):
        knn_entropy(torch.randn(5, 2), k=5)
    # A narrow sample far from the origin (a collapsed policy near a bound): the estimate does not move with it.
    narrow = 0.01 * torch.randn(200, 2)
    assert knn_entropy(narrow + 10.0).item() == pytest.approx(knn_entropy(narrow).item(), abs=2e-3)


def test_truncated_normal_sampler_compiles_without_graph_breaks():
    explanation = torch._dynamo.explain(sample_truncated_normal)(torch.zeros(4, 3), torch.ones(4, 3), 10)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_truncated_normal_draws_are_fresh_per_call_and_as_eager():
    """The inverse CDF is one opaque operator under torch.compile: two same-shaped draws in one graph (the
    actor's and the target's particles) must stay independent, and with eager random numbers
    (``fallback_random``) the compiled draws equal the eager ones."""

    def two_draws(loc, scale):
        return sample_truncated_normal(loc, scale, 10)[0], sample_truncated_normal(loc, scale, 10)[0]

    loc, scale = torch.zeros(4, 3), torch.ones(4, 3)
    with inductor_config.patch(fallback_random=True):
        draws = []
        for fn in (two_draws, torch.compile(two_draws)):
            torch.manual_seed(0)
            draws.append(fn(loc, scale))
    (eager_first, eager_second), (compiled_first, compiled_second) = draws
    assert not torch.equal(compiled_first, compiled_second)
    torch.testing.assert_close(compiled_first, eager_first)
    torch.testing.assert_close(compiled_second, eager_second)


@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_truncated_normal_icdf_is_computed_inside_the_compiled_graph(cpp_wrapper):
    """Inductor lowers the inverse CDF into one kernel whose result it stores: the compiled code never calls the
    operator's Python kernel back (a proxy call per draw with the C++ wrapper), and its values are the eager
    ones."""
    from torch._inductor.utils import run_and_get_code

    from torchrl_s2ac.distributions import truncated_normal_icdf

    def draws_squared(v):
        z = truncated_normal_icdf(v, 3.0)
        return (z.unsqueeze(-2) - z.unsqueeze(-3)).square().sum(-1)  # read 2 m times, as the kernel matrix does

    v = torch.rand(4, 10, 3, dtype=torch.float64)
    v[0, 0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # the clamped ends and the centre
    compiled = torch.compile(draws_squared, fullgraph=True, options={"cpp_wrapper": cpp_wrapper})
    with inductor_config.patch(fx_graph_cache=False):  # a graph cached before the lowering would hide it
        out, code = run_and_get_code(compiled, v)
    assert not any("torchrl_s2ac.truncated_normal_icdf" in source for source in code)
    kernels = [kernel for source in code for kernel in source.split('extern "C"')[1:]]
    assert sum("calc_ndtri" in kernel for kernel in kernels) == 1  # stored once, not inlined into each reader
    torch.testing.assert_close(out, draws_squared(v))


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo (Linux)")
def test_bf16_matmul_probe_agrees_with_the_cpu_flags():
    """``has_bf16_matmul("cpu")`` holds exactly when the kernel lists AVX-512 BF16 or AMX-BF16 for this CPU."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert has_bf16_matmul("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    # describe_device names the units the flags list, and says so when there are none
    description = describe_device("cpu")
    assert ("AMX" in description) == ("amx_bf16" in flags)
    assert ("AVX-512 BF16" in description) == ("avx512_bf16" in flags)
    assert description.endswith("none, bf16 emulated)") == (not {"avx512_bf16", "amx_bf16"} & flags)


def test_score_dtype_evaluates_only_the_score_in_low_precision():
    """bf16 score path: the score's matrix product runs in bf16 (autocast), everything after it in fp32, and the
    result stays within bf16's rounding of the fp32 one (Gaussian target with a full precision matrix)."""
    generator = torch.Generator().manual_seed(0)
    d = 4
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    precision = rotation @ torch.diag(torch.linspace(1.0, 6.0, d)) @ rotation.T
    u0 = 0.5 * torch.randn(64, 10, d, generator=generator)
    log_q0 = torch.distributions.Normal(0.0, 0.5).log_prob(u0).sum(-1)
    seen = []

    def score_fn(u):
        s = -u @ precision
        seen.append((u.dtype, s.dtype))
        return s

    results = {}
    for dtype in (None, torch.bfloat16):
        seen.clear()
        stein = SteinEntropy(RBFKernel(), 0.1, 3, max_step_ratio=0.5, score_dtype=dtype)
        results[dtype] = stein.sample(None, u0, log_q0, score_fn=score_fn)
        assert seen == [(torch.float32, torch.float32 if dtype is None else torch.bfloat16)] * 3
        assert results[dtype].particles.dtype == results[dtype].log_prob.dtype == torch.float32
    full, low = results[None], results[torch.bfloat16]
    assert not torch.equal(low.particles, full.particles)  # the option does change the arithmetic
    torch.testing.assert_close(low.particles, full.particles, rtol=0, atol=2e-3)
    torch.testing.assert_close(low.log_prob, full.log_prob, rtol=0, atol=2e-2)
