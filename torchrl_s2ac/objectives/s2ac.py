r"""The S2AC objective (Messaoud et al., ICLR 2024) as a TorchRL :class:`~torchrl.objectives.LossModule`."""

from __future__ import annotations

import weakref

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, dispatch

from torchrl_s2ac.modules.actor import ParticleSample, SVGDActor
from torchrl_s2ac.modules.critic import CriticEnsemble
from torchrl_s2ac.modules.temperature import Temperature
from torchrl_s2ac.objectives.critic_loss import SoftQCriticLoss

__all__ = ["S2ACLoss"]

# The loss that trains each installed Temperature, held weakly: a second S2ACLoss on the same actor would
# install its own temperature and leave the first loss training one the actor no longer acts with.
_TRAINING_LOSS: weakref.WeakKeyDictionary[Temperature, weakref.ref] = weakref.WeakKeyDictionary()


class S2ACLoss(SoftQCriticLoss):
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

    Parameters. The actor holds the critic and the temperature it acts with; the loss trains them
    in place as ``qvalue_network_params`` (the critic's own parameters) and ``log_alpha`` (the actor's
    :class:`~torchrl_s2ac.Temperature`), and ``actor_network_params`` holds the rest of the actor
    (:math:`q^0`, the amortized sampler). The three sets are disjoint. Every call goes through these
    parameters, with the critic's passed explicitly to the sampler (detached for the actor loss) and
    :math:`\alpha` passed explicitly: the forward pass writes nothing into the actor.

    Args:
        actor_network (SVGDActor): the policy; its critic is the one trained here.
        qvalue_network (TensorDictModuleBase, optional): ``actor_network.critic`` (the default) or the
            critic module the actor was built from.

    Keyword Args:
        alpha_init (float, optional): initial temperature. Defaults to the actor's alpha.
        fixed_alpha (bool): keep :math:`\alpha` fixed (the paper). Defaults to ``True``.
        target_entropy (float or "auto"): for a learned alpha; ``"auto"`` is
            :math:`-\dim(\mathcal A)`.
        min_alpha, max_alpha (float, optional): clamp on the learned alpha.
        loss_function, delay_qvalue, reduction, use_prioritized_weights: see
            :class:`~torchrl_s2ac.objectives.critic_loss.SoftQCriticLoss` (its keys too).

    The constructor installs a :class:`~torchrl_s2ac.Temperature` with these settings in the actor
    (``actor_network.temperature``), so that the actor acts with the temperature being learned. One loss per
    actor: a second ``S2ACLoss`` on an actor that a live one trains raises a ``ValueError``.

    The output TensorDict holds ``loss_actor``, ``loss_qvalue``, ``loss_alpha``,
    ``loss_amortized`` (zero without an amortized sampler), ``alpha``, ``entropy`` (mean closed-form
    entropy estimate over the batch) and diagnostics of the actor-loss sample: ``svgd_step_ratio``
    (the largest invertibility diagnostic), ``svgd_capped_fraction`` (fraction of states whose step
    the cap shortened, mean over steps), ``init_scale_mean`` / ``init_scale_min`` (:math:`q^0`'s
    :math:`\sigma_\theta(s)` over the batch and action dims), ``q_mean`` (mean of
    :math:`\min_k Q_k(s, a_i)`) and ``q_spread`` (mean over states of its standard deviation over the
    :math:`m` particles: the scale of the energy differences SVGD sees, to compare with :math:`\alpha`).

    Examples:
        >>> from torchrl_s2ac import SoftQCritic, SVGDActor
        >>> from torchrl_s2ac.envs import MultiGoalEnv
        >>> env = MultiGoalEnv()  # 2-d observations and actions
        >>> actor = SVGDActor(env.action_spec, SoftQCritic(2, 2, num_cells=[32]), num_particles=4, num_cells=[32])
        >>> loss = S2ACLoss(actor)
        >>> loss.make_value_estimator(gamma=0.99)  # doctest: +ELLIPSIS
        S2ACLoss(...)
        >>> data = env.rollout(8)  # transitions with random actions
        >>> losses = loss(data)
        >>> (losses["loss_actor"] + losses["loss_qvalue"]).backward()
        >>> sorted(key for key in losses.keys() if key.startswith("loss_"))
        ['loss_actor', 'loss_alpha', 'loss_amortized', 'loss_qvalue']
    """

    actor_network: SVGDActor
    temperature: Temperature

    def __init__(
        self,
        actor_network: SVGDActor,
        qvalue_network: TensorDictModuleBase | None = None,
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
        critic = actor_network.critic
        given = qvalue_network
        if (
            given is not None
            and given is not critic
            and not (isinstance(critic, CriticEnsemble) and given is critic.members[0])
        ):
            raise ValueError(
                "S2ACLoss: qvalue_network must be the critic the actor samples from (actor_network.critic)."
            )
        alpha_init = float(actor_network.alpha) if alpha_init is None else float(alpha_init)
        if not alpha_init > 0:
            raise ValueError(f"S2ACLoss: alpha_init must be > 0, got {alpha_init!r}.")
        if target_entropy == "auto":
            target_entropy = -float(actor_network.action_dim)
        elif isinstance(target_entropy, bool) or not isinstance(target_entropy, (int, float)):
            raise ValueError(f"S2ACLoss: target_entropy must be 'auto' or a number, got {target_entropy!r}.")
        if actor_network.stein.num_steps < 1:
            raise ValueError(
                f"S2ACLoss: the actor's num_steps must be >= 1, got {actor_network.stein.num_steps} "
                "(with no SVGD step the policy is q0 alone)."
            )
        self._check_settings(loss_function, reduction)
        owner = _TRAINING_LOSS.get(actor_network.temperature)
        if owner is not None and owner() is not None:
            raise ValueError(
                "S2ACLoss: this actor is already trained by another S2ACLoss (it acts with that loss's "
                "temperature); build one loss per actor, or a new actor for a second loss."
            )
        own = actor_network.temperature.log_alpha
        temperature = Temperature(alpha_init, learnable=not fixed_alpha, min_alpha=min_alpha, max_alpha=max_alpha)
        actor_network.temperature = temperature.to(device=own.device, dtype=own.dtype)
        super().__init__(
            actor_network,
            critic,
            loss_function=loss_function,
            delay_qvalue=delay_qvalue,
            reduction=reduction,
            use_prioritized_weights=use_prioritized_weights,
        )
        self.temperature = actor_network.temperature  # the same module: the actor acts with what is trained
        _TRAINING_LOSS[self.temperature] = weakref.ref(self)
        self.fixed_alpha = fixed_alpha
        self.register_buffer("target_entropy", torch.tensor(float(target_entropy), device=own.device))

    def __deepcopy__(self, memo: dict) -> S2ACLoss:
        copied = super().__deepcopy__(memo)
        _TRAINING_LOSS[copied.temperature] = weakref.ref(copied)  # the copied actor is the copy's to train
        return copied

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _TRAINING_LOSS[self.temperature] = weakref.ref(self)  # unpickled (torch.load, a collector's worker)

    @property
    def log_alpha(self) -> torch.Tensor:
        r"""The temperature's :math:`\log\alpha` (a parameter when learned)."""
        return self.temperature.log_alpha

    @property
    def _alpha(self) -> torch.Tensor:
        return self.temperature().detach()

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
        self.check_finite(tensordict)
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

    def _sample(self, observation: torch.Tensor, critic_params: TensorDictBase) -> ParticleSample:
        r"""The actor's particles with the loss's actor parameters, ``critic_params`` and :math:`\alpha`."""
        with self.actor_network_params.to_module(self.actor_network, preserve_module_state=False):
            return self.actor_network.sample_particles(observation, critic_params=critic_params, alpha=self._alpha)

    def next_state_value(self, next_observation: torch.Tensor) -> torch.Tensor:
        r""":math:`\frac1m\sum_i [\min_k \bar Q_k(s', a'_i) - \alpha \log\pi(a'_i|s')]`, ``[*batch]``.

        The particles follow the online critic's score; their values come from the target critic.
        """
        sample = self._sample(next_observation, self.qvalue_network_params.detach())
        with self.target_qvalue_network_params.to_module(self.qvalue_network, preserve_module_state=False):
            next_q = self.qvalue_network.min_values(next_observation.unsqueeze(-2), sample.action)
        return (next_q - self._alpha * sample.log_prob).mean(-1)

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Actor loss through the SVGD sampler; the critic's parameters are detached."""
        observation = self._get(tensordict, self.tensor_keys.observation)
        critic_params = self.qvalue_network_params.detach()
        sample = self._sample(observation, critic_params)
        with critic_params.to_module(self.qvalue_network, preserve_module_state=False):
            q = self.qvalue_network.min_values(observation.unsqueeze(-2), sample.action)
        loss = (self._alpha * sample.log_prob - q).mean(-1)
        weights = self._maybe_get_priority_weight(tensordict)
        loss = self._reduce_loss(loss, tensordict=tensordict, weights=weights)
        metadata = {"log_prob": sample.log_prob.detach(), "step_ratio": sample.step_ratio, "sample": sample}
        return loss, {**metadata, "q": q.detach()}

    def amortized_loss(self, sample: ParticleSample, tensordict: TensorDictBase) -> torch.Tensor:
        """Regression of the amortized sampler onto the particles of ``sample`` (zero without a sampler)."""
        if self.actor_network.amortized_sampler is None:
            return torch.zeros((), device=sample.action.device)
        observation = self._get(tensordict, self.tensor_keys.observation)
        with self.actor_network_params.to_module(self.actor_network, preserve_module_state=False):
            sampler = self.actor_network.amortized_sampler
            prediction = sampler.squash(sampler.transport(observation, sample.noise))
        error = ((prediction - sample.action.detach()) / sampler.squash.scale).square().sum(-1).mean(-1)
        return self._reduce_loss(error, tensordict=tensordict)

    def alpha_loss(self, log_prob: torch.Tensor, tensordict: TensorDictBase | None = None) -> torch.Tensor:
        r""":math:`-\log\alpha\,(\log\pi + \bar{\mathcal H})` averaged over particles; zero when alpha is fixed.

        At a bound of the temperature's clamp (``min_alpha``, ``max_alpha``) the gradient is dropped when
        descent (on the batch mean) would push :math:`\log\alpha` further out: the parameter then stays at the
        bound, up to an optimiser's momentum, instead of drifting past it, where the clamp hides it and the way
        back takes as many steps as the drift took.
        """
        if self.fixed_alpha:
            return torch.zeros((), device=log_prob.device)
        excess = (log_prob.mean(-1) + self.target_entropy).detach()  # descent moves log(alpha) along its mean
        temperature, push = self.temperature, excess.mean()
        outward = ((temperature.log_alpha >= temperature.max_log_alpha) & (push > 0)) | (
            (temperature.log_alpha <= temperature.min_log_alpha) & (push < 0)
        )
        loss = -self.log_alpha * excess.masked_fill(outward, 0.0)
        return self._reduce_loss(loss, tensordict=tensordict)
