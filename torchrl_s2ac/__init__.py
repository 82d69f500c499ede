"""S2AC (Stein Soft Actor-Critic) as TorchRL components."""

from torchrl_s2ac.kernels import KernelMatrix, RBFKernel
from torchrl_s2ac.stein import (
    SteinEntropy,
    SteinOutput,
    SVGDNumericalError,
    describe_device,
    exact_log_det,
    has_bf16_matmul,
    stein_trace,
    svgd_direction,
)
from torchrl_s2ac.finite import NonFiniteError, first_non_finite
from torchrl_s2ac.distributions import TanhSquash, knn_entropy, sample_truncated_normal
from torchrl_s2ac.modules import (
    AmortizedSample,
    AmortizedSampler,
    CriticEnsemble,
    ParticleChoice,
    ParticleSample,
    SoftQCritic,
    SVGDActor,
    Temperature,
)
from torchrl_s2ac.objectives import S2ACLoss, SoftQCriticLoss, SQLLoss

__version__ = "0.1.0"

__all__ = [
    "KernelMatrix",
    "RBFKernel",
    "SteinEntropy",
    "SteinOutput",
    "SVGDNumericalError",
    "NonFiniteError",
    "first_non_finite",
    "exact_log_det",
    "has_bf16_matmul",
    "describe_device",
    "stein_trace",
    "svgd_direction",
    "TanhSquash",
    "knn_entropy",
    "sample_truncated_normal",
    "AmortizedSample",
    "AmortizedSampler",
    "CriticEnsemble",
    "ParticleChoice",
    "ParticleSample",
    "SoftQCritic",
    "SVGDActor",
    "Temperature",
    "S2ACLoss",
    "SoftQCriticLoss",
    "SQLLoss",
]
