r"""Soft Q-learning (Haarnoja, Tang, Abbeel and Levine, ICML 2017) as a TorchRL :class:`~torchrl.objectives.LossModule`.

The baseline S2AC is compared with: a soft Q-function trained against an importance-sampled
soft value, and an amortized sampler trained by following the SVGD direction (amortized SVGD).
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, dispatch

from torchrl_s2ac.finite import recording_graph
from torchrl_s2ac.kernels import RBFKernel
from torchrl_s2ac.modules.critic import as_critic_ensemble
from torchrl_s2ac.modules.sampler import AmortizedSampler
from torchrl_s2ac.modules.temperature import Temperature
from torchrl_s2ac.objectives.critic_loss import SoftQCriticLoss
from torchrl_s2ac.stein import SVGDNumericalError, score, svgd_direction

__all__ = ["SQLLoss"]


class SQLLoss(SoftQCriticLoss):
    r"""Soft Q-learning loss with an amortized SVGD sampler.

    **Soft value.** With :math:`M` actions :math:`a'_j` drawn uniformly on the action box
    :math:`\mathcal A` (volume :math:`|\mathcal A|`) and target critics :math:`\bar Q_k`,

    .. math::
        V(s') = \alpha \log\Big(\frac{|\mathcal A|}{M}\sum_{j=1}^M \exp\big(\min_k \bar Q_k(s', a'_j)/\alpha\big)\Big)
        \approx \alpha \log\int_{\mathcal A} \exp(\bar Q(s', a)/\alpha)\,da,

    and the critic is trained toward :math:`y = r + \gamma(1 - \text{terminated}) V(s')`
    (:class:`~torchrl_s2ac.objectives.critic_loss.SoftQCriticLoss`).

    **Sampler.** :math:`K` draws :math:`u_i = f_\psi(s, \xi_i)`, :math:`a_i = \mathrm{squash}(u_i)`. The
    target :math:`\pi(a|s) \propto \exp(Q(s, a)/\alpha)`, pulled back to :math:`u`, has the score

    .. math::
        \nabla_u \log p(u) = \nabla_u \big[\min_k Q_k(s, \mathrm{squash}(u))/\alpha
            + \log|\det \partial a/\partial u|\big]

    (critic parameters detached), in closed form for a :class:`~torchrl_s2ac.SoftQCritic`
    (:math:`\nabla_a \min_k Q_k / \alpha` pulled back by :math:`r(1 - \tanh^2 u)`, plus :math:`-2\tanh u`), by
    autograd for any other critic. With :math:`\phi` the SVGD direction over the :math:`K` draws
    (:func:`~torchrl_s2ac.svgd_direction`, kernel bandwidth from the draws), the sampler loss

    .. math::
        \mathcal L_\psi = -\frac1K\sum_i \mathrm{sg}(\phi(u_i))^\top u_i

    has gradient :math:`-\frac1K\sum_i (\partial u_i/\partial\psi)^\top\phi(u_i)`: one step moves each
    draw along the SVGD direction (Wang and Liu's amortized SVGD).

    Args:
        actor_network (AmortizedSampler): :math:`f_\psi`.
        qvalue_network (TensorDictModuleBase): the soft Q ensemble (Haarnoja et al. use one network): a
            :class:`~torchrl_s2ac.SoftQCritic`, a :class:`~torchrl_s2ac.CriticEnsemble`, or any TensorDict
            module reading ``("observation", "action")`` and writing ``"state_action_value"``, ensembled
            ``num_qvalue_nets`` times.

    Keyword Args:
        num_qvalue_nets (int, optional): ensemble size for a generic critic. Defaults to ``2``.
        alpha_init (float): the fixed temperature :math:`\alpha > 0` (the inverse of SQL's reward scale), held
            in a :class:`~torchrl_s2ac.Temperature` like S2AC's. Defaults to ``0.2``.
        num_value_samples (int): :math:`M`. Defaults to ``16``.
        num_particles (int): :math:`K \geq 2`. Defaults to ``16``.
        kernel (RBFKernel): defaults to ``RBFKernel(rule="median")``.
        loss_function, delay_qvalue, reduction, use_prioritized_weights: see
            :class:`~torchrl_s2ac.objectives.critic_loss.SoftQCriticLoss` (its keys too).

    The output TensorDict holds ``loss_actor`` (the surrogate :math:`\mathcal L_\psi`, whose value is
    not meaningful; its gradient is), ``loss_qvalue``, ``alpha`` and ``svgd_norm`` (mean
    :math:`\|\phi(u_i)\|`: how far the sampler is from a fixed point).

    Examples:
        >>> from torchrl_s2ac import AmortizedSampler, SoftQCritic
        >>> from torchrl_s2ac.envs import MultiGoalEnv
        >>> env = MultiGoalEnv()  # 2-d observations and actions
        >>> loss = SQLLoss(AmortizedSampler(env.action_spec, 2, num_cells=[32]), SoftQCritic(2, 2, num_cells=[32]))
        >>> loss.make_value_estimator(gamma=0.99)  # doctest: +ELLIPSIS
        SQLLoss(...)
        >>> data = env.rollout(8)  # transitions with random actions
        >>> losses = loss(data)
        >>> (losses["loss_actor"] + losses["loss_qvalue"]).backward()
        >>> sorted(losses.keys())
        ['alpha', 'loss_actor', 'loss_qvalue', 'svgd_norm']
    """

    actor_network: AmortizedSampler
    temperature: Temperature

    def __init__(
        self,
        actor_network: AmortizedSampler,
        qvalue_network: TensorDictModuleBase,
        *,
        num_qvalue_nets: int | None = None,
        alpha_init: float = 0.2,
        num_value_samples: int = 16,
        num_particles: int = 16,
        kernel: RBFKernel | None = None,
        loss_function: str = "l2",
        delay_qvalue: bool = True,
        reduction: str | None = None,
        use_prioritized_weights: str | bool = "auto",
    ) -> None:
        if not isinstance(actor_network, AmortizedSampler):
            raise TypeError(f"SQLLoss: actor_network must be an AmortizedSampler, got {type(actor_network).__name__}.")
        if not alpha_init > 0:
            raise ValueError(f"SQLLoss: alpha_init must be > 0, got {alpha_init!r}.")
        if not (isinstance(num_value_samples, int) and num_value_samples >= 1):
            raise ValueError(f"SQLLoss: num_value_samples must be an int >= 1, got {num_value_samples!r}.")
        if not (isinstance(num_particles, int) and num_particles >= 2):
            raise ValueError(f"SQLLoss: num_particles must be an int >= 2, got {num_particles!r}.")
        qvalue_network = as_critic_ensemble(
            qvalue_network, num_qvalue_nets, actor_network.observation_dim, actor_network.action_dim, "SQLLoss"
        )
        super().__init__(
            actor_network,
            qvalue_network,
            loss_function=loss_function,
            delay_qvalue=delay_qvalue,
            reduction=reduction,
            use_prioritized_weights=use_prioritized_weights,
        )
        self.temperature = Temperature(alpha_init).to(next(qvalue_network.parameters()).device)
        self.num_value_samples = num_value_samples
        self.num_particles = num_particles
        self.kernel = kernel if kernel is not None else RBFKernel()

    @property
    def alpha(self) -> torch.Tensor:
        r"""The fixed temperature :math:`\alpha`."""
        return self.temperature().detach()

    @property
    def out_keys(self):
        return ["loss_actor", "loss_qvalue", "alpha", "svgd_norm"]

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.check_finite(tensordict)
        loss_qvalue, metadata = self.qvalue_loss(tensordict)
        loss_actor, actor_metadata = self.actor_loss(tensordict)
        tensordict.set(self.tensor_keys.priority, metadata["td_error"])
        return TensorDict(
            {
                "loss_actor": loss_actor,
                "loss_qvalue": loss_qvalue,
                "alpha": self.alpha,
                "svgd_norm": actor_metadata["svgd_norm"],
            },
            batch_size=[],
        )

    def next_state_value(self, next_observation: torch.Tensor) -> torch.Tensor:
        r"""Importance-sampled :math:`V(s')` with the uniform proposal on the action box, ``[*batch]``."""
        squash = self.actor_network.squash
        uniform = torch.rand(
            *next_observation.shape[:-1],
            self.num_value_samples,
            squash.loc.shape[-1],
            dtype=next_observation.dtype,
            device=next_observation.device,
        )
        actions = squash.loc + squash.scale * (2 * uniform - 1)
        with self.target_qvalue_network_params.to_module(self.qvalue_network, preserve_module_state=False):
            q = self.qvalue_network.min_values(next_observation.unsqueeze(-2), actions)
        log_volume = (2 * squash.scale).log().sum()
        return self.alpha * (torch.logsumexp(q / self.alpha, -1) - math.log(self.num_value_samples) + log_volume)

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Amortized SVGD surrogate for the sampler; no gradient reaches the critic."""
        observation = self._get(tensordict, self.tensor_keys.observation)
        sampler = self.actor_network
        with self.actor_network_params.to_module(sampler, preserve_module_state=False):
            draws = sampler.sample(observation, self.num_particles)
        per_particle_obs = observation.unsqueeze(-2)

        def log_density(u: torch.Tensor) -> torch.Tensor:
            q = self.qvalue_network.min_values(per_particle_obs, sampler.squash(u))
            return q / self.alpha + sampler.squash.log_abs_det_jacobian(u)

        with self.qvalue_network_params.detach().to_module(self.qvalue_network, preserve_module_state=False):
            particles = draws.unsquashed.detach()
            if self.qvalue_network.has_explicit_action_grad:
                # The same score in closed form: one graph under torch.compile, no autograd call.
                _, dq_da = self.qvalue_network.min_values_and_action_grad(per_particle_obs, sampler.squash(particles))
                log_p_grad = sampler.squash.pullback(particles, dq_da) / self.alpha
                log_p_grad = log_p_grad + sampler.squash.log_abs_det_jacobian_grad(particles)
            else:
                log_p_grad = score(log_density, particles, create_graph=False)
            direction = svgd_direction(self.kernel(particles), log_p_grad)
        if not recording_graph() and not torch.isfinite(direction).all():  # compiled/captured: the caller checks
            raise SVGDNumericalError(
                "SQLLoss: the SVGD direction for the sampler is not finite "
                f"(non-finite draws: {int((~torch.isfinite(particles)).any(-1).sum())}); "
                "check the critic's values and the sampler's outputs."
            )
        loss = -(direction * draws.unsquashed).sum(-1).mean(-1)
        weights = self._maybe_get_priority_weight(tensordict)
        loss = self._reduce_loss(loss, tensordict=tensordict, weights=weights)
        return loss, {"svgd_norm": direction.norm(dim=-1).mean()}
