"""Losses: S2AC."""

from torchrl_s2ac.objectives.s2ac import S2ACLoss

__all__ = ["S2ACLoss"]
