r"""The S2AC objective (Messaoud et al., ICLR 2024) as a TorchRL :class:`~torchrl.objectives.LossModule`."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import dispatch

from torchrl_s2ac.modules.actor import ParticleSample, SVGDActor
from torchrl_s2ac.modules.critic import SoftQCritic
from torchrl_s2ac.objectives.soft_q import SoftQLoss

__all__ = ["S2ACLoss"]


class S2ACLoss(SoftQLoss):
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

    When the actor has an ``amortized_sampler`` :math:`f_\psi`, it is trained to reproduce
    the particles of the actor-loss sample from their standardized initial draws :math:`\xi_i`:

    .. math::
        \mathcal L_\psi = \frac1m\sum_i \big\|\big(\mathrm{squash}(f_\psi(s, \xi_i))
            - \mathrm{sg}(a_i)\big) / r\big\|^2,

    with :math:`r` the action box's half-width (so the loss is in tanh units); no
    gradient reaches :math:`q^0` or the critic.

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
        loss_function, delay_qvalue, reduction, use_prioritized_weights: see
            :class:`~torchrl_s2ac.objectives.soft_q.SoftQLoss` (its keys too).

    The output TensorDict holds ``loss_actor``, ``loss_qvalue``, ``loss_alpha``,
    ``loss_amortized`` (zero without an amortized sampler), ``alpha``, ``entropy`` (mean closed-form
    entropy estimate over the batch) and diagnostics of the actor-loss sample: ``svgd_step_ratio``
    (the largest invertibility diagnostic), ``svgd_capped_fraction`` (fraction of states whose step
    the cap shortened, mean over steps), ``init_scale_mean`` / ``init_scale_min`` (:math:`q^0`'s
    :math:`\sigma_\theta(s)` over the batch and action dims), ``q_mean`` (mean of
    :math:`\min_k Q_k(s, a_i)`) and ``q_spread`` (mean over states of its standard deviation over the
    :math:`m` particles: the scale of the energy differences SVGD sees, to compare with :math:`\alpha`).
    """

    actor_network: SVGDActor

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
        alpha_init = float(actor_network.alpha) if alpha_init is None else float(alpha_init)
        if not alpha_init > 0:
            raise ValueError(f"S2ACLoss: alpha_init must be > 0, got {alpha_init!r}.")
        super().__init__(
            actor_network,
            qvalue_network,
            loss_function=loss_function,
            delay_qvalue=delay_qvalue,
            reduction=reduction,
            use_prioritized_weights=use_prioritized_weights,
        )

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

    @property
    def out_keys(self):
        return [
            "loss_actor",
            "loss_qvalue",
            "loss_alpha",
            "loss_amortized",
            "alpha",
            "entropy",
            "svgd_step_ratio",
            "svgd_capped_fraction",
            "init_scale_mean",
            "init_scale_min",
            "q_mean",
            "q_spread",
        ]

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._sync_actor_alpha()
        loss_qvalue, metadata = self.qvalue_loss(tensordict)
        loss_actor, actor_metadata = self.actor_loss(tensordict)
        loss_alpha = self.alpha_loss(actor_metadata["log_prob"], tensordict)
        loss_amortized = self.amortized_loss(actor_metadata["sample"], tensordict)
        tensordict.set(self.tensor_keys.priority, metadata["td_error"])
        return TensorDict(
            {
                "loss_actor": loss_actor,
                "loss_qvalue": loss_qvalue,
                "loss_alpha": loss_alpha,
                "loss_amortized": loss_amortized,
                "alpha": self._alpha,
                "entropy": -actor_metadata["log_prob"].mean(),
                "svgd_step_ratio": actor_metadata["step_ratio"].max(),
                "svgd_capped_fraction": actor_metadata["sample"].capped_fraction.mean(),
                "init_scale_mean": actor_metadata["sample"].init_scale.detach().mean(),
                "init_scale_min": actor_metadata["sample"].init_scale.detach().min(),
                "q_mean": actor_metadata["q"].mean(),
                "q_spread": actor_metadata["q"].std(-1).mean(),
            },
            batch_size=[],
        )

    def next_state_value(self, next_observation: torch.Tensor) -> torch.Tensor:
        r""":math:`\frac1m\sum_i [\min_k \bar Q_k(s', a'_i) - \alpha \log\pi(a'_i|s')]`, ``[*batch]``.

        The particles follow the online critic's score; their values come from the target critic.
        """
        sample = self.actor_network.sample_particles(next_observation)
        with self.target_qvalue_network_params.to_module(self.qvalue_network):
            next_q = self.qvalue_network.min_values(next_observation.unsqueeze(-2), sample.action)
        return (next_q - self._alpha * sample.log_prob).mean(-1)

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Actor loss through the SVGD sampler; the critic's parameters are detached."""
        observation = self._get(tensordict, self.tensor_keys.observation)
        with self.qvalue_network_params.detach().to_module(self.qvalue_network):
            sample = self.actor_network.sample_particles(observation)
            q = self.qvalue_network.min_values(observation.unsqueeze(-2), sample.action)
        loss = (self._alpha * sample.log_prob - q).mean(-1)
        weights = self._maybe_get_priority_weight(tensordict)
        loss = self._reduce_loss(loss, tensordict=tensordict, weights=weights)
        metadata = {"log_prob": sample.log_prob.detach(), "step_ratio": sample.step_ratio, "sample": sample}
        return loss, {**metadata, "q": q.detach()}

    def amortized_loss(self, sample: ParticleSample, tensordict: TensorDictBase) -> torch.Tensor:
        """Regression of the amortized sampler onto the particles of ``sample`` (zero without a sampler)."""
        sampler = self.actor_network.amortized_sampler
        if sampler is None:
            return torch.zeros((), device=sample.action.device)
        observation = self._get(tensordict, self.tensor_keys.observation)
        prediction = sampler.squash(sampler.transport(observation, sample.noise))
        error = ((prediction - sample.action.detach()) / sampler.squash.scale).square().sum(-1).mean(-1)
        return self._reduce_loss(error, tensordict=tensordict)

    def alpha_loss(self, log_prob: torch.Tensor, tensordict: TensorDictBase | None = None) -> torch.Tensor:
        r""":math:`-\log\alpha\,(\log\pi + \bar{\mathcal H})` averaged over particles; zero when alpha is fixed."""
        if self.fixed_alpha:
            return torch.zeros((), device=log_prob.device)
        loss = -self.log_alpha * (log_prob.mean(-1) + self.target_entropy)
        return self._reduce_loss(loss, tensordict=tensordict)
