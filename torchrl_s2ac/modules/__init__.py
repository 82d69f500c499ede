"""TensorDict modules: the SVGD actor, the amortized sampler, the critic ensembles and the temperature."""

from torchrl_s2ac.modules.actor import ParticleChoice, ParticleSample, SVGDActor
from torchrl_s2ac.modules.critic import CriticEnsemble, SoftQCritic
from torchrl_s2ac.modules.sampler import AmortizedSample, AmortizedSampler
from torchrl_s2ac.modules.temperature import Temperature

__all__ = [
    "AmortizedSample",
    "AmortizedSampler",
    "CriticEnsemble",
    "ParticleChoice",
    "ParticleSample",
    "SVGDActor",
    "SoftQCritic",
    "Temperature",
]
