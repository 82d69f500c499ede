"""SQLLoss against a hand-written reference, gradient isolation, errors, and a learning check."""

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.objectives import SoftUpdate

from helpers import assert_input_left_unchanged
from torchrl_s2ac import AmortizedSampler, RBFKernel, SoftQCritic, SQLLoss, SVGDNumericalError

DT = torch.float64
OBS, ACT, K, M = 3, 2, 5, 7
ALPHA, GAMMA = 0.4, 0.9
LOW, HIGH = torch.tensor([-1.0, -2.0], dtype=DT), torch.tensor([1.0, 0.5], dtype=DT)


def build(**kwargs):
    torch.manual_seed(0)
    spec = Bounded(LOW, HIGH, (ACT,), dtype=DT)
    critic = SoftQCritic(OBS, ACT, num_cells=(8, 8), num_qvalue_nets=2).to(DT)
    sampler = AmortizedSampler(spec, OBS, num_cells=(8,)).to(DT)
    kwargs = {"alpha_init": ALPHA, "num_value_samples": M, "num_particles": K, **kwargs}
    loss = SQLLoss(sampler, critic, **kwargs)
    loss.make_value_estimator(gamma=GAMMA)
    return loss, sampler, critic


def batch(n=4):
    terminated = torch.tensor([[True], [False], [False], [True]])[:n]
    return TensorDict(
        {
            "observation": torch.randn(n, OBS, dtype=DT),
            "action": LOW + (HIGH - LOW) * torch.rand(n, ACT, dtype=DT),
            "next": {
                "observation": torch.randn(n, OBS, dtype=DT),
                "reward": torch.randn(n, 1, dtype=DT),
                "done": terminated.clone(),
                "terminated": terminated,
            },
        },
        [n],
    )


def q_single(critic, k, obs, act):
    """Member k of the critic, written as a plain MLP over one (obs, act) pair."""
    x = torch.cat([obs, act])
    for index, (weight, bias) in enumerate(zip(critic.weights, critic.biases)):
        x = x @ weight[k] + bias[k].reshape(-1)
        if index < len(critic.weights) - 1:
            x = torch.nn.functional.elu(x)
    return x.reshape(())


def test_value_target_and_critic_loss_match_a_hand_reference():
    loss, sampler, critic = build()
    td = batch()
    with torch.no_grad():  # make the target critic differ from the online one
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    out = loss(td.clone())
    torch.manual_seed(1)  # the loss draws the uniform value actions first
    uniform = torch.rand(4, M, ACT, dtype=DT)
    actions = LOW + (HIGH - LOW) * uniform
    volume = torch.prod(HIGH - LOW)
    target_critic = SoftQCritic(OBS, ACT, num_cells=(8, 8), num_qvalue_nets=2).to(DT)
    loss.target_qvalue_network_params.to_module(target_critic)
    expected = 0.0
    for b in range(4):
        s_next = td["next", "observation"][b]
        exp_sum = sum(
            math.exp(min(q_single(target_critic, k, s_next, actions[b, j]).item() for k in range(2)) / ALPHA)
            for j in range(M)
        )
        value = ALPHA * math.log(volume.item() * exp_sum / M)
        y = td["next", "reward"][b].item() + GAMMA * (1 - float(td["next", "terminated"][b])) * value
        for k in range(2):
            expected += (q_single(critic, k, td["observation"][b], td["action"][b]).item() - y) ** 2
    assert out["loss_qvalue"].item() == pytest.approx(expected / 4, rel=1e-9)


def lower_median_bandwidth(u):
    sq = [((u[i] - u[j]) ** 2).sum().item() for i in range(len(u)) for j in range(len(u)) if i != j]
    sq.sort()
    return sq[(len(sq) - 1) // 2] / (2 * math.log(len(u) + 1))


def test_sampler_gradient_is_the_amortized_svgd_update():
    loss, sampler, critic = build()
    td = batch()
    torch.manual_seed(2)
    loss.actor_loss(td)[0].backward()
    got = {name: p.grad.clone() for name, p in sampler.named_parameters()}
    sampler.zero_grad()

    # Reference: the same draws, scores by autograd through the naive log(1 - tanh^2), loops over particles.
    torch.manual_seed(2)
    draws = sampler.sample(td["observation"], K)
    scale = (HIGH - LOW) / 2
    center = (HIGH + LOW) / 2
    phis = torch.zeros(4, K, ACT, dtype=DT)
    for b in range(4):
        u = draws.unsquashed[b].detach()
        scores = []
        for j in range(K):
            x = u[j].clone().requires_grad_(True)
            a = center + scale * torch.tanh(x)
            q = torch.stack([q_single(critic, k, td["observation"][b], a) for k in range(2)]).min()
            log_p = q / ALPHA + torch.log(scale * (1 - torch.tanh(x) ** 2)).sum()
            scores.append(torch.autograd.grad(log_p, x)[0])
        h = lower_median_bandwidth(u)
        for i in range(K):
            for j in range(K):
                kij = math.exp(-((u[i] - u[j]) ** 2).sum().item() / (2 * h))
                phis[b, i] += (kij * scores[j] + kij * (u[i] - u[j]) / h) / K
    grads = torch.autograd.grad(draws.unsquashed, list(sampler.parameters()), grad_outputs=-phis / (K * 4))
    for (name, _), expected in zip(sampler.named_parameters(), grads):
        torch.testing.assert_close(got[name], expected, rtol=1e-7, atol=1e-10)


def test_closed_form_score_gives_the_autograd_direction(monkeypatch):
    # SoftQCritic's closed-form action gradient and the squash's derivatives replace autograd in the sampler's
    # SVGD direction; a critic without them (the autograd path) must give the same loss and sampler gradient.
    results = []
    for closed_form in (True, False):
        loss, sampler, critic = build()
        monkeypatch.setattr(type(critic), "has_explicit_action_grad", property(lambda self: closed_form))
        torch.manual_seed(5)
        actor_loss, metrics = loss.actor_loss(batch())
        grads = torch.autograd.grad(actor_loss, list(sampler.parameters()))
        results.append((actor_loss.detach(), metrics["svgd_norm"], grads))
    (loss_cf, norm_cf, grads_cf), (loss_ag, norm_ag, grads_ag) = results
    torch.testing.assert_close(loss_cf, loss_ag)
    torch.testing.assert_close(norm_cf, norm_ag)
    for closed, auto in zip(grads_cf, grads_ag):
        torch.testing.assert_close(closed, auto)


def test_gradients_are_isolated():
    loss, sampler, critic = build()
    out = loss(batch())
    out["loss_qvalue"].backward(retain_graph=True)
    assert all(p.grad is None for p in sampler.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    critic.zero_grad(set_to_none=True)
    out["loss_actor"].backward()
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is not None for p in sampler.parameters())
    assert all(p.grad is None for p in loss.target_qvalue_network_params.values(True, True))


def test_soft_update_moves_the_target_critic_only():
    loss, sampler, critic = build()
    updater = SoftUpdate(loss, eps=0.5)
    before = loss.target_qvalue_network_params.clone()
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(1.0)
    updater.step()
    after = loss.target_qvalue_network_params
    for key, value in before.items(True, True):
        torch.testing.assert_close(after[key], 0.5 * value + 0.5 * loss.qvalue_network_params[key])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha_init": 0.0}, "alpha_init must be > 0"),
        ({"num_particles": 1}, "num_particles must be an int >= 2"),
        ({"num_value_samples": 0}, "num_value_samples must be an int >= 1"),
        ({"loss_function": "huber"}, "loss_function must be"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_mismatched_networks_and_missing_keys_are_named():
    spec = Bounded(-torch.ones(2), torch.ones(2), (2,))
    with pytest.raises(ValueError, match="critic.observation_dim=3 but observation_dim=4"):
        SQLLoss(AmortizedSampler(spec, 4), SoftQCritic(3, 2))
    with pytest.raises(TypeError, match="AmortizedSampler"):
        SQLLoss(SoftQCritic(3, 2), SoftQCritic(3, 2))
    loss, _, _ = build()
    with pytest.raises(KeyError, match="SQLLoss: key .*observation.* not found"):
        loss(batch().exclude("observation"))


def test_non_finite_svgd_direction_raises():
    loss, _, critic = build()
    with torch.no_grad():
        critic.weights[-1].fill_(float("nan"))
    with pytest.raises(SVGDNumericalError, match="SQLLoss: the SVGD direction"):
        loss.actor_loss(batch())


def test_svgd_direction_check_is_left_to_the_caller_while_a_graph_is_recorded(monkeypatch):
    # Inside a CUDA graph's capture a host synchronisation is an error (sql.py, compile.cudagraphs=true on an
    # H200): the harness checks the update's outputs instead, so the loss returns the non-finite value.
    import torchrl_s2ac.objectives.sql as sql_module

    loss, _, critic = build()
    with torch.no_grad():
        critic.weights[-1].fill_(float("nan"))
    monkeypatch.setattr(sql_module, "recording_graph", lambda: True)
    _, metrics = loss.actor_loss(batch())
    assert not torch.isfinite(metrics["svgd_norm"])


def test_sampler_learns_a_bimodal_target_from_a_fixed_critic():
    """With Q fixed to a two-mode function of the action, the trained sampler puts mass on both modes."""
    torch.manual_seed(0)
    spec = Bounded(-torch.ones(1), torch.ones(1), (1,))
    critic = SoftQCritic(1, 1, num_cells=(2,), activation_class=torch.nn.ReLU, num_qvalue_nets=1)
    with torch.no_grad():  # hidden = (relu(a), relu(-a)); Q = 3 relu(a) + 3 relu(-a) = 3 |a|
        critic.weights[0].copy_(torch.tensor([[[0.0, 0.0], [1.0, -1.0]]]))
        critic.biases[0].zero_()
        critic.weights[1].copy_(torch.tensor([[[3.0], [3.0]]]))  # modes at a = -1 and a = +1
        critic.biases[1].zero_()
    sampler = AmortizedSampler(spec, 1, num_cells=(32, 32))
    loss = SQLLoss(sampler, critic, alpha_init=1.0, num_particles=32, kernel=RBFKernel(rule="median"))
    optimizer = torch.optim.Adam(sampler.parameters(), lr=1e-2)
    td = TensorDict({"observation": torch.zeros(16, 1)}, [16])
    for _ in range(600):
        optimizer.zero_grad()
        loss.actor_loss(td)[0].backward()
        optimizer.step()
    with torch.no_grad():
        actions = sampler.sample(torch.zeros(1, 1), 4000).action.flatten()
    grid = torch.linspace(-1, 1, 20001)
    density = torch.exp(3 * grid.abs() / 1.0)
    expected = (density[grid > 0.5].sum() / density.sum()).item()  # ~0.41 per mode (a uniform sampler: 0.25)
    assert abs((actions > 0.5).float().mean().item() - expected) < 0.1
    assert abs((actions < -0.5).float().mean().item() - expected) < 0.1


def test_input_tensordict_is_left_unchanged_and_state_dict_round_trips():
    loss, _, _ = build()
    before = batch()
    assert_input_left_unchanged(loss, before.clone())
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.1)
    torch.manual_seed(3)
    expected = loss(before.clone())
    other, _, _ = build()
    other.load_state_dict(loss.state_dict())
    torch.manual_seed(3)
    got = other(before.clone())
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key])
