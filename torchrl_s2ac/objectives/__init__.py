"""Losses: S2AC and the soft Q-learning baseline, on a shared soft TD(0) critic loss."""

from torchrl_s2ac.objectives.critic_loss import SoftQCriticLoss
from torchrl_s2ac.objectives.s2ac import S2ACLoss
from torchrl_s2ac.objectives.sql import SQLLoss

__all__ = ["S2ACLoss", "SoftQCriticLoss", "SQLLoss"]
