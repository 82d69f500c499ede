"""Losses: S2AC and the soft Q-learning baseline, on a shared soft TD(0) critic loss."""

from torchrl_s2ac.objectives.s2ac import S2ACLoss
from torchrl_s2ac.objectives.soft_q import SoftQLoss
from torchrl_s2ac.objectives.sql import SQLLoss

__all__ = ["S2ACLoss", "SoftQLoss", "SQLLoss"]
