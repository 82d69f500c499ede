"""The closed-form Stein entropy at the action dimensions of the MuJoCo tasks, with the actor's own settings.

    python sota-implementations/entropy_dimensions.py --out results/entropy

Per dimension d = 3, 6, 8, 17 (Hopper; HalfCheetah and Walker2d; Ant; Humanoid) and per sampler
setting (the actor's m = 10, L = 3, eps = 0.1, median bandwidth, step cap 0.5; then more particles,
more steps, the release's mean bandwidth rule), SVGD runs in many independent states toward a
Gaussian target N(mu*, diag s*^2) of known entropy H*, from two starts: q0 = N(0, 0.5^2 I) (a q0 that
does not match the target) and q0 = the target itself (a perfectly trained q0: SVGD should then
leave the particles' distribution, and its entropy, unchanged).

Three numbers per case, all in nats:
- the closed-form estimate: -mean_i log q^L(u_i^L), averaged over states (what S2AC uses);
- the entropy of the particles' actual distribution (the marginal of one particle u_i^L, pooled over
  the independent states): by a Gaussian fit (an upper bound: the Gaussian has the largest entropy
  for its covariance) and by the Kozachenko-Leonenko k-NN estimate;
- the target's H*.
Estimate minus the actual entropy is the estimator's error; actual minus H* is how far L steps get.
Writes ``dimensions.md`` into --out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from torchrl_s2ac import RBFKernel, SteinEntropy, knn_entropy

DIMS = {3: "Hopper", 6: "HalfCheetah, Walker2d", 8: "Ant", 17: "Humanoid"}
SETTINGS = [  # (label, m, L, kernel rule)
    ("actor: m=10, L=3, median", 10, 3, "median"),
    ("m=10, L=3, mean rule", 10, 3, "mean"),
    ("m=50, L=3, median", 50, 3, "median"),
    ("m=10, L=10, median", 10, 10, "median"),
    ("m=10, L=30, median", 10, 30, "median"),
]
STEP_SIZE, MAX_STEP_RATIO, INIT_STD = 0.1, 0.5, 0.5


def gaussian_fit_entropy(samples: torch.Tensor) -> float:
    """Entropy of the Gaussian with the samples' covariance, ``samples [n, d]``."""
    cov = torch.cov(samples.T.double())
    d = samples.shape[-1]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + torch.logdet(cov).item())


def run(dim: int, m: int, num_steps: int, rule: str, matched_start: bool, states: int, generator) -> dict:
    loc = 0.5 * torch.randn(dim, generator=generator, dtype=torch.float64)
    scale = torch.exp(
        torch.empty(dim, dtype=torch.float64).uniform_(math.log(0.15), math.log(0.6), generator=generator)
    )
    target_entropy = 0.5 * dim * math.log(2 * math.pi * math.e) + scale.log().sum().item()

    def score(u: torch.Tensor) -> torch.Tensor:
        return -(u - loc) / scale.square()

    start_loc, start_scale = (
        (loc, scale) if matched_start else (torch.zeros_like(loc), torch.full_like(scale, INIT_STD))
    )
    u0 = start_loc + start_scale * torch.randn(states, m, dim, generator=generator, dtype=torch.float64)
    log_q0 = torch.distributions.Normal(start_loc, start_scale).log_prob(u0).sum(-1)
    stein = SteinEntropy(RBFKernel(rule=rule), STEP_SIZE, num_steps, max_step_ratio=MAX_STEP_RATIO, warn_ratio=None)
    with torch.no_grad():
        out = stein.sample(None, u0, log_q0, score_fn=score)
    pooled = out.particles.reshape(-1, dim)
    return {
        "estimate": -out.log_prob.mean().item(),
        "gaussian_fit": gaussian_fit_entropy(pooled),
        "knn": knn_entropy(pooled[torch.randperm(len(pooled), generator=generator)[:4000]]).item(),
        "target": target_entropy,
        "start": -log_q0.mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/entropy"))
    parser.add_argument("--states", type=int, default=1000, help="independent states (SVGD systems) per case")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Stein entropy at the MuJoCo action dimensions, actor settings",
        "",
        f"Command: `python sota-implementations/entropy_dimensions.py --states {args.states}`. Gaussian targets "
        f"N(mu*, diag s*^2), s* log-uniform in [0.15, 0.6]; eps = {STEP_SIZE}, step cap {MAX_STEP_RATIO}; "
        f"{args.states} independent states per case, float64. 'actual': entropy of the particles' distribution "
        "after L steps (Gaussian fit, an upper bound / k-NN from 4000 pooled particles). "
        "Error = estimate - actual (Gaussian fit).",
        "",
    ]
    for matched in (False, True):
        start = "q0 = the target (a trained q0)" if matched else f"q0 = N(0, {INIT_STD}^2 I)"
        lines += [
            f"## Start: {start}",
            "",
            "| d (task) | setting | H(q0) | closed-form estimate | actual: Gaussian fit / k-NN | target H* | "
            "error of the estimate |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for dim, tasks in DIMS.items():
            for label, m, num_steps, rule in SETTINGS:
                generator = torch.Generator().manual_seed(dim)  # the same target for every setting
                r = run(dim, m, num_steps, rule, matched, args.states, generator)
                lines.append(
                    f"| {dim} ({tasks}) | {label} | {r['start']:.2f} | {r['estimate']:.2f} | "
                    f"{r['gaussian_fit']:.2f} / {r['knn']:.2f} | {r['target']:.2f} | "
                    f"{r['estimate'] - r['gaussian_fit']:+.2f} |"
                )
        lines.append("")
    (args.out / "dimensions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
