r"""Ensemble of soft Q-networks :math:`Q_k(s, a)`, evaluated in one batched call."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn

__all__ = ["SoftQCritic"]

# act'(z) from the pre-activation z and the activation's output y.
_ACTIVATION_DERIVATIVES = {
    # ELU: 1 for z > 0, y + alpha otherwise; for alpha <= 1 that is min(y + alpha, 1).
    nn.ELU: lambda act, z, y: (
        (y + act.alpha).clamp(max=1.0) if act.alpha <= 1 else torch.where(z > 0, 1.0, y + act.alpha)
    ),
    nn.ReLU: lambda act, z, y: (z > 0).to(z.dtype),
    nn.Tanh: lambda act, z, y: 1 - y.square(),
}


class SoftQCritic(TensorDictModuleBase):
    r"""``num_qvalue_nets`` independent MLP critics :math:`Q_k(s, a)` with stacked weights.

    Every layer holds a weight of shape ``[num_qvalue_nets, in, out]``, so all
    members run in one :func:`torch.baddbmm` per layer (no Python loop, no vmap).
    The parameters are ordinary module parameters: :class:`~torchrl_s2ac.S2ACLoss`
    trains them in place and keeps a target copy.

    Args:
        observation_dim (int): size of the last dim of ``observation``.
        action_dim (int): size of the last dim of ``action``.

    Keyword Args:
        num_cells (sequence of int): hidden widths. Defaults to ``(256, 256)``.
        activation_class (type): hidden activation. Defaults to :class:`torch.nn.ELU`.
        num_qvalue_nets (int): ensemble size. Defaults to ``2``.
        reduce (str, optional): ``None`` writes every member's value, shaped
            ``[*batch, num_qvalue_nets]``; ``"min"`` writes :math:`\min_k Q_k`,
            shaped ``[*batch, 1]``.
        in_keys: observation and action keys. Defaults to ``["observation", "action"]``.
        out_keys: value key. Defaults to ``["state_action_value"]``.
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        *,
        num_cells: Sequence[int] = (256, 256),
        activation_class: type[nn.Module] = nn.ELU,
        num_qvalue_nets: int = 2,
        reduce: str | None = None,
        in_keys: Sequence[NestedKey] = ("observation", "action"),
        out_keys: Sequence[NestedKey] = ("state_action_value",),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_qvalue_nets < 1:
            raise ValueError(f"SoftQCritic: num_qvalue_nets must be >= 1, got {num_qvalue_nets}.")
        if reduce not in (None, "min"):
            raise ValueError(f"SoftQCritic: reduce must be None or 'min', got {reduce!r}.")
        if len(in_keys) != 2 or len(out_keys) != 1:
            raise ValueError(f"SoftQCritic: expects 2 in_keys and 1 out_key, got {in_keys} and {out_keys}.")
        self.in_keys = list(in_keys)
        self.out_keys = list(out_keys)
        self.observation_dim, self.action_dim = int(observation_dim), int(action_dim)
        self.num_qvalue_nets = num_qvalue_nets
        self.reduce = reduce
        self.activation = activation_class()
        widths = [self.observation_dim + self.action_dim, *num_cells, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            self.weights.append(nn.Parameter(torch.empty(num_qvalue_nets, fan_in, fan_out, device=device)))
            self.biases.append(nn.Parameter(torch.empty(num_qvalue_nets, 1, fan_out, device=device)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each member initialised like :class:`torch.nn.Linear`: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases):
                bound = 1 / math.sqrt(weight.shape[1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)

    def _forward(
        self, observation: torch.Tensor, action: torch.Tensor, keep_slopes: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Size]:
        """Stacked forward pass: values ``[num_q, N, 1]``, act'(z) per hidden layer if asked, batch shape."""
        if observation.shape[-1] != self.observation_dim or action.shape[-1] != self.action_dim:
            raise ValueError(
                f"SoftQCritic expects observation [..., {self.observation_dim}] and action [..., {self.action_dim}], "
                f"got {tuple(observation.shape)} and {tuple(action.shape)}."
            )
        if observation.shape[:-1] != action.shape[:-1]:
            leading = torch.broadcast_shapes(observation.shape[:-1], action.shape[:-1])
            observation, action = observation.expand(*leading, -1), action.expand(*leading, -1)
        batch_shape = action.shape[:-1]
        x = torch.cat([observation, action], -1).reshape(1, -1, self.observation_dim + self.action_dim)
        x = x.expand(self.num_qvalue_nets, -1, -1)
        derivative = _ACTIVATION_DERIVATIVES.get(type(self.activation))
        slopes = []
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(bias, x, weight)
            if index == last:
                return z, slopes, batch_shape
            x = self.activation(z)
            if keep_slopes:
                slopes.append(derivative(self.activation, z, x))

    def ensemble_values(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        r""":math:`Q_k(s, a)` for every member: ``[*batch, obs], [*batch, act] -> [num_qvalue_nets, *batch]``."""
        values, _, batch_shape = self._forward(observation, action, keep_slopes=False)
        return values.reshape(self.num_qvalue_nets, *batch_shape)

    @property
    def has_explicit_action_grad(self) -> bool:
        """Whether :meth:`values_and_action_grad` supports this critic's activation."""
        return type(self.activation) in _ACTIVATION_DERIVATIVES

    def values_and_action_grad(
        self, observation: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`Q_k(s, a)` ``[num_q, *batch]`` and :math:`\nabla_a Q_k(s, a)` ``[num_q, *batch, act]``.

        The input gradient is written as an explicit forward computation (back-propagating
        the unit output through the stacked layers with the activation's derivative),
        so it is an ordinary differentiable graph: a loss through it needs one backward,
        not a double backward. Activations with a known derivative: ELU, ReLU, Tanh.
        """
        if not self.has_explicit_action_grad:
            raise NotImplementedError(
                f"SoftQCritic.values_and_action_grad: no closed-form derivative for {type(self.activation).__name__}."
            )
        values, slopes, batch_shape = self._forward(observation, action, keep_slopes=True)
        last = len(self.weights) - 1
        # Backward pass by hand: g <- (g @ W^T) * act'(z), from the output down to the input.
        grad = self.weights[last].transpose(-1, -2).expand(-1, values.shape[1], -1)  # [num_q, N, width]
        for index in range(last - 1, -1, -1):
            grad = grad * slopes[index]
            weight = self.weights[index]
            if index == 0:
                weight = weight[:, self.observation_dim :]  # only the action rows are needed
            grad = grad @ weight.transpose(-1, -2)
        values = values.reshape(self.num_qvalue_nets, *batch_shape)
        return values, grad.reshape(self.num_qvalue_nets, *batch_shape, self.action_dim)

    def min_values(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        r""":math:`\min_k Q_k(s, a)`, ``[*batch]``."""
        return self.ensemble_values(observation, action).amin(0)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        observation, action = (tensordict.get(key) for key in self.in_keys)
        values = self.ensemble_values(observation, action)
        values = values.amin(0).unsqueeze(-1) if self.reduce == "min" else values.movedim(0, -1)
        tensordict.set(self.out_keys[0], values)
        return tensordict
