r"""What S2AC and SQL share: a soft Q ensemble trained by TD(0) against a soft state value.

.. math::
    y = r + \gamma (1 - \text{terminated})\, V(s'), \qquad \mathcal L_Q = \sum_k (Q_k(s, a) - y)^2,

where each loss defines its own estimate of the soft value :math:`V(s')`
(:meth:`SoftQCriticLoss.next_state_value`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase, TensorDictParams
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator, distance_loss

from torchrl_s2ac.finite import NonFiniteError, first_non_finite, recording_graph
from torchrl_s2ac.modules.critic import CriticEnsemble, SoftQCritic

__all__ = ["SoftQCriticLoss"]

# Registered state a policy may hold besides its own trainable parameters: the critic it samples from and
# the temperature it acts with (SVGDActor does). The loss trains them as qvalue_network_params and
# log_alpha, so they are left out of actor_network_params: the two parameter sets are disjoint.
_SHARED_WITH_ACTOR = ("critic", "temperature")


class SoftQCriticLoss(LossModule):
    """Base of :class:`~torchrl_s2ac.S2ACLoss` and :class:`~torchrl_s2ac.SQLLoss`: keys, TD(0) target, critic loss.

    Subclasses implement :meth:`next_state_value` and ``forward`` (which starts with :meth:`check_finite`).
    Every network call goes through the loss's parameters (``params.to_module(network)``), so a deep copy
    of the loss trains its own copy. They are swapped in as they are (``preserve_module_state=False``, as
    TorchRL's ``_vmap_func``): rebuilding ``nn.Parameter`` objects from detached or target tensors would
    break a :func:`torch.compile` graph.

    Args:
        actor_network (nn.Module): the policy, kept as functional parameters ``actor_network_params``.
            Its ``critic`` and ``temperature`` submodules, if any, are not among them (they are
            ``qvalue_network_params`` and ``log_alpha``): give ``actor_network_params`` to the actor's
            optimizer and ``qvalue_network_params`` to the critic's.
        qvalue_network (SoftQCritic or CriticEnsemble): the critic ensemble; its parameters are
            ``qvalue_network_params`` (the module's own, trained in place) and its target copy is
            ``target_qvalue_network_params`` (updated by :class:`~torchrl.objectives.SoftUpdate`).

    Keyword Args:
        loss_function (str): ``"l2"``, ``"l1"`` or ``"smooth_l1"``. Defaults to ``"l2"``.
        delay_qvalue (bool): keep target critic parameters. Defaults to ``True``.
        reduction (str): ``"none"``, ``"mean"`` or ``"sum"``. Defaults to ``"mean"``.
        use_prioritized_weights (bool or "auto"): weight by ``priority_weight`` when present.
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys the loss reads and writes (see :meth:`set_keys`).

        Attributes:
            observation: the observation, also read under ``"next"``. Defaults to ``"observation"``.
            action: the action taken. Defaults to ``"action"``.
            value: state value key used by the value estimator. Defaults to ``"state_value"``.
            reward, done, terminated: read under ``"next"``.
            priority: where the TD error is written. Defaults to ``"td_error"``.
            priority_weight: importance weights from prioritized replay.
        """

        observation: NestedKey = "observation"
        action: NestedKey = "action"
        value: NestedKey = "state_value"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        priority: NestedKey = "td_error"
        priority_weight: NestedKey = "priority_weight"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0,)

    actor_network: nn.Module
    qvalue_network: SoftQCritic | CriticEnsemble
    actor_network_params: TensorDictParams
    qvalue_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams

    @classmethod
    def _check_settings(cls, loss_function: str, reduction: str | None) -> str:
        """Validates ``loss_function`` and ``reduction`` (one error naming the bad value); returns the reduction."""
        if loss_function not in ("l2", "l1", "smooth_l1"):
            raise ValueError(f"{cls.__name__}: loss_function must be 'l2', 'l1' or 'smooth_l1', got {loss_function!r}.")
        if reduction is None:
            reduction = "mean"
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{cls.__name__}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}.")
        return reduction

    def __init__(
        self,
        actor_network: nn.Module,
        qvalue_network: SoftQCritic | CriticEnsemble,
        *,
        loss_function: str = "l2",
        delay_qvalue: bool = True,
        reduction: str | None = None,
        use_prioritized_weights: str | bool = "auto",
    ) -> None:
        name = type(self).__name__
        if not isinstance(qvalue_network, (SoftQCritic, CriticEnsemble)):
            raise TypeError(
                f"{name}: qvalue_network must be a SoftQCritic or CriticEnsemble, got {type(qvalue_network).__name__}."
            )
        reduction = self._check_settings(loss_function, reduction)
        super().__init__()
        self._in_keys = None
        self.reduction = reduction
        self.loss_function = loss_function
        self.use_prioritized_weights = use_prioritized_weights
        self.delay_qvalue = delay_qvalue
        self.convert_to_functional(actor_network, "actor_network")
        self.actor_network_params = TensorDictParams(
            self.actor_network_params.exclude(*_SHARED_WITH_ACTOR), no_convert=True
        )
        # SoftQCritic and CriticEnsemble hold their members' parameters themselves (no expansion here):
        # qvalue_network_params are the critic module's own parameters.
        self.convert_to_functional(qvalue_network, "qvalue_network", create_target_params=delay_qvalue)

    def __deepcopy__(self, memo: dict) -> SoftQCriticLoss:
        """A copy whose networks hold the copy's parameters, so the copied policy acts with what the copy trains.

        (A ``TensorDictParams`` deep copy ignores ``memo``: without this, the copied actor and critic would keep
        parameters of their own, apart from the copied ``*_params`` the copied loss trains.)
        """
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = copy.deepcopy(value, memo)
        copied.actor_network_params.to_module(copied.actor_network)
        copied.qvalue_network_params.to_module(copied.qvalue_network)
        return copied

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(
                value=self.tensor_keys.value,
                reward=self.tensor_keys.reward,
                done=self.tensor_keys.done,
                terminated=self.tensor_keys.terminated,
            )
        self._set_in_keys()

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams):
        """Builds the value estimator (TD(0) only: the target needs next-state samples)."""
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
        # With no value network, TD(0) builds gamma on the CPU and swaps in a copy on the data's device at its
        # first call: build it beside the parameters instead (a device given by the caller wins).
        hp.setdefault("device", self._default_device)
        dispatch_value_estimator(
            self,
            value_type,
            supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys={
                "value": self.tensor_keys.value,
                "value_target": "value_target",
                "reward": self.tensor_keys.reward,
                "done": self.tensor_keys.done,
                "terminated": self.tensor_keys.terminated,
            },
            value_network=None,
            **hp,
        )
        return self

    def _set_in_keys(self) -> None:
        keys = self.tensor_keys
        self._in_keys = [
            keys.observation,
            keys.action,
            ("next", keys.observation),
            ("next", keys.reward),
            ("next", keys.done),
            ("next", keys.terminated),
        ]

    @property
    def in_keys(self):
        if self._in_keys is None:
            self._set_in_keys()
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values):
        self._in_keys = values

    def _get(self, tensordict: TensorDictBase, key: NestedKey) -> torch.Tensor:
        """The batch entry under ``key``, detached: data, even when collected with gradients on."""
        value = tensordict.get(key, None)
        if value is None:
            raise KeyError(
                f"{type(self).__name__}: key {key!r} not found in the input tensordict (keys: "
                f"{sorted(map(str, tensordict.keys(True, True)))}). Use set_keys() to rename."
            )
        return value.detach()

    def check_finite(self, tensordict: TensorDictBase) -> None:
        """Raise :class:`~torchrl_s2ac.NonFiniteError` naming the first non-finite input (one reduction per batch).

        Called at the start of ``forward``, before any network sees the batch, so that a NaN
        reward or observation stops training before it reaches a parameter. Skipped in a compiled or
        CUDA-graph loss (a data-dependent branch would break the graph); the scripts' harness checks such an
        update's losses after the call instead.
        """
        if recording_graph():
            return
        keys = self.tensor_keys
        name = first_non_finite(
            {
                "observation": self._get(tensordict, keys.observation),
                "action": self._get(tensordict, keys.action),
                "next observation": self._get(tensordict, ("next", keys.observation)),
                "reward": self._get(tensordict, ("next", keys.reward)),
            }
        )
        if name is not None:
            raise NonFiniteError(f"{type(self).__name__}: non-finite values in the {name} of the input batch.")

    def next_state_value(self, next_observation: torch.Tensor) -> torch.Tensor:
        r"""The soft value :math:`V(s')`, ``[*batch]``, computed without gradient."""
        raise NotImplementedError

    def value_target(self, tensordict: TensorDictBase) -> torch.Tensor:
        r"""The soft TD(0) target :math:`y`, shaped like the reward ``[*batch, 1]``; no gradient."""
        next_observation = self._get(tensordict, ("next", self.tensor_keys.observation))
        with torch.no_grad():
            next_value = self.next_state_value(next_observation).unsqueeze(-1)
            for key in (self.tensor_keys.reward, self.tensor_keys.done, self.tensor_keys.terminated):
                value = self._get(tensordict, ("next", key))
                if value.shape != next_value.shape:
                    raise ValueError(
                        f"{type(self).__name__}: ('next', {key!r}) has shape {tuple(value.shape)}; expected "
                        f"{tuple(next_value.shape)} ([*batch, 1], like the observation's batch)."
                    )
            target_tensordict = tensordict.select("next", strict=False).copy()
            return self.value_estimator.value_estimate(target_tensordict, next_value=next_value)

    def qvalue_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Critic loss summed over the ensemble members, reduced over the batch."""
        target = self.value_target(tensordict).squeeze(-1)
        observation = self._get(tensordict, self.tensor_keys.observation)
        action = self._get(tensordict, self.tensor_keys.action)
        with self.qvalue_network_params.to_module(self.qvalue_network, preserve_module_state=False):
            q = self.qvalue_network.ensemble_values(observation, action)  # [num_q, *batch]
        if q.shape[1:] != target.shape:
            raise ValueError(
                f"{type(self).__name__}: critic values {tuple(q.shape[1:])} and TD target {tuple(target.shape)} "
                "differ in shape; reward/done must be shaped [*batch, 1]."
            )
        loss = distance_loss(q, target.expand_as(q), loss_function=self.loss_function).sum(0)
        weights = self._maybe_get_priority_weight(tensordict)
        loss = self._reduce_loss(loss, tensordict=tensordict, weights=weights)
        return loss, {"td_error": (q.detach() - target).abs().amax(0)}
