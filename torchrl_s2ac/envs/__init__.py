"""Environments: the multi-goal point mass."""

from torchrl_s2ac.envs.multigoal import LAYOUTS, OBSTACLES, PROBE_STATES, MultiGoalEnv

__all__ = ["LAYOUTS", "OBSTACLES", "PROBE_STATES", "MultiGoalEnv"]
