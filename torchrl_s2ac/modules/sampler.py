r"""Amortized sampler :math:`a = \mathrm{squash}(f_\psi(s, \xi))`: one network pass per action.

SQL's policy (Haarnoja et al., 2017) and S2AC's fast-inference variant are both
a network that maps a state and a noise draw to an action; what differs is how
:math:`f_\psi` is trained (:class:`~torchrl_s2ac.SQLLoss` follows the SVGD
direction; :class:`~torchrl_s2ac.S2ACLoss` regresses onto the SVGD particles).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import TensorSpec
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.modules import MLP

from torchrl_s2ac.distributions import TanhSquash, sample_truncated_normal

__all__ = ["AmortizedSample", "AmortizedSampler"]


class AmortizedSample(NamedTuple):
    """Draws of an :class:`AmortizedSampler`.

    Attributes:
        action: :math:`a = \\mathrm{squash}(u)`, ``[*batch, n, d]``.
        unsquashed: :math:`u = f_\\psi(s, \\xi)`, ``[*batch, n, d]``.
        noise: :math:`\\xi`, ``[*batch, n, d]``.
    """

    action: torch.Tensor
    unsquashed: torch.Tensor
    noise: torch.Tensor


class AmortizedSampler(TensorDictModuleBase):
    r"""Implicit policy :math:`a = c + r\tanh(f_\psi(s, \xi))`, :math:`\xi \sim \mathcal N(0, I_d)` truncated to
    :math:`\pm 3` (the standardized draw of S2AC's :math:`q^0`, so that S2AC can pair each :math:`\xi` with the
    SVGD particle it starts).

    Acting: one draw per state under ``ExplorationType.RANDOM``; :math:`\xi = 0` under any
    other exploration type (the default, as for TorchRL's ``ProbabilisticActor``, is deterministic).

    Args:
        action_spec (TensorSpec): a bounded action spec.
        observation_dim (int): size of the observation's last dim.

    Keyword Args:
        num_cells (sequence of int): hidden widths of :math:`f_\psi` (input ``[s, xi]``). Defaults to ``(256, 256)``.
        activation_class (type): defaults to :class:`torch.nn.ELU`.
        network (nn.Module, optional): maps ``[*batch, obs + d]`` to ``[*batch, d]``; replaces the default MLP.
        noise_bound (float): truncation of :math:`\xi`. Defaults to ``3``.
        in_keys: defaults to ``["observation"]``.
        out_keys: defaults to ``["action"]``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded
        >>> sampler = AmortizedSampler(Bounded(-torch.ones(2), torch.ones(2), (2,)), 3, num_cells=[32])
        >>> sampler(TensorDict({"observation": torch.randn(4, 3)}, [4]))["action"].shape
        torch.Size([4, 2])
        >>> sampler.sample(torch.randn(4, 3), 8).action.shape  # reparameterised draws
        torch.Size([4, 8, 2])
    """

    def __init__(
        self,
        action_spec: TensorSpec,
        observation_dim: int,
        *,
        num_cells: Sequence[int] = (256, 256),
        activation_class: type[nn.Module] = nn.ELU,
        network: nn.Module | None = None,
        noise_bound: float = 3.0,
        in_keys: Sequence[NestedKey] = ("observation",),
        out_keys: Sequence[NestedKey] = ("action",),
    ) -> None:
        super().__init__()
        squash = TanhSquash.from_action_spec(action_spec, "AmortizedSampler")
        if len(in_keys) != 1 or len(out_keys) != 1:
            raise ValueError(f"AmortizedSampler: expects 1 in_key and 1 out_key, got {in_keys} and {out_keys}.")
        if not noise_bound > 0:
            raise ValueError(f"AmortizedSampler: noise_bound must be > 0, got {noise_bound!r}.")
        self.in_keys, self.out_keys = list(in_keys), list(out_keys)
        self.observation_dim, self.action_dim = observation_dim, action_spec.shape[-1]
        self.noise_bound = noise_bound
        self.squash = squash
        self.network = (
            network
            if network is not None
            else MLP(
                in_features=observation_dim + self.action_dim,
                out_features=self.action_dim,
                num_cells=list(num_cells),
                activation_class=activation_class,
            )
        )

    def draw_noise(self, observation: torch.Tensor, num_samples: int) -> torch.Tensor:
        r""":math:`\xi`, ``[*batch, num_samples, d]``."""
        zeros = observation.new_zeros(*observation.shape[:-1], self.action_dim)
        noise, _ = sample_truncated_normal(zeros, torch.ones_like(zeros), num_samples, self.noise_bound)
        return noise

    def transport(self, observation: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        r""":math:`u = f_\psi(s, \xi)` for observations ``[*batch, obs]`` and noise ``[*batch, n, d]``."""
        if observation.shape[-1] != self.observation_dim:
            raise ValueError(
                f"AmortizedSampler expects observations shaped [..., {self.observation_dim}], "
                f"got {tuple(observation.shape)}."
            )
        if noise.shape[:-2] != observation.shape[:-1] or noise.shape[-1] != self.action_dim:
            raise ValueError(
                f"AmortizedSampler: noise of shape {tuple(noise.shape)} does not fit observations "
                f"{tuple(observation.shape)}; expected [*batch, n, {self.action_dim}]."
            )
        per_sample_obs = observation.unsqueeze(-2).expand(*noise.shape[:-1], self.observation_dim)
        return self.network(torch.cat([per_sample_obs, noise], -1))

    def sample(self, observation: torch.Tensor, num_samples: int) -> AmortizedSample:
        """``num_samples`` reparameterised draws per state; differentiable in :math:`\\psi`."""
        noise = self.draw_noise(observation, num_samples)
        unsquashed = self.transport(observation, noise)
        return AmortizedSample(self.squash(unsquashed), unsquashed, noise)

    def act(self, observation: torch.Tensor, explore: bool | None = None) -> torch.Tensor:
        r"""One action per state, ``[*batch, d]``: random :math:`\xi` when exploring, :math:`\xi = 0` otherwise.

        ``explore=None`` reads the current exploration type (``RANDOM`` explores).
        """
        if explore is None:
            explore = exploration_type() == ExplorationType.RANDOM
        if explore:
            noise = self.draw_noise(observation, 1)
        else:
            noise = observation.new_zeros(*observation.shape[:-1], 1, self.action_dim)
        return self.squash(self.transport(observation, noise)).squeeze(-2)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set(self.out_keys[0], self.act(tensordict.get(self.in_keys[0])))
        return tensordict
