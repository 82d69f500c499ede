"""SoftQCritic and SVGDActor: math, TensorDict interface, TorchRL collectors."""

import functools
import math
import pickle
import warnings

import pytest
import torch
from torch._inductor import config as inductor_config
from tensordict import TensorDict
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import Bounded, Unbounded
from torchrl.envs import Compose, DoubleToFloat, GymEnv, InitTracker, SerialEnv, StepCounter, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_s2ac import SoftQCritic, SVGDActor, SVGDNumericalError, TanhSquash

DT = torch.float64


def member_values(critic, observation, action, k):
    """Member k of the ensemble as a plain MLP, layer by layer."""
    x = torch.cat([observation, action], -1)
    for index, (weight, bias) in enumerate(zip(critic.weights, critic.biases)):
        x = x @ weight[k] + bias[k, 0]
        if index < len(critic.weights) - 1:
            x = critic.activation(x)
    return x.squeeze(-1)


@pytest.mark.parametrize(
    "activation",
    [nn.ELU, functools.partial(nn.ELU, alpha=0.5), functools.partial(nn.ELU, alpha=2.0), nn.ReLU, nn.Tanh],
    ids=["ELU", "ELU-alpha0.5", "ELU-alpha2", "ReLU", "Tanh"],
)
def test_critic_ensemble_and_closed_form_action_gradient(activation):
    critic = SoftQCritic(4, 2, num_cells=(16, 8), activation_class=activation, num_qvalue_nets=3).to(DT)
    observation = torch.randn(5, 7, 4, dtype=DT)
    action = torch.randn(5, 7, 2, dtype=DT, requires_grad=True)
    values = critic.ensemble_values(observation, action)
    assert values.shape == (3, 5, 7)
    for k in range(3):
        torch.testing.assert_close(values[k], member_values(critic, observation, action, k))
    q, dq_da = critic.values_and_action_grad(observation, action)
    torch.testing.assert_close(q, values)
    for k in range(3):
        (expected,) = torch.autograd.grad(values[k].sum(), action, retain_graph=True)
        torch.testing.assert_close(dq_da[k], expected)
    # The closed-form gradient is itself differentiable (second derivatives agree with autograd).
    weight = critic.weights[1]
    (second,) = torch.autograd.grad(dq_da.sum(), weight, retain_graph=True)
    (first,) = torch.autograd.grad(values.sum(), action, create_graph=True)
    (expected_second,) = torch.autograd.grad(first.sum(), weight)
    torch.testing.assert_close(second, expected_second)
    # min_k Q_k and its gradient: the minimum's autograd gradient (each entry picks its own member).
    q_min, dq_min = critic.min_values_and_action_grad(observation, action)
    minimum = critic.min_values(observation, action)
    torch.testing.assert_close(q_min, minimum)
    (expected,) = torch.autograd.grad(minimum.sum(), action)
    torch.testing.assert_close(dq_min, expected)


def test_critic_broadcasts_observations_and_actions_like_their_expanded_copies():
    """An observation shared by the m particles of a state is passed once and broadcast: values and parameter
    gradients equal those of the explicitly expanded inputs, whichever side broadcasts."""
    critic = SoftQCritic(4, 2, num_cells=(16, 8), num_qvalue_nets=2).to(DT)
    observation, action = torch.randn(5, 1, 4, dtype=DT), torch.randn(5, 7, 2, dtype=DT)
    cases = [(observation, action), (observation[0, 0], action), (observation.expand(5, 7, 4), action[0, 0])]
    for obs, act in cases:
        broadcast = critic.ensemble_values(obs, act)
        grads = torch.autograd.grad(broadcast.square().sum(), list(critic.parameters()))
        expanded = critic.ensemble_values(obs.expand(5, 7, 4), act.expand(5, 7, 2))
        expected_grads = torch.autograd.grad(expanded.square().sum(), list(critic.parameters()))
        assert broadcast.shape == (2, 5, 7)
        torch.testing.assert_close(broadcast, expanded)
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected)


def test_critic_output_layer_stays_in_full_precision_under_autocast():
    """Under bf16 autocast the hidden layers run in bf16 but Q itself is computed in fp32: a Q offset by 100
    keeps the differences between actions that a bf16 output (resolution 0.5 at 100) would round away."""
    critic = SoftQCritic(4, 2, num_cells=(64, 64))
    with torch.no_grad():
        critic.biases[-1].add_(100.0)
    observation, action = torch.randn(50, 4), torch.rand(50, 2) * 2 - 1
    q, dq_da = critic.values_and_action_grad(observation, action)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_low, dq_da_low = critic.values_and_action_grad(observation, action)
    assert q_low.dtype == torch.float32 and dq_da_low.dtype == torch.bfloat16
    assert not torch.equal(q_low, q)  # the hidden layers did run in bf16
    differences, differences_low = q - q.mean(), q_low - q_low.mean()
    assert (differences_low - differences).abs().max() < 0.05 * differences.abs().mean()
    torch.testing.assert_close(dq_da_low.float(), dq_da, rtol=0.05, atol=0.05 * dq_da.abs().mean().item())


def test_critic_tensordict_interface():
    critic = SoftQCritic(3, 2)
    td = TensorDict({"observation": torch.randn(4, 3), "action": torch.randn(4, 2)}, [4])
    assert critic(td)["state_action_value"].shape == (4, 2)
    min_critic = SoftQCritic(3, 2, reduce="min", in_keys=["obs", "act"], out_keys=["q"])
    td = TensorDict({"obs": torch.randn(4, 3), "act": torch.randn(4, 2)}, [4])
    q = min_critic(td)["q"]
    assert q.shape == (4, 1)
    torch.testing.assert_close(q.squeeze(-1), min_critic.ensemble_values(td["obs"], td["act"]).amin(0))
    with pytest.raises(ValueError, match="expects observation"):
        critic.ensemble_values(torch.randn(4, 5), torch.randn(4, 2))


def test_tanh_squash_log_det_is_stable_and_exact():
    squash = TanhSquash(torch.tensor([-2.0, 0.0], dtype=DT), torch.tensor([2.0, 1.0], dtype=DT))
    u = torch.tensor([[0.3, -1.2], [25.0, -30.0]], dtype=DT)
    a = squash(u)
    assert ((a >= squash.loc - squash.scale) & (a <= squash.loc + squash.scale)).all()
    expected = torch.log(squash.scale * (1 - torch.tanh(u[0]).square())).sum()
    torch.testing.assert_close(squash.log_abs_det_jacobian(u)[0], expected)
    assert torch.isfinite(squash.log_abs_det_jacobian(u)).all()  # the naive form gives -inf here
    with pytest.raises(ValueError, match="finite action bounds"):
        TanhSquash(torch.tensor([-math.inf]), torch.tensor([1.0]))


def test_tanh_squash_derivatives_match_autograd():
    squash = TanhSquash(torch.tensor([-2.0, 0.0], dtype=DT), torch.tensor([2.0, 1.0], dtype=DT))
    u = torch.randn(6, 2, dtype=DT, requires_grad=True)
    weights = torch.randn(6, 2, dtype=DT)  # grad_a of f(a) = <weights, a>
    (expected,) = torch.autograd.grad((weights * squash(u)).sum(), u)
    torch.testing.assert_close(squash.pullback(u, weights), expected)
    (expected,) = torch.autograd.grad(squash.log_abs_det_jacobian(u).sum(), u)
    torch.testing.assert_close(squash.log_abs_det_jacobian_grad(u), expected)


def make_actor(obs_dim=3, act_dim=2, **kwargs):
    spec = Bounded(-torch.ones(act_dim), 2 * torch.ones(act_dim), (act_dim,))
    critic = SoftQCritic(obs_dim, act_dim, num_cells=(32, 32))
    kwargs.setdefault("num_cells", (32, 32))
    return SVGDActor(spec, critic, num_particles=6, num_steps=2, **kwargs), critic


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_actor_shapes_and_bounds(batch):
    actor, _ = make_actor(particle_keys=["particle_action", "particle_log_prob"], return_log_prob=True)
    td = actor(TensorDict({"observation": torch.randn(*batch, 3)}, batch))
    assert td["action"].shape == (*batch, 2)
    assert td["action_log_prob"].shape == batch
    assert td["particle_action"].shape == (*batch, 6, 2)
    assert td["particle_log_prob"].shape == (*batch, 6)
    assert ((td["particle_action"] >= -1) & (td["particle_action"] <= 2)).all()
    # The chosen action is one of the particles.
    matches = (td["particle_action"] == td["action"].unsqueeze(-2)).all(-1)
    assert matches.any(-1).all()
    chosen_log_prob = td["particle_log_prob"][matches.float().argmax(-1, keepdim=True) == torch.arange(6)]
    torch.testing.assert_close(chosen_log_prob, td["action_log_prob"].reshape(-1))
    # Acting without the log-probability moves the particles the same way.
    torch.manual_seed(3)
    with_lp = actor.sample_particles(torch.ones(*batch, 3))
    torch.manual_seed(3)
    without = actor.sample_particles(torch.ones(*batch, 3), with_log_prob=False)
    assert without.log_prob is None
    torch.testing.assert_close(with_lp.action, without.action)


def test_actor_selection_follows_exploration_type():
    actor, critic = make_actor(train_selection="random", eval_selection="max", particle_keys=["pa", "plp"])
    obs = torch.randn(64, 3)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        td = actor(TensorDict({"observation": obs}, [64]))
    q = critic.min_values(obs.unsqueeze(-2).expand(64, 6, 3), td["pa"])
    best = td["pa"].gather(-2, q.argmax(-1)[:, None, None].expand(64, 1, 2)).squeeze(-2)
    torch.testing.assert_close(td["action"], best)
    with set_exploration_type(ExplorationType.RANDOM):
        td = actor(TensorDict({"observation": obs}, [64]))
    q = critic.min_values(obs.unsqueeze(-2).expand(64, 6, 3), td["pa"])
    chosen_q = critic.min_values(obs, td["action"])
    assert (chosen_q < q.amax(-1) - 1e-6).any()  # random selection is not always the argmax


def test_softmax_selection_frequencies():
    actor, critic = make_actor(eval_selection="softmax", alpha=0.05)
    obs = torch.randn(1, 3).expand(4000, 3)
    sample = actor.sample_particles(obs[:1])
    sample = sample._replace(action=sample.action.expand(4000, 6, 2))
    index = actor.select(obs, sample, "softmax")
    q = critic.min_values(obs[:1].unsqueeze(-2).expand(1, 6, 3), sample.action[:1])
    expected = torch.softmax(q / 0.05, -1).squeeze(0)
    observed = torch.bincount(index, minlength=6).float() / 4000
    torch.testing.assert_close(observed, expected.detach(), atol=0.03, rtol=0)


def test_explicit_score_matches_autograd_score(monkeypatch):
    actor, critic = make_actor()
    obs = torch.randn(4, 3)
    torch.manual_seed(1)
    explicit = actor.sample_particles(obs)
    monkeypatch.setattr(SoftQCritic, "has_explicit_action_grad", property(lambda self: False))
    torch.manual_seed(1)
    autograd = actor.sample_particles(obs)
    torch.testing.assert_close(explicit.action, autograd.action)
    torch.testing.assert_close(explicit.log_prob, autograd.log_prob)


def test_actor_registers_its_critic_and_no_grad_outputs_are_detached():
    actor, critic = make_actor()
    actor_params = {id(p) for p in actor.parameters()}
    critic_params = {id(p) for p in critic.parameters()}
    assert critic_params < actor_params and actor.critic is critic
    assert {id(p) for p in actor.init_network.parameters()} == actor_params - critic_params
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(3, 3)}, [3]))
    assert not td["action"].requires_grad


def test_fixed_initial_distribution():
    actor, critic = make_actor(fixed_init_std=0.5)
    assert actor.init_network is None and {id(p) for p in actor.parameters()} == {id(p) for p in critic.parameters()}
    loc, scale = actor.init_distribution(torch.randn(4, 3))
    assert (loc == 0).all() and (scale == 0.5).all()


def test_actor_errors():
    critic = SoftQCritic(3, 2)
    with pytest.raises(ValueError, match="bounded action spec"):
        SVGDActor(Unbounded((2,)), critic)
    with pytest.raises(ValueError, match="num_particles"):
        SVGDActor(Bounded(-1, 1, (2,)), critic, num_particles=1)
    with pytest.raises(ValueError, match="action_dim"):
        SVGDActor(Bounded(-1, 1, (3,)), critic)
    with pytest.raises(ValueError, match="train_selection"):
        SVGDActor(Bounded(-1, 1, (2,)), critic, train_selection="best")
    with pytest.raises(TypeError, match="TensorDict module"):
        SVGDActor(Bounded(-1, 1, (2,)), nn.Linear(5, 1), observation_dim=3)
    actor = SVGDActor(Bounded(-1, 1, (2,)), critic)
    with pytest.raises(ValueError, match="observations shaped"):
        actor.sample_particles(torch.randn(4, 5))


@pytest.mark.parametrize("env_name", ["Pendulum-v1", "InvertedPendulum-v5"])
@pytest.mark.parametrize("exploration", [ExplorationType.RANDOM, ExplorationType.DETERMINISTIC])
def test_actor_in_collector(env_name, exploration):
    env = TransformedEnv(
        SerialEnv(2, lambda: GymEnv(env_name)), Compose(InitTracker(), DoubleToFloat(), StepCounter(20))
    )
    obs_dim = env.observation_spec["observation"].shape[-1]
    critic = SoftQCritic(obs_dim, env.action_spec.shape[-1], num_cells=(32,))
    actor = SVGDActor(
        env.action_spec_unbatched, critic, num_particles=4, num_steps=2, num_cells=(32,), max_step_ratio=0.5
    )
    collector = Collector(env, actor, frames_per_batch=20, total_frames=40, exploration_type=exploration)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2
    data = batches[0]
    assert data.batch_size == (2, 10)
    assert data["action"].shape == (2, 10, env.action_spec.shape[-1])
    assert not data["action"].requires_grad
    assert env.action_spec_unbatched.is_in(data["action"][0, 0])


@pytest.mark.parametrize("selection, return_log_prob", [("random", True), ("max", True), ("softmax", False)])
def test_compiled_acting_matches_eager(selection, return_log_prob):
    """Sampling and the particle choice compile into one graph that acts as the eager actor does."""
    actor, _ = make_actor(
        compile_acting=True,
        return_log_prob=return_log_prob,
        particle_keys=["pa", "plp"],
        max_step_ratio=0.5,
        eval_selection=selection,
    )
    td = TensorDict({"observation": torch.randn(4, 3)}, [4])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # fallback_random: the compiled graph draws its random numbers as eager does, so one seed gives one sample
    with (
        torch.no_grad(),
        set_exploration_type(ExplorationType.DETERMINISTIC),
        inductor_config.patch(fallback_random=True),
    ):
        torch.manual_seed(7)
        compiled = actor(td.clone())
        actor.compile_acting = False
        torch.manual_seed(7)
        eager = actor(td.clone())
    assert list(actor._compiled_choose) == ["cpu"]
    assert pickle.loads(pickle.dumps(actor))._compiled_choose == {}  # compiled code stays in its process
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    for key in ("pa", "action"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    log_prob_keys = ("plp", "action_log_prob")
    assert all((key in compiled.keys()) == return_log_prob for key in log_prob_keys)
    for key in log_prob_keys if return_log_prob else ():
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("warn_ratio, warns", [(1e-9, True), (None, False), (1e9, False)])
def test_compiled_acting_warns_on_a_long_svgd_step(warn_ratio, warns):
    """The compiled graph flags a step ratio above ``warn_ratio``; the call then warns as the eager sampler does."""
    actor, _ = make_actor(compile_acting=True, warn_ratio=warn_ratio)
    td = TensorDict({"observation": torch.randn(4, 3)}, [4])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action = actor(td.clone())["action"]
    assert list(actor._compiled_choose) == ["cpu"]
    assert torch.isfinite(action).all()
    messages = [str(warning.message) for warning in caught]
    assert any("invertibility condition violated" in message for message in messages) == warns, messages


def test_compiled_acting_names_the_failing_step_of_a_non_finite_sample():
    """The compiled graph has no per-step checks; a non-finite sample is rerun eagerly, which names the step."""
    actor, critic = make_actor(compile_acting=True)
    td = TensorDict({"observation": torch.randn(4, 3)}, [4])
    with torch.no_grad():
        actor(td.clone())
        assert list(actor._compiled_choose) == ["cpu"]
        critic.weights[1][0, 0, 0] = float("nan")  # finite particles in, non-finite score out
        with pytest.raises(SVGDNumericalError, match=r"SVGD step 0 of 2: non-finite values in the score"):
            actor(td.clone())


@pytest.mark.parametrize("compile_policy", [True, {"warmup": 0, "options": {"cpp_wrapper": True}}])
def test_actor_compiled_by_the_collector(compile_policy):
    """TorchRL's ``compile_policy`` compiles the whole actor (selection included) without a graph break, with
    TorchRL's defaults and with the scripts' settings (compiled from the first call, inductor's C++ wrapper)."""
    env = TransformedEnv(GymEnv("Pendulum-v1"), Compose(InitTracker(), DoubleToFloat(), StepCounter(20)))
    critic = SoftQCritic(3, 1, num_cells=(32,))
    actor = SVGDActor(
        env.action_spec_unbatched,
        critic,
        num_particles=4,
        num_steps=2,
        num_cells=(32,),
        max_step_ratio=0.5,
        compile_acting=True,  # inside the collector's graph, the actor's own compilation steps aside
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    collector = Collector(
        env,
        actor,
        frames_per_batch=20,
        total_frames=40,
        exploration_type=ExplorationType.RANDOM,
        compile_policy=compile_policy,
    )
    batches = list(collector)
    collector.shutdown()
    assert [data["action"].shape for data in batches] == [(20, 1), (20, 1)]
    assert all(torch.isfinite(data["action"]).all() and not data["action"].requires_grad for data in batches)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]
    # TorchRL's default first call runs the policy uncompiled, where the actor compiles its own sampler; from the
    # first call on, the collector's graph traces the eager path instead.
    assert list(actor._compiled_choose) == ([] if isinstance(compile_policy, dict) else ["cpu"])
