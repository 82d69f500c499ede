r"""The multi-goal point-mass task (Haarnoja et al. 2017; S2AC §5), batched and written in torch.

State: position :math:`s \in [-7, 7]^2`, starting at the origin. Action: a velocity
:math:`a \in [-1, 1]^2` (clipped). Dynamics :math:`s' = \mathrm{clip}(s + a)`; a move
that crosses the obstacle segment (when enabled) is cancelled. Reward

.. math::
    r = -30\|a\|^2 - \min_g\|s' - g\|^2 + 10\cdot\mathbb 1[\min_g\|s' - g\| < \rho],

and reaching a goal terminates the episode. Episodes are truncated after 30 steps. The goal
radius :math:`\rho` is 0.5 in the S2AC paper and 1 in Haarnoja et al.'s release, which also
draws the start position from :math:`\mathcal N(0, 0.1^2 I)`.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from torchrl_s2ac.envs.rollout import until_first_done

__all__ = ["MultiGoalEnv", "LAYOUTS", "OBSTACLES", "PROBE_STATES", "goal_hits"]

LAYOUTS = {
    "four_goals": ((5.0, 0.0), (-5.0, 0.0), (0.0, 5.0), (0.0, -5.0)),
    "three_goals": ((5.0, 0.0), (-4.0, 3.0), (-4.0, -3.0)),
}
OBSTACLES = {"four_goals": ((-1.5, 3.0), (1.5, 3.0)), "three_goals": ((-2.0, 0.0), (0.0, 2.0))}
PROBE_STATES = ((-3.5, -2.5), (-2.5, 0.5), (-1.0, 0.0), (0.0, 0.0), (1.0, 0.0), (4.0, 0.0))
BOUND = 7.0
GOAL_RADIUS = 0.5
GOAL_REWARD = 10.0
ACTION_COST = 30.0


def _cross(o: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])


def segments_intersect(p: torch.Tensor, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether segment p->q (batched, ``[..., 2]``) crosses segment a-b (proper or touching)."""
    d1, d2 = _cross(a, b, p), _cross(a, b, q)
    d3, d4 = _cross(p, q, a), _cross(p, q, b)
    return (d1 * d2 <= 0) & (d3 * d4 <= 0) & ~((d1 == 0) & (d2 == 0))


class MultiGoalEnv(EnvBase):
    """Batched multi-goal environment.

    Args:
        layout (str): ``"four_goals"`` (the soft Q-learning paper) or ``"three_goals"`` (S2AC).
        obstacle (bool): add the layout's wall segment; a step crossing it is cancelled.
        max_steps (int): truncation horizon. Defaults to ``30``.
        goal_radius (float): distance :math:`\rho` at which a goal counts as reached. Defaults to ``0.5``.
        init_noise (float): standard deviation of the start position around the origin. Defaults to ``0``.
        batch_size: any batch shape. Defaults to ``()``.
    """

    def __init__(
        self,
        layout: str = "four_goals",
        obstacle: bool = False,
        max_steps: int = 30,
        goal_radius: float = GOAL_RADIUS,
        init_noise: float = 0.0,
        batch_size: torch.Size | tuple = (),
        device: torch.device | str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"MultiGoalEnv: layout must be one of {sorted(LAYOUTS)}, got {layout!r}.")
        if max_steps < 1:
            raise ValueError(f"MultiGoalEnv: max_steps must be >= 1, got {max_steps}.")
        if not goal_radius > 0:
            raise ValueError(f"MultiGoalEnv: goal_radius must be > 0, got {goal_radius}.")
        if not init_noise >= 0:
            raise ValueError(f"MultiGoalEnv: init_noise must be >= 0, got {init_noise}.")
        super().__init__(batch_size=torch.Size(batch_size), device=device)
        self.layout, self.obstacle, self.max_steps = layout, obstacle, max_steps
        self.goal_radius, self.init_noise = goal_radius, init_noise
        self.generator = torch.Generator()  # start noise is drawn on the CPU: the same starts on every device
        # Buffers, so that ``env.to(device)`` (a collector's ``env_device``) moves them with the specs.
        self.register_buffer("goals", torch.tensor(LAYOUTS[layout], device=self.device), persistent=False)
        wall = torch.tensor(OBSTACLES[layout], device=self.device) if obstacle else None
        self.register_buffer("wall", wall, persistent=False)
        shape = self.batch_size
        self.observation_spec = Composite(
            observation=Bounded(-BOUND, BOUND, (*shape, 2), device=self.device),
            step=Unbounded((*shape, 1), dtype=torch.int64, device=self.device),
            shape=shape,
        )
        self.action_spec = Bounded(-1.0, 1.0, (*shape, 2), device=self.device)
        self.reward_spec = Unbounded((*shape, 1), device=self.device)
        flag = Categorical(2, (*shape, 1), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=shape)

    def _reset(self, tensordict: TensorDictBase | None = None) -> TensorDict:
        # Fresh state everywhere; on a partial reset TorchRL keeps the entries whose "_reset" is False.
        shape = self.batch_size
        start = torch.zeros(*shape, 2, device=self.device)
        if self.init_noise:
            start = start + self.init_noise * torch.randn(start.shape, generator=self.generator).to(self.device)
        return TensorDict(
            {
                "observation": start,
                "step": torch.zeros(*shape, 1, dtype=torch.int64, device=self.device),
            },
            batch_size=shape,
            device=self.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        position = tensordict.get("observation")
        action = tensordict.get("action").clamp(-1.0, 1.0)
        proposed = (position + action).clamp(-BOUND, BOUND)
        if self.wall is not None:
            blocked = segments_intersect(position, proposed, self.wall[0], self.wall[1]).unsqueeze(-1)
            proposed = torch.where(blocked, position, proposed)
        distance = (proposed.unsqueeze(-2) - self.goals).norm(dim=-1).amin(-1, keepdim=True)
        reached = distance < self.goal_radius
        reward = -ACTION_COST * action.square().sum(-1, keepdim=True) - distance.square() + GOAL_REWARD * reached
        step = tensordict.get("step") + 1
        truncated = (step >= self.max_steps) & ~reached
        return TensorDict(
            {
                "observation": proposed,
                "step": step,
                "reward": reward,
                "terminated": reached,
                "truncated": truncated,
                "done": reached | truncated,
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        # The dynamics are deterministic; only the start position (init_noise) is random.
        if seed is not None:
            self.generator.manual_seed(seed)


def goal_hits(goals: torch.Tensor, rollout: TensorDictBase) -> torch.Tensor:
    """Which goal each episode of a ``[episodes, T]`` rollout reached first: ``[episodes, num_goals]`` booleans.

    An episode reaches a goal when it terminates (only goals terminate); the goal is the one
    nearest to the terminal position. Steps after an episode's first done are ignored.
    """
    reached = rollout.get(("next", "terminated")).squeeze(-1) & until_first_done(rollout)  # one step at most
    position = rollout.get(("next", "observation"))
    nearest = (position.unsqueeze(-2) - goals).norm(dim=-1).argmin(-1)  # [episodes, T]
    return (torch.nn.functional.one_hot(nearest, len(goals)).bool() & reached.unsqueeze(-1)).any(-2)
