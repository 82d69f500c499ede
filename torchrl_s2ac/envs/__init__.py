"""Environments: the multi-goal point mass, and reading rollouts."""

from torchrl_s2ac.envs.multigoal import LAYOUTS, OBSTACLES, PROBE_STATES, MultiGoalEnv, goal_hits
from torchrl_s2ac.envs.rollout import until_first_done

__all__ = ["LAYOUTS", "OBSTACLES", "PROBE_STATES", "MultiGoalEnv", "goal_hits", "until_first_done"]
