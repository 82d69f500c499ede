r"""The S2AC policy: :math:`\pi(a|s) \propto \exp(Q(s, a)/\alpha)` sampled by SVGD from a learned :math:`q^0`."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
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
from torchrl_s2ac.finite import all_finite
from torchrl_s2ac.kernels import RBFKernel
from torchrl_s2ac.modules.critic import as_critic_ensemble
from torchrl_s2ac.modules.sampler import AmortizedSampler
from torchrl_s2ac.modules.temperature import Temperature
from torchrl_s2ac.stein import SteinEntropy

__all__ = ["ParticleChoice", "ParticleSample", "SVGDActor"]

SELECTIONS = ("random", "max", "softmax", "amortized")


class ParticleSample(NamedTuple):
    """All ``m`` SVGD particles of each state.

    Attributes:
        action: squashed particles :math:`a_i`, ``[*batch, m, d]``.
        log_prob: closed-form :math:`\\log\\pi(a_i|s)`, ``[*batch, m]`` (``None`` if not asked for).
        step_ratio: invertibility diagnostic per SVGD step, ``[L]``
            (see :class:`~torchrl_s2ac.SteinOutput`).
        init_scale: the :math:`q^0` standard deviation :math:`\\sigma_\\theta(s)`, ``[*batch, d]``.
        capped_fraction: per SVGD step, the fraction of states whose step the step-ratio cap
            shortened, ``[L]`` (see :class:`~torchrl_s2ac.SteinOutput`).
        noise: the standardized initial draws :math:`\\xi_i = (u_i^0 - \\mu_\\theta(s)) / \\sigma_\\theta(s)`,
            ``[*batch, m, d]``, detached (what an amortized sampler is conditioned on).
    """

    action: torch.Tensor
    log_prob: torch.Tensor
    step_ratio: torch.Tensor
    init_scale: torch.Tensor
    noise: torch.Tensor
    capped_fraction: torch.Tensor


class ParticleChoice(NamedTuple):
    """The particle each state acts with, and the sample it was chosen from.

    Attributes:
        action: the chosen particle :math:`a_{i^*}`, ``[*batch, d]``.
        log_prob: its closed-form :math:`\\log\\pi(a_{i^*}|s)`, ``[*batch]`` (``None`` if not asked for).
        sample: all ``m`` particles (:class:`ParticleSample`).
    """

    action: torch.Tensor
    log_prob: torch.Tensor | None
    sample: ParticleSample


class SVGDActor(TensorDictModuleBase):
    r"""Energy-based actor of S2AC.

    Per state :math:`s`: draw :math:`u_i^0 \sim q^0 = \mathcal N(\mu_\theta(s), \mathrm{diag}\,\sigma_\theta(s)^2)`
    truncated to :math:`\mu \pm 3\sigma`; run :math:`L` SVGD steps toward
    :math:`\exp(\min_k Q_k(s, \mathrm{squash}(u))/\alpha)`; return
    :math:`a_i = \mathrm{squash}(u_i^L)` and
    :math:`\log\pi(a_i|s) = \log q^L(u_i^L) - \log|\det \partial a / \partial u|`.

    The actor holds, as registered state, everything it acts with: :math:`q^0`'s network, the critic
    ensemble (``critic``) and the temperature (``temperature``). A copy, a pickle, a ``state_dict``, a
    :meth:`~tensordict.TensorDictBase.from_module` / :meth:`~tensordict.TensorDictBase.to_module` round trip,
    ``.to(device)`` or a collector's weight sync all carry them. A loss that needs other critic parameters
    (detached, target) or another temperature passes them explicitly to :meth:`sample_particles`, as
    TorchRL's losses swap parameters into their networks.

    Args:
        action_spec (TensorSpec): a bounded action spec; the squash maps onto its box.
        critic (TensorDictModuleBase): the energy :math:`Q(s, a)`: a :class:`~torchrl_s2ac.SoftQCritic`
            (its closed-form action gradient is the fast path), a
            :class:`~torchrl_s2ac.CriticEnsemble`, or any TensorDict module that reads
            ``("observation", "action")`` and writes ``"state_action_value"`` shaped ``[*batch, 1]``, which
            is ensembled ``num_qvalue_nets`` times (its action gradient is taken by autograd).

    Keyword Args:
        num_qvalue_nets (int, optional): ensemble size for a generic critic (default ``2``); must match a
            :class:`~torchrl_s2ac.SoftQCritic`'s own when given.
        observation_dim (int, optional): size of the observation's last dim; required for a generic critic.
        num_particles (int): :math:`m \geq 2`. Defaults to ``10``.
        num_steps (int): :math:`L`. Defaults to ``3``.
        step_size (float): :math:`\epsilon`. Defaults to ``0.1``.
        kernel (RBFKernel): defaults to ``RBFKernel(rule="median")``.
        alpha (float): temperature :math:`\alpha > 0` of the energy, held in a
            :class:`~torchrl_s2ac.Temperature` (``actor.temperature``). Defaults to ``0.2``.
            :class:`~torchrl_s2ac.S2ACLoss` installs the temperature it trains there.
        init_network (nn.Module, optional): maps observations ``[*batch, obs]`` to
            ``[*batch, 2 d]`` (mean and log-std of :math:`q^0`). Defaults to an
            MLP with ``num_cells`` and ``activation_class``.
        num_cells (sequence of int): hidden widths of the default :math:`q^0`
            network. Defaults to ``(256, 256, 256)``.
        activation_class (type): defaults to :class:`torch.nn.ELU`.
        fixed_init_std (float, optional): use the fixed :math:`q^0 = \mathcal N(0, \text{std}^2 I)`
            instead of a network (the release's multi-goal variant).
        log_std_bounds (tuple): clamp on the network's log-std. Defaults to ``(-20, 2)``.
        std_bounds (tuple): clamp on :math:`\sigma`. Defaults to ``(0.1, 1.0)``.
        max_step_ratio (float, optional): see :class:`~torchrl_s2ac.SteinEntropy`.
        warn_ratio (float, optional): see :class:`~torchrl_s2ac.SteinEntropy`. Defaults to ``1.0``.
        check_finite (bool): see :class:`~torchrl_s2ac.SteinEntropy`. Defaults to ``True``.
        score_dtype (torch.dtype, optional): evaluate the critic's score :math:`\nabla_a Q / \alpha`
            inside SVGD in this precision (``torch.bfloat16``: AMX / AVX-512 BF16 CPUs, GPUs); the rest
            of the sampler stays in full precision. See :class:`~torchrl_s2ac.SteinEntropy`. A
            :class:`~torchrl_s2ac.SoftQCritic` keeps its output layer (Q itself) in full precision; a generic
            critic (:class:`~torchrl_s2ac.CriticEnsemble`) runs its whole forward pass in this precision, so
            :math:`\min_k Q_k` may pick another member where the twins are close. Defaults to ``None`` (full
            precision).
        train_selection (str): particle chosen under ``ExplorationType.RANDOM``:
            ``"random"`` (a uniformly random particle), ``"max"`` (argmax Q),
            ``"softmax"`` (sampled with probabilities :math:`\propto e^{Q/\alpha}`) or
            ``"amortized"`` (no SVGD: one pass of ``amortized_sampler``). Defaults to ``"random"``.
        eval_selection (str): particle chosen under any other exploration type.
            Defaults to ``"max"``.
        default_exploration (ExplorationType): the exploration type assumed when
            none is set (TorchRL's :class:`~torchrl.modules.ProbabilisticActor`
            assumes deterministic). Defaults to ``ExplorationType.DETERMINISTIC``.
        in_keys: defaults to ``["observation"]``.
        out_keys: defaults to ``["action"]``.
        return_log_prob (bool): also write the chosen action's closed-form
            :math:`\log\pi(a|s)` under ``log_prob_key``. Acting without it skips the
            Stein trace (cheaper). Defaults to ``False``, like TorchRL's ``ProbabilisticActor``.
        log_prob_key: defaults to ``"action_log_prob"``.
        compile_acting (bool): run the acting path (calls made with gradients off: collectors,
            evaluation), sampling and particle choice together (:meth:`choose`), as one
            :func:`torch.compile` graph, with inductor's C++ wrapper on CPU (it spares each call
            the Python launcher of the graph's kernels). Possible because the closed-form critic
            gradient needs no double backward; the loss path stays eager. The graph also computes two
            flags, read by the call's one host synchronisation: a NaN or inf among the particles
            (with ``check_finite``) and a step ratio above ``warn_ratio``. On a non-finite value the
            call reruns eagerly, which raises naming the failing SVGD step (or warns, if the rerun's
            fresh draws are finite); on a long step it warns. The first call per selection
            rule, batch shape and device type compiles (seconds).
            Defaults to ``False``. The whole actor also compiles as one graph, e.g. through a
            TorchRL collector's ``compile_policy`` (then the finite checks and the invertibility
            warning are left out).
        particle_keys: when given (two keys), all particles ``[*batch, m, d]`` and
            their log-probabilities ``[*batch, m]`` (with ``return_log_prob``) are written too.
        amortized_sampler (AmortizedSampler, optional): the fast-inference network
            :math:`f_\psi(s, \xi)`; :class:`~torchrl_s2ac.S2ACLoss` trains it to map each particle's
            standardized initial draw :math:`\xi_i` to its SVGD endpoint :math:`a_i`. A submodule:
            its parameters are part of the actor's.

    Examples:
        >>> from torchrl.data import Bounded
        >>> from tensordict import TensorDict
        >>> from torchrl_s2ac import SoftQCritic
        >>> spec = Bounded(-torch.ones(2), torch.ones(2), (2,))
        >>> actor = SVGDActor(spec, SoftQCritic(3, 2, num_cells=[32]), num_particles=4, num_cells=[32])
        >>> actor(TensorDict({"observation": torch.randn(5, 3)}, [5]))["action"].shape
        torch.Size([5, 2])
        >>> sample = actor.sample_particles(torch.randn(5, 3))  # all m particles and their log pi(a_i|s)
        >>> sample.action.shape, sample.log_prob.shape
        (torch.Size([5, 4, 2]), torch.Size([5, 4]))
    """

    def __init__(
        self,
        action_spec: TensorSpec,
        critic: TensorDictModuleBase,
        *,
        num_qvalue_nets: int | None = None,
        observation_dim: int | None = None,
        num_particles: int = 10,
        num_steps: int = 3,
        step_size: float = 0.1,
        kernel: RBFKernel | None = None,
        alpha: float = 0.2,
        init_network: nn.Module | None = None,
        num_cells: Sequence[int] = (256, 256, 256),
        activation_class: type[nn.Module] = nn.ELU,
        fixed_init_std: float | None = None,
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
        std_bounds: tuple[float, float] = (0.1, 1.0),
        max_step_ratio: float | None = None,
        warn_ratio: float | None = 1.0,
        check_finite: bool = True,
        score_dtype: torch.dtype | None = None,
        train_selection: str = "random",
        eval_selection: str = "max",
        default_exploration: ExplorationType = ExplorationType.DETERMINISTIC,
        in_keys: Sequence[NestedKey] = ("observation",),
        out_keys: Sequence[NestedKey] = ("action",),
        return_log_prob: bool = False,
        log_prob_key: NestedKey = "action_log_prob",
        particle_keys: Sequence[NestedKey] | None = None,
        compile_acting: bool = False,
        amortized_sampler: AmortizedSampler | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(num_particles, int) and num_particles >= 2):
            raise ValueError(f"SVGDActor: num_particles must be an int >= 2, got {num_particles!r}.")
        if not alpha > 0:
            raise ValueError(f"SVGDActor: alpha must be > 0, got {alpha!r}.")
        for name, value in (("train_selection", train_selection), ("eval_selection", eval_selection)):
            if value not in SELECTIONS:
                raise ValueError(f"SVGDActor: {name} must be one of {SELECTIONS}, got {value!r}.")
        amortized = "amortized" in (train_selection, eval_selection)
        if amortized and amortized_sampler is None:
            raise ValueError("SVGDActor: the 'amortized' selection needs an amortized_sampler.")
        if amortized and (return_log_prob or particle_keys is not None):
            raise ValueError(
                "SVGDActor: the 'amortized' selection has no particles or closed-form log-density; "
                "it cannot be combined with return_log_prob=True or particle_keys."
            )
        if amortized_sampler is not None and not isinstance(amortized_sampler, AmortizedSampler):
            raise TypeError(
                f"SVGDActor: amortized_sampler must be an AmortizedSampler, got {type(amortized_sampler).__name__}."
            )
        squash = TanhSquash.from_action_spec(action_spec, "SVGDActor")
        critic = as_critic_ensemble(critic, num_qvalue_nets, observation_dim, action_spec.shape[-1], "SVGDActor")
        if len(in_keys) != 1 or len(out_keys) != 1:
            raise ValueError(f"SVGDActor: expects 1 in_key and 1 out_key, got {in_keys} and {out_keys}.")
        if particle_keys is not None and len(particle_keys) != 2:
            raise ValueError(f"SVGDActor: particle_keys must hold 2 keys, got {particle_keys}.")
        self.in_keys = list(in_keys)
        self.return_log_prob, self.log_prob_key = return_log_prob, log_prob_key
        self.particle_keys = None if particle_keys is None else list(particle_keys)
        self.out_keys = list(out_keys) + ([log_prob_key] if return_log_prob else [])
        if self.particle_keys is not None:
            self.out_keys += self.particle_keys[: 2 if return_log_prob else 1]
        self.action_dim = action_spec.shape[-1]
        self.observation_dim = critic.observation_dim
        self.num_particles = num_particles
        self.train_selection, self.eval_selection = train_selection, eval_selection
        self.default_exploration = default_exploration
        self.log_std_bounds, self.std_bounds = log_std_bounds, std_bounds
        self.squash = squash
        self.stein = SteinEntropy(
            kernel if kernel is not None else RBFKernel(),
            step_size,
            num_steps,
            max_step_ratio=max_step_ratio,
            warn_ratio=warn_ratio,
            check_finite=check_finite,
            score_dtype=score_dtype,
        )
        self.critic = critic
        self.temperature = Temperature(alpha)
        self.fixed_init_std = fixed_init_std
        if fixed_init_std is not None:
            if not fixed_init_std > 0:
                raise ValueError(f"SVGDActor: fixed_init_std must be > 0, got {fixed_init_std!r}.")
            self.init_network = None
        else:
            self.init_network = (
                init_network
                if init_network is not None
                else MLP(
                    in_features=self.observation_dim,
                    out_features=2 * self.action_dim,
                    num_cells=list(num_cells),
                    activation_class=activation_class,
                )
            )
        if amortized_sampler is not None and (
            amortized_sampler.action_dim != self.action_dim or amortized_sampler.observation_dim != self.observation_dim
        ):
            raise ValueError(
                f"SVGDActor: amortized_sampler maps {amortized_sampler.observation_dim}-d observations to "
                f"{amortized_sampler.action_dim}-d actions; the actor needs "
                f"{self.observation_dim} -> {self.action_dim}."
            )
        self.amortized_sampler = amortized_sampler
        self.compile_acting = compile_acting
        self._compiled_choose = {}  # per device type, built lazily, per process (not pickled)

    def __getstate__(self):
        state = super().__getstate__()
        state["_compiled_choose"] = {}
        return state

    @property
    def alpha(self) -> torch.Tensor:
        r"""The temperature :math:`\alpha` the actor acts with (detached)."""
        return self.temperature().detach()

    def _acting_choice(self, observation: torch.Tensor, selection: str) -> ParticleChoice:
        # A caller compiling the whole policy (a collector's compile_policy) traces the eager path into its graph.
        if not self.compile_acting or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.choose(observation, selection)
        device_type = observation.device.type
        if device_type not in self._compiled_choose:
            options = {"cpp_wrapper": True} if device_type == "cpu" else None
            self._compiled_choose[device_type] = torch.compile(self._checked_choice, dynamic=False, options=options)
        choice, flags = self._compiled_choose[device_type](observation, selection)
        non_finite, long_step = flags.tolist()  # the call's one host synchronisation
        if non_finite:
            # The compiled graph skips the per-step checks; rerun eagerly, which raises naming the failing step.
            choice = self.choose(observation, selection)
            warnings.warn(
                f"SVGDActor: the compiled sampler returned non-finite particles where an eager rerun on fresh "
                f"draws did not (the rerun's actions are used); observations shaped {tuple(observation.shape)}.",
                stacklevel=3,
            )
        elif long_step:
            self.stein.warn_if_not_invertible(choice.sample.step_ratio)  # also left out of the graph
        return choice

    def _checked_choice(self, observation: torch.Tensor, selection: str) -> tuple[ParticleChoice, torch.Tensor]:
        """:meth:`choose`, and two flags computed with it in the compiled graph, ``[2]`` bool: a non-finite particle
        or log-density (with ``check_finite``), and an SVGD step ratio above ``warn_ratio``. A check that is off
        gives ``False``."""
        choice = self.choose(observation, selection)
        sample = choice.sample
        off = torch.zeros((), dtype=torch.bool, device=observation.device)
        outputs = (value for value in (sample.action, sample.log_prob) if value is not None)
        non_finite = ~all_finite(outputs) if self.stein.check_finite else off
        check_ratio = self.stein.warn_ratio is not None and sample.step_ratio.numel()
        long_step = sample.step_ratio.max() > self.stein.warn_ratio if check_ratio else off
        return choice, torch.stack([non_finite, long_step])

    def init_distribution(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean :math:`\mu_\theta(s)` and clamped std :math:`\sigma_\theta(s)` of :math:`q^0`, each ``[*batch, d]``."""
        if self.init_network is None:
            loc = observation.new_zeros(*observation.shape[:-1], self.action_dim)
            return loc, torch.full_like(loc, self.fixed_init_std)
        loc, log_std = self.init_network(observation).chunk(2, dim=-1)
        scale = log_std.clamp(*self.log_std_bounds).exp().clamp(*self.std_bounds)
        return loc, scale

    def sample_particles(
        self,
        observation: torch.Tensor,
        with_log_prob: bool = True,
        *,
        critic_params: TensorDictBase | None = None,
        alpha: torch.Tensor | float | None = None,
    ) -> ParticleSample:
        """Run the sampler for observations ``[*batch, obs]``; differentiable when grad is enabled.

        ``with_log_prob=False`` skips the density bookkeeping (``log_prob`` is then ``None``).
        ``critic_params`` (the critic's parameters, e.g. a loss's detached ones) and ``alpha`` replace the
        actor's own for this call; the actor's state is left as it is.
        """
        if observation.shape[-1] != self.observation_dim:
            raise ValueError(
                f"SVGDActor expects observations shaped [..., {self.observation_dim}], got {tuple(observation.shape)}."
            )
        alpha = self.alpha if alpha is None else alpha
        critic, squash = self.critic, self.squash
        loc, scale = self.init_distribution(observation)
        particles, log_q0 = sample_truncated_normal(loc, scale, self.num_particles)
        noise = ((particles - loc.unsqueeze(-2)) / scale.unsqueeze(-2)).detach()
        log_q0 = log_q0 if with_log_prob else None
        per_particle_obs = observation.unsqueeze(-2)  # the critic broadcasts it over the m particles

        def log_density(u: torch.Tensor) -> torch.Tensor:
            return critic.min_values(per_particle_obs, squash(u)) / alpha

        def score_fn(u: torch.Tensor) -> torch.Tensor:
            # grad_u min_k Q_k(s, squash(u)) / alpha, with the input gradient in closed form.
            _, dq_da = critic.min_values_and_action_grad(per_particle_obs, squash(u))
            return squash.pullback(u, dq_da) / alpha

        # preserve_module_state=False: the (e.g. detached) tensors are swapped in as they are; rebuilding
        # nn.Parameters from them would break a torch.compile graph (as TorchRL's _vmap_func does).
        with nullcontext() if critic_params is None else critic_params.to_module(critic, preserve_module_state=False):
            if critic.has_explicit_action_grad:
                out = self.stein.sample(None, particles, log_q0, score_fn=score_fn)
            else:
                out = self.stein.sample(log_density, particles, log_q0)
        log_prob = out.log_prob - squash.log_abs_det_jacobian(out.particles) if with_log_prob else None
        return ParticleSample(squash(out.particles), log_prob, out.step_ratio, scale, noise, out.capped_fraction)

    def _exploring(self) -> bool:
        return (exploration_type() or self.default_exploration) == ExplorationType.RANDOM

    def _selection(self) -> str:
        return self.train_selection if self._exploring() else self.eval_selection

    def select(self, observation: torch.Tensor, sample: ParticleSample, selection: str) -> torch.Tensor:
        """Index ``[*batch]`` of the particle to act with."""
        batch_shape = sample.action.shape[:-2]
        if selection == "random":
            # Particles are exchangeable (i.i.d. initial draws, symmetric updates).
            return torch.randint(self.num_particles, batch_shape, device=observation.device)
        with torch.no_grad():
            q = self.critic.min_values(observation.unsqueeze(-2), sample.action.detach())
        if selection == "max":
            return q.argmax(-1)
        # Gumbel-max: argmax_i (Q_i / alpha + G_i), G_i ~ Gumbel(0, 1), is distributed as softmax(Q / alpha),
        # without the host-side argument checks of torch.distributions (which break a compiled graph).
        logits = q / self.alpha
        logits = logits - logits.amax(-1, keepdim=True)  # O(1) values, so that the O(1) noise is not rounded away
        gumbel = -torch.empty_like(q).exponential_().log()
        return (logits + gumbel).argmax(-1)

    def choose(self, observation: torch.Tensor, selection: str) -> ParticleChoice:
        """Sample the ``m`` particles of each state (:meth:`sample_particles`, with the log-density when
        ``return_log_prob``) and pick the one to act with by ``selection`` (:meth:`select`)."""
        sample = self.sample_particles(observation, with_log_prob=self.return_log_prob)
        index = self.select(observation, sample, selection)
        action = sample.action.gather(-2, index[..., None, None].expand(*index.shape, 1, self.action_dim))
        log_prob = None if sample.log_prob is None else sample.log_prob.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return ParticleChoice(action.squeeze(-2), log_prob, sample)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        observation = tensordict.get(self.in_keys[0])
        selection = self._selection()
        if selection == "amortized":
            tensordict.set(self.out_keys[0], self.amortized_sampler.act(observation, explore=self._exploring()))
            return tensordict
        choice = self._acting_choice(observation, selection)
        tensordict.set(self.out_keys[0], choice.action)
        if self.return_log_prob:
            tensordict.set(self.log_prob_key, choice.log_prob)
        if self.particle_keys is not None:
            tensordict.set(self.particle_keys[0], choice.sample.action)
            if self.return_log_prob:
                tensordict.set(self.particle_keys[1], choice.sample.log_prob)
        return tensordict
