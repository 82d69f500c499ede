r"""The S2AC objective (Messaoud et al., ICLR 2024) as a TorchRL :class:`~torchrl.objectives.LossModule`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import dispatch
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator, distance_loss

from torchrl_s2ac.modules.actor import SVGDActor
from torchrl_s2ac.modules.critic import SoftQCritic

__all__ = ["S2ACLoss"]


class S2ACLoss(LossModule):
    r"""Stein Soft Actor-Critic loss.

    With :math:`m` SVGD particles :math:`a'_i \sim \pi(\cdot|s')` (score from the
    online critic, no gradient) and target critics :math:`\bar Q_k`:

    .. math::
        y = r + \gamma (1 - \text{terminated}) \Big[\frac1m\sum_i \min_k \bar Q_k(s', a'_i)
            - \alpha \frac1m \sum_i \log\pi(a'_i|s')\Big],
        \qquad \mathcal L_Q = \sum_k (Q_k(s, a) - y)^2,

    .. math::
        \mathcal L_\pi = \frac1m\sum_i \big[\alpha\log\pi(a_i|s) - \min_k Q_k(s, a_i)\big],

    where :math:`a_i` and :math:`\log\pi(a_i|s)` are differentiated through all
    :math:`L` SVGD steps into :math:`q^0`'s parameters with the critic's
    parameters frozen. :math:`\log\pi` is the closed-form Stein log-density.
    With ``fixed_alpha=False`` (beyond the paper, which fixes :math:`\alpha`),
    :math:`\mathcal L_\alpha = -\log\alpha\,(\log\pi + \bar{\mathcal H})` as in SAC.

    Args:
        actor_network (SVGDActor): the policy; its critic is the one trained here.
        qvalue_network (SoftQCritic, optional): must be ``actor_network.critic``
            (the default).

    Keyword Args:
        alpha_init (float, optional): initial temperature. Defaults to the actor's alpha.
        fixed_alpha (bool): keep :math:`\alpha` fixed (the paper). Defaults to ``True``.
        target_entropy (float or "auto"): for a learned alpha; ``"auto"`` is
            :math:`-\dim(\mathcal A)`.
        min_alpha, max_alpha (float, optional): clamp on the learned alpha.
        loss_function (str): ``"l2"``, ``"l1"`` or ``"smooth_l1"``. Defaults to ``"l2"``.
        delay_qvalue (bool): keep target critic parameters (updated by
            :class:`~torchrl.objectives.SoftUpdate`). Defaults to ``True``.
        reduction (str): ``"none"``, ``"mean"`` or ``"sum"``. Defaults to ``"mean"``.
        use_prioritized_weights (bool or "auto"): weight by ``priority_weight`` when present.

    The output TensorDict holds ``loss_actor``, ``loss_qvalue``, ``loss_alpha``,
    ``alpha``, ``entropy`` (mean closed-form entropy estimate over the batch)
    and ``svgd_step_ratio`` (the largest invertibility diagnostic of the actor's sampler).
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

    actor_network: SVGDActor
    qvalue_network: SoftQCritic
    actor_network_params: TensorDictParams
    qvalue_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: SVGDActor,
        qvalue_network: SoftQCritic | None = None,
        *,
        alpha_init: float | None = None,
        fixed_alpha: bool = True,
        target_entropy: float | str = "auto",
        min_alpha: float | None = None,
        max_alpha: float | None = None,
        loss_function: str = "l2",
        delay_qvalue: bool = True,
        reduction: str | None = None,
        use_prioritized_weights: str | bool = "auto",
    ) -> None:
        if not isinstance(actor_network, SVGDActor):
            raise TypeError(f"S2ACLoss: actor_network must be an SVGDActor, got {type(actor_network).__name__}.")
        if qvalue_network is None:
            qvalue_network = actor_network.critic
        if qvalue_network is not actor_network.critic:
            raise ValueError(
                "S2ACLoss: qvalue_network must be the critic the actor samples from (actor_network.critic)."
            )
        if loss_function not in ("l2", "l1", "smooth_l1"):
            raise ValueError(f"S2ACLoss: loss_function must be 'l2', 'l1' or 'smooth_l1', got {loss_function!r}.")
        if reduction is None:
            reduction = "mean"
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"S2ACLoss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}.")
        alpha_init = float(actor_network.alpha) if alpha_init is None else float(alpha_init)
        if not alpha_init > 0:
            raise ValueError(f"S2ACLoss: alpha_init must be > 0, got {alpha_init!r}.")
        super().__init__()
        self._in_keys = None
        self.reduction = reduction
        self.loss_function = loss_function
        self.use_prioritized_weights = use_prioritized_weights
        self.delay_qvalue = delay_qvalue
        self.convert_to_functional(actor_network, "actor_network")
        self.convert_to_functional(qvalue_network, "qvalue_network", create_target_params=delay_qvalue)

        device = next(qvalue_network.parameters()).device
        log_alpha = torch.tensor(math.log(alpha_init), device=device)
        self.fixed_alpha = fixed_alpha
        if fixed_alpha:
            self.register_buffer("log_alpha", log_alpha)
        else:
            self.register_parameter("log_alpha", torch.nn.Parameter(log_alpha))
        self.register_buffer("min_log_alpha", torch.tensor(-math.inf if min_alpha is None else math.log(min_alpha)))
        self.register_buffer("max_log_alpha", torch.tensor(math.inf if max_alpha is None else math.log(max_alpha)))
        if target_entropy == "auto":
            target_entropy = -float(actor_network.action_dim)
        self.register_buffer("target_entropy", torch.tensor(float(target_entropy), device=device))
        self._sync_actor_alpha()

    @property
    def _alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().clamp(self.min_log_alpha, self.max_log_alpha).exp()

    def _sync_actor_alpha(self) -> None:
        # The actor's energy Q/alpha uses the loss's current temperature.
        with torch.no_grad():
            self.actor_network.alpha.copy_(self._alpha)

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
        """Builds the value estimator (TD(0) only: the target needs next-state particles)."""
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
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

    @property
    def out_keys(self):
        return ["loss_actor", "loss_qvalue", "loss_alpha", "alpha", "entropy", "svgd_step_ratio"]

    def _get(self, tensordict: TensorDictBase, key: NestedKey) -> torch.Tensor:
        value = tensordict.get(key, None)
        if value is None:
            raise KeyError(
                f"S2ACLoss: key {key!r} not found in the input tensordict (keys: "
                f"{sorted(map(str, tensordict.keys(True, True)))}). Use set_keys() to rename."
            )
        return value

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._sync_actor_alpha()
        loss_qvalue, metadata = self.qvalue_loss(tensordict)
        loss_actor, actor_metadata = self.actor_loss(tensordict)
        loss_alpha = self.alpha_loss(actor_metadata["log_prob"], tensordict)
        tensordict.set(self.tensor_keys.priority, metadata["td_error"])
        return TensorDict(
            {
                "loss_actor": loss_actor,
                "loss_qvalue": loss_qvalue,
                "loss_alpha": loss_alpha,
                "alpha": self._alpha,
                "entropy": -actor_metadata["log_prob"].mean(),
                "svgd_step_ratio": actor_metadata["step_ratio"].max(),
            },
            batch_size=[],
        )

    def value_target(self, tensordict: TensorDictBase) -> torch.Tensor:
        r"""The soft TD(0) target :math:`y`, shaped like the reward ``[*batch, 1]``; no gradient."""
        next_observation = self._get(tensordict, ("next", self.tensor_keys.observation))
        with torch.no_grad():
            sample = self.actor_network.sample_particles(next_observation)
            with self.target_qvalue_network_params.to_module(self.qvalue_network):
                next_q = self.qvalue_network.min_values(next_observation.unsqueeze(-2), sample.action)
            next_value = (next_q - self._alpha * sample.log_prob).mean(-1, keepdim=True)
            for key in (self.tensor_keys.reward, self.tensor_keys.done, self.tensor_keys.terminated):
                value = self._get(tensordict, ("next", key))
                if value.shape != next_value.shape:
                    raise ValueError(
                        f"S2ACLoss: ('next', {key!r}) has shape {tuple(value.shape)}; expected "
                        f"{tuple(next_value.shape)} ([*batch, 1], like the observation's batch)."
                    )
            target_tensordict = tensordict.select("next", strict=False).copy()
            return self.value_estimator.value_estimate(target_tensordict, next_value=next_value)

    def qvalue_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Critic loss summed over the ensemble members, reduced over the batch."""
        target = self.value_target(tensordict).squeeze(-1)
        observation = self._get(tensordict, self.tensor_keys.observation)
        action = self._get(tensordict, self.tensor_keys.action)
        q = self.qvalue_network.ensemble_values(observation, action)  # [num_q, *batch]
        if q.shape[1:] != target.shape:
            raise ValueError(
                f"S2ACLoss: critic values {tuple(q.shape[1:])} and TD target {tuple(target.shape)} differ in shape; "
                "reward/done must be shaped [*batch, 1]."
            )
        loss = distance_loss(q, target.expand_as(q), loss_function=self.loss_function).sum(0)
        weights = self._maybe_get_priority_weight(tensordict)
        loss = self._reduce_loss(loss, tensordict=tensordict, weights=weights)
        return loss, {"td_error": (q.detach() - target).abs().amax(0)}

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Actor loss through the SVGD sampler; the critic's parameters are detached."""
        observation = self._get(tensordict, self.tensor_keys.observation)
        with self.qvalue_network_params.detach().to_module(self.qvalue_network):
            sample = self.actor_network.sample_particles(observation)
            q = self.qvalue_network.min_values(observation.unsqueeze(-2), sample.action)
        loss = (self._alpha * sample.log_prob - q).mean(-1)
        weights = self._maybe_get_priority_weight(tensordict)
        loss = self._reduce_loss(loss, tensordict=tensordict, weights=weights)
        return loss, {"log_prob": sample.log_prob.detach(), "step_ratio": sample.step_ratio}

    def alpha_loss(self, log_prob: torch.Tensor, tensordict: TensorDictBase | None = None) -> torch.Tensor:
        r""":math:`-\log\alpha\,(\log\pi + \bar{\mathcal H})` averaged over particles; zero when alpha is fixed."""
        if self.fixed_alpha:
            return torch.zeros((), device=log_prob.device)
        loss = -self.log_alpha * (log_prob.mean(-1) + self.target_entropy)
        return self._reduce_loss(loss, tensordict=tensordict)
