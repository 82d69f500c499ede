r"""Ensemble of soft Q-networks :math:`Q_k(s, a)`, evaluated in one batched call."""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn

__all__ = ["CriticEnsemble", "SoftQCritic", "as_critic_ensemble"]

# act'(z) from the pre-activation z and the activation's output y.
_ACTIVATION_DERIVATIVES = {
    # ELU: 1 for z > 0, y + alpha otherwise; for alpha = 1 that is min(y + 1, 1) (y + 1 = z + 1 > 1 for z > 0,
    # y + 1 = exp(z) <= 1 otherwise): one fused op. For other alpha, z + alpha < 1 is possible at z > 0.
    nn.ELU: lambda act, z, y: (y + 1.0).clamp(max=1.0) if act.alpha == 1 else torch.where(z > 0, 1.0, y + act.alpha),
    nn.ReLU: lambda act, z, y: (z > 0).to(z.dtype),
    nn.Tanh: lambda act, z, y: 1 - y.square(),
}


def _unit_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The output layer ``x @ w + b`` of one unit (``weight [num_q, in, 1]``) as a product and a sum over ``in``:
    a batched matrix-vector product runs at a small fraction of the matrix units' rate on CPU, where this is
    one fused reduction when compiled."""
    return (x * weight.transpose(-1, -2)).sum(-1, keepdim=True) + bias


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

    Examples:
        >>> from tensordict import TensorDict
        >>> critic = SoftQCritic(3, 2, num_cells=[32], num_qvalue_nets=2)
        >>> critic(TensorDict({"observation": torch.randn(4, 3), "action": torch.randn(4, 2)}, [4]))[
        ...     "state_action_value"
        ... ].shape
        torch.Size([4, 2])
        >>> q, dq_da = critic.values_and_action_grad(torch.randn(4, 3), torch.randn(4, 2))  # closed-form grad_a Q_k
        >>> q.shape, dq_da.shape
        (torch.Size([2, 4]), torch.Size([2, 4, 2]))
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
            if index == last and torch.is_autocast_enabled(x.device.type):
                # The output layer always in the parameters' precision, also under torch.autocast: Q is large
                # next to its differences between particles and members, which a 16-bit output rounds away
                # (bf16 keeps 3 significant digits: 0.5 at Q = 100), flipping min_k Q_k's member.
                with torch.autocast(x.device.type, enabled=False):
                    return _unit_output(x.to(weight.dtype), weight, bias), slopes, batch_shape
            if index == last:
                return _unit_output(x, weight, bias), slopes, batch_shape
            z = torch.baddbmm(bias, x, weight)
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
        # Backward pass by hand: g <- (g * act'(z)) @ W^T, from the unit output down to the input. The output
        # layer's gradient with respect to its input is W_last^T, one row shared by every input: broadcast.
        grad = self._input_rows(last).transpose(-1, -2)  # [num_q, 1, fan_in]
        for index in range(last - 1, -1, -1):
            grad = grad.to(slopes[index].dtype) * slopes[index]
            grad = grad @ self._input_rows(index).transpose(-1, -2)
        values = values.reshape(self.num_qvalue_nets, *batch_shape)
        grad = grad.expand(self.num_qvalue_nets, batch_shape.numel(), self.action_dim)  # no hidden layer: broadcast
        return values, grad.reshape(self.num_qvalue_nets, *batch_shape, self.action_dim)

    def min_values_and_action_grad(
        self, observation: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\min_k Q_k(s, a)` ``[*batch]`` and its action gradient ``[*batch, act]``: the gradient of the
        member attaining the minimum (a subgradient where members tie), in closed form
        (:meth:`values_and_action_grad`)."""
        values, grads = self.values_and_action_grad(observation, action)
        member = values.argmin(0, keepdim=True)
        grad = grads.gather(0, member.unsqueeze(-1).expand(1, *grads.shape[1:])).squeeze(0)
        return values.gather(0, member).squeeze(0), grad

    def _input_rows(self, index: int) -> torch.Tensor:
        """Layer ``index``'s weight, restricted to the action's rows for the first layer (the observation's
        gradient is never needed)."""
        weight = self.weights[index]
        return weight[:, self.observation_dim :] if index == 0 else weight

    def min_values(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        r""":math:`\min_k Q_k(s, a)`, ``[*batch]``."""
        return self.ensemble_values(observation, action).amin(0)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        observation, action = (tensordict.get(key) for key in self.in_keys)
        values = self.ensemble_values(observation, action)
        values = values.amin(0).unsqueeze(-1) if self.reduce == "min" else values.movedim(0, -1)
        tensordict.set(self.out_keys[0], values)
        return tensordict


class CriticEnsemble(TensorDictModuleBase):
    r"""``num_qvalue_nets`` independent copies :math:`Q_k(s, a)` of any critic module, evaluated member by member.

    The general counterpart of :class:`SoftQCritic`: ``critic`` is any TensorDict module that reads the
    observation and the action and writes one value per state-action pair (``[*batch, 1]``), such as
    ``ValueOperator(MLP(...), in_keys=["observation", "action"])``. Member 0 is ``critic`` itself (its
    parameters are trained in place); the others are copies with freshly reset parameters, as
    :class:`~torchrl.objectives.SACLoss` ensembles its critic with ``num_qvalue_nets``. Every member is a
    registered submodule, so the ensemble's state travels with ``state_dict``, ``deepcopy`` and ``.to()``.
    The action gradient :math:`\nabla_a Q_k` is taken by autograd (:attr:`has_explicit_action_grad` is
    ``False``).

    Args:
        critic (TensorDictModuleBase): the critic :math:`Q(s, a)`.
        num_qvalue_nets (int): ensemble size.
        observation_dim (int): size of the observation's last dim.
        action_dim (int): size of the action's last dim.

    Keyword Args:
        observation_key, action_key: what ``critic`` reads. Default to ``"observation"`` and ``"action"``.
        value_key: what ``critic`` writes. Defaults to ``"state_action_value"``.

    Examples:
        >>> from torchrl.modules import MLP, ValueOperator
        >>> mlp = MLP(in_features=5, out_features=1, num_cells=[32])
        >>> critic = ValueOperator(mlp, in_keys=["observation", "action"])
        >>> ensemble = CriticEnsemble(critic, 2, observation_dim=3, action_dim=2)
        >>> ensemble.ensemble_values(torch.randn(4, 3), torch.randn(4, 2)).shape
        torch.Size([2, 4])
    """

    has_explicit_action_grad = False

    def __init__(
        self,
        critic: TensorDictModuleBase,
        num_qvalue_nets: int,
        observation_dim: int,
        action_dim: int,
        *,
        observation_key: NestedKey = "observation",
        action_key: NestedKey = "action",
        value_key: NestedKey = "state_action_value",
    ) -> None:
        super().__init__()
        if not isinstance(critic, TensorDictModuleBase):
            raise TypeError(
                f"CriticEnsemble: critic must be a TensorDict module reading ({observation_key!r}, {action_key!r}) "
                f"and writing {value_key!r}, got {type(critic).__name__}."
            )
        if not (isinstance(num_qvalue_nets, int) and num_qvalue_nets >= 1):
            raise ValueError(f"CriticEnsemble: num_qvalue_nets must be an int >= 1, got {num_qvalue_nets!r}.")
        in_keys = list(critic.in_keys)
        for key in (observation_key, action_key):
            if key not in in_keys:
                raise ValueError(f"CriticEnsemble: the critic must read {key!r}; its in_keys are {in_keys}.")
        extra = [key for key in in_keys if key not in (observation_key, action_key)]
        if extra:
            raise ValueError(f"CriticEnsemble: the critic may read only the observation and the action, not {extra}.")
        if value_key not in critic.out_keys:
            raise ValueError(
                f"CriticEnsemble: the critic must write {value_key!r}; its out_keys are {critic.out_keys}."
            )
        self.in_keys = [observation_key, action_key]
        self.out_keys = [value_key]
        self.observation_dim, self.action_dim = int(observation_dim), int(action_dim)
        self.num_qvalue_nets = num_qvalue_nets
        members = [critic]
        for _ in range(num_qvalue_nets - 1):
            member = copy.deepcopy(critic)
            for module in member.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            members.append(member)
        self.members = nn.ModuleList(members)
        parameter = next(critic.parameters(), None)
        factory = {} if parameter is None else {"dtype": parameter.dtype, "device": parameter.device}
        # One probe call, so that a critic with the wrong output is refused here with its shape named.
        with torch.no_grad():
            self.ensemble_values(
                torch.zeros(1, self.observation_dim, **factory), torch.zeros(1, self.action_dim, **factory)
            )

    def ensemble_values(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        r""":math:`Q_k(s, a)` for every member: ``[*batch, obs], [*batch, act] -> [num_qvalue_nets, *batch]``.

        The observation is broadcast against the action's leading dims (one state, many particles).
        """
        leading = torch.broadcast_shapes(observation.shape[:-1], action.shape[:-1])
        inputs = TensorDict(
            {self.in_keys[0]: observation.expand(*leading, -1), self.in_keys[1]: action.expand(*leading, -1)},
            batch_size=leading,
        )
        values = []
        for member in self.members:
            value = member(inputs.copy()).get(self.out_keys[0])
            if value.shape != (*leading, 1):
                raise ValueError(
                    f"CriticEnsemble: the critic's {self.out_keys[0]!r} has shape {tuple(value.shape)}; "
                    f"expected {(*leading, 1)} (one value per state-action pair)."
                )
            values.append(value.squeeze(-1))
        return torch.stack(values)

    def min_values(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        r""":math:`\min_k Q_k(s, a)`, ``[*batch]``."""
        return self.ensemble_values(observation, action).amin(0)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Writes every member's value, ``[*batch, num_qvalue_nets]``, like ``SoftQCritic(reduce=None)``."""
        observation, action = (tensordict.get(key) for key in self.in_keys)
        tensordict.set(self.out_keys[0], self.ensemble_values(observation, action).movedim(0, -1))
        return tensordict


def as_critic_ensemble(
    critic: TensorDictModuleBase,
    num_qvalue_nets: int | None,
    observation_dim: int | None,
    action_dim: int,
    owner: str,
) -> SoftQCritic | CriticEnsemble:
    """``critic`` itself when it is already an ensemble (:class:`SoftQCritic` or :class:`CriticEnsemble`),
    else ``num_qvalue_nets`` (default 2) copies of it in a :class:`CriticEnsemble`; ``owner`` names the caller
    in errors."""
    if isinstance(critic, (SoftQCritic, CriticEnsemble)):
        if num_qvalue_nets is not None and num_qvalue_nets != critic.num_qvalue_nets:
            raise ValueError(
                f"{owner}: num_qvalue_nets={num_qvalue_nets} but the {type(critic).__name__} holds "
                f"{critic.num_qvalue_nets} members."
            )
        if critic.action_dim != action_dim:
            raise ValueError(
                f"{owner}: critic.action_dim={critic.action_dim} does not match the action's last dim {action_dim}."
            )
        if observation_dim is not None and critic.observation_dim != observation_dim:
            raise ValueError(
                f"{owner}: critic.observation_dim={critic.observation_dim} but observation_dim={observation_dim}."
            )
        return critic
    if not isinstance(critic, TensorDictModuleBase):
        raise TypeError(
            f"{owner}: the critic must be a TensorDict module reading (observation, action) and writing "
            f"state_action_value, got {type(critic).__name__}."
        )
    if observation_dim is None:
        raise ValueError(f"{owner}: observation_dim is required with a {type(critic).__name__} critic.")
    return CriticEnsemble(critic, 2 if num_qvalue_nets is None else num_qvalue_nets, observation_dim, action_dim)
