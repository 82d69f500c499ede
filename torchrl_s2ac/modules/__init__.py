"""TensorDict modules: the SVGD actor, the amortized sampler and the soft Q critic ensemble."""

from torchrl_s2ac.modules.actor import ParticleSample, SVGDActor, SVGDPolicy
from torchrl_s2ac.modules.critic import SoftQCritic
from torchrl_s2ac.modules.sampler import AmortizedSample, AmortizedSampler

__all__ = ["AmortizedSample", "AmortizedSampler", "ParticleSample", "SVGDActor", "SVGDPolicy", "SoftQCritic"]
