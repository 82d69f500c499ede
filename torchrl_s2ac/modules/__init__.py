"""TensorDict modules: the SVGD actor and the soft Q critic ensemble."""

from torchrl_s2ac.modules.actor import ParticleSample, SVGDActor, SVGDPolicy
from torchrl_s2ac.modules.critic import SoftQCritic

__all__ = ["ParticleSample", "SVGDActor", "SVGDPolicy", "SoftQCritic"]
