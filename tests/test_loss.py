"""S2ACLoss against a hand-written reference, gradient isolation, keys, reductions."""

import copy
import gc
import io
import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.objectives import SoftUpdate

from helpers import assert_input_left_unchanged
from torchrl_s2ac import RBFKernel, S2ACLoss, SoftQCritic, SVGDActor, sample_truncated_normal

DT = torch.float64
OBS, ACT, M, L = 3, 2, 4, 2


def build(dtype=DT, **loss_kwargs):
    torch.manual_seed(0)
    spec = Bounded(-torch.ones(ACT), torch.ones(ACT), (ACT,))
    critic = SoftQCritic(OBS, ACT, num_cells=(16, 16), num_qvalue_nets=2)
    actor = SVGDActor(
        spec,
        critic,
        num_particles=M,
        num_steps=L,
        step_size=0.1,
        kernel=RBFKernel(rule="median"),
        alpha=0.3,
        num_cells=(16,),
        warn_ratio=None,  # random tiny critics take large steps
    )
    actor.to(dtype), critic.to(dtype)
    loss = S2ACLoss(actor, **loss_kwargs)
    loss.make_value_estimator(gamma=0.9)
    return loss, actor, critic


def batch(shape=(5,), dtype=DT, keys=None):
    keys = keys or {}
    obs, act, rew, done, term = (keys.get(k, k) for k in ("observation", "action", "reward", "done", "terminated"))
    terminated = torch.zeros(*shape, 1, dtype=torch.bool)
    terminated.view(-1)[::2] = True
    return TensorDict(
        {
            obs: torch.randn(*shape, OBS, dtype=dtype),
            act: torch.rand(*shape, ACT, dtype=dtype) * 2 - 1,
            "next": {
                obs: torch.randn(*shape, OBS, dtype=dtype),
                rew: torch.randn(*shape, 1, dtype=dtype),
                done: terminated.clone(),
                term: terminated,
            },
        },
        shape,
    )


# ----------------------------------------------------------------------------
# Reference: SVGD with loops over particles, autograd scores, the naive squash.
# ----------------------------------------------------------------------------


def ref_q(critic, params, obs, action):
    """[num_q] values of one (obs, action) pair, member by member."""
    values = []
    for k in range(critic.num_qvalue_nets):
        x = torch.cat([obs, action])
        for index in range(len(critic.weights)):
            x = x @ params[f"weights.{index}"][k] + params[f"biases.{index}"][k, 0]
            if index < len(critic.weights) - 1:
                x = torch.nn.functional.elu(x)
        values.append(x.squeeze())
    return torch.stack(values)


def ref_policy(actor, critic, params, obs, alpha):
    """Particles and log pi for one state."""
    loc, log_std = actor.init_network(obs).chunk(2, -1)
    scale = log_std.clamp(-20, 2).exp().clamp(0.1, 1.0)
    u, log_q = sample_truncated_normal(loc, scale, M)

    def log_p(x):
        return ref_q(critic, params, obs, torch.tanh(x)).min() / alpha

    for _ in range(L):
        scores = torch.stack(
            [
                torch.autograd.grad(log_p(u[i]), u, create_graph=True)[0][i]
                if u.requires_grad
                else torch.autograd.grad(log_p(u[i].requires_grad_()), u[i])[0]
                for i in range(M)
            ]
        )
        sq = torch.stack([torch.stack([(u[i] - u[j]).square().sum() for j in range(M)]) for i in range(M)])
        off = torch.stack([sq[i, j] for i in range(M) for j in range(M) if i < j]).detach()
        h = off.sort().values[(off.numel() - 1) // 2] / (2 * math.log(M + 1))
        phi, trace = [], []
        for i in range(M):
            p, t = 0, 0
            for j in range(M):
                k = torch.exp(-sq[i, j] / (2 * h))
                p = p + k * scores[j] + k * (u[i] - u[j]) / h
                if j != i:
                    t = t + k / h * (ACT - sq[i, j] / h - (u[i] - u[j]) @ scores[j])
            phi.append(p / M)
            trace.append(t / M)
        log_q = log_q - 0.1 * torch.stack(trace)
        u = u + 0.1 * torch.stack(phi)
    log_pi = log_q - torch.log(1 - torch.tanh(u).square()).sum(-1)
    return torch.tanh(u), log_pi


def test_loss_values_and_actor_gradient_match_reference():
    loss, actor, critic = build()
    td = batch()
    torch.manual_seed(123)
    out = loss(td.clone())
    (actor_grad,) = torch.autograd.grad(out["loss_actor"], [actor.init_network[0].weight])

    params = {k: v.detach() for k, v in critic.state_dict().items()}
    alpha, gamma = 0.3, 0.9
    torch.manual_seed(123)
    # Critic target: particles at s' with the same draws (the loss samples s' first).
    targets = []
    next_obs = td["next", "observation"]
    states = [ref_policy(actor, critic, params, next_obs[b : b + 1].squeeze(0), alpha) for b in range(5)]
    for b, (a_next, log_pi_next) in enumerate(states):
        q_next = torch.stack([ref_q(critic, params, next_obs[b], a).min() for a in a_next])
        soft_value = q_next.mean() - alpha * log_pi_next.mean()
        not_term = 1 - td["next", "terminated"][b].to(DT)
        targets.append(td["next", "reward"][b] + gamma * not_term * soft_value)
    y = torch.stack(targets).squeeze(-1).detach()
    q = torch.stack([ref_q(critic, params, td["observation"][b], td["action"][b]) for b in range(5)])  # [B, 2]
    ref_loss_q = (q - y.unsqueeze(-1)).square().sum(-1).mean()
    torch.testing.assert_close(out["loss_qvalue"], ref_loss_q)

    # Actor loss: particles at s, differentiable into q0.
    actor_terms = []
    for b in range(5):
        a, log_pi = ref_policy(actor, critic, params, td["observation"][b], alpha)
        q_a = torch.stack([ref_q(critic, params, td["observation"][b], a_i).min() for a_i in a])
        actor_terms.append((alpha * log_pi - q_a).mean())
    ref_loss_actor = torch.stack(actor_terms).mean()
    torch.testing.assert_close(out["loss_actor"], ref_loss_actor)
    (ref_grad,) = torch.autograd.grad(ref_loss_actor, [actor.init_network[0].weight])
    torch.testing.assert_close(actor_grad, ref_grad)


def grads_of(loss, key):
    loss.zero_grad()
    loss(batch())[key].backward()
    actor = [p.grad for p in loss.actor_network_params.values(True, True) if p.requires_grad]
    critic = [p.grad for p in loss.qvalue_network_params.values(True, True) if p.requires_grad]
    assert actor and critic
    return actor, critic


def test_gradient_isolation():
    loss, _, _ = build(fixed_alpha=False)
    actor, critic = grads_of(loss, "loss_actor")
    assert all(g is not None and g.abs().sum() > 0 for g in actor)
    assert all(g is None or (g == 0).all() for g in critic)
    assert loss.log_alpha.grad is None
    actor, critic = grads_of(loss, "loss_qvalue")
    assert all(g is None or (g == 0).all() for g in actor)
    assert all(g is not None and g.abs().sum() > 0 for g in critic)
    loss.zero_grad()
    loss(batch())["loss_alpha"].backward()
    assert loss.log_alpha.grad is not None
    assert all(p.grad is None or (p.grad == 0).all() for p in loss.actor_network_params.values(True, True))


def test_target_parameters_move_only_through_soft_update():
    loss, _, critic = build()
    updater = SoftUpdate(loss, tau=0.5)
    target_before = loss.target_qvalue_network_params.clone()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    out = loss(batch())
    (out["loss_qvalue"] + out["loss_actor"]).backward()
    optimizer.step()
    online = loss.qvalue_network_params
    assert (online["weights", "0"] != target_before["weights", "0"]).any()
    torch.testing.assert_close(loss.target_qvalue_network_params["weights", "0"], target_before["weights", "0"])
    # The critic module's own weights are the trained (online) ones.
    assert critic.weights[0] is online["weights", "0"]
    updater.step()
    expected = 0.5 * target_before["weights", "0"] + 0.5 * online["weights", "0"].detach()
    torch.testing.assert_close(loss.target_qvalue_network_params["weights", "0"], expected)


def test_learned_alpha_moves_toward_target_entropy():
    for target_entropy, direction in ((50.0, 1), (-50.0, -1)):
        loss, actor, _ = build(fixed_alpha=False, target_entropy=target_entropy)
        optimizer = torch.optim.Adam([loss.log_alpha], lr=0.05)
        start = loss.log_alpha.item()
        for _ in range(5):
            optimizer.zero_grad()
            loss(batch())["loss_alpha"].backward()
            optimizer.step()
        assert direction * (loss.log_alpha.item() - start) > 0.1
        # The actor's energy temperature follows the loss's alpha.
        loss(batch())
        assert actor.alpha.item() == pytest.approx(math.exp(loss.log_alpha.item()))


def test_learned_alpha_stays_at_its_clamp_instead_of_drifting_past_it():
    # The entropy asks for more alpha: each step raises log(alpha) by about lr x 50 = 0.05.
    loss, actor, _ = build(fixed_alpha=False, target_entropy=50.0, alpha_init=0.45, max_alpha=0.5)
    optimizer = torch.optim.SGD([loss.log_alpha], lr=0.001)
    for _ in range(20):
        optimizer.zero_grad()
        loss(batch())["loss_alpha"].backward()
        optimizer.step()
    # One step crosses the bound; after it the outward gradient is dropped (without that: about 1 past it).
    assert math.log(0.5) <= loss.log_alpha.item() < math.log(0.5) + 0.1
    assert loss.log_alpha.grad.item() == 0.0 and actor.alpha.item() == pytest.approx(0.5)
    # An entropy above the target pulls it back inside at once.
    loss.target_entropy.fill_(-50.0)
    optimizer.zero_grad()
    loss(batch())["loss_alpha"].backward()
    assert loss.log_alpha.grad.item() > 0  # descent lowers log(alpha)
    # Inside the clamp the gradient is the plain one, -(mean log pi + target).
    inside, _, _ = build(fixed_alpha=False, target_entropy=1.0, min_alpha=0.01, max_alpha=10.0)
    log_prob = torch.randn(5, M, dtype=DT)
    inside.alpha_loss(log_prob).backward()
    torch.testing.assert_close(inside.log_alpha.grad, -(log_prob.mean() + 1.0))


def test_terminated_stops_bootstrapping_truncation_does_not():
    loss, _, _ = build()
    td = batch((4,))
    td["next", "terminated"] = torch.tensor([[True], [False], [False], [True]])
    td["next", "done"] = torch.tensor([[True], [True], [False], [True]])  # index 1 truncated
    target = loss.value_target(td).squeeze(-1)
    reward = td["next", "reward"].squeeze(-1)
    torch.testing.assert_close(target[[0, 3]], reward[[0, 3]])
    assert (target[[1, 2]] != reward[[1, 2]]).all()


def test_set_keys_renames_end_to_end():
    loss, _, _ = build()
    names = {"observation": "obs", "action": "act", "reward": "rew", "done": "fin", "terminated": "term"}
    loss.set_keys(**names)
    out = loss(batch(keys=names))
    assert torch.isfinite(out["loss_actor"]) and torch.isfinite(out["loss_qvalue"])
    assert ("next", "rew") in loss.in_keys and "obs" in loss.in_keys
    with pytest.raises(KeyError, match=r"obs.* not found"):
        loss(batch())


@pytest.mark.parametrize("shape", [(6,), (2, 3), (2, 2, 2)])
def test_leading_batch_dims_float32(shape):
    loss, _, _ = build(dtype=torch.float32)
    td = batch(shape, dtype=torch.float32)
    out = loss(td)
    assert out["loss_actor"].dtype == torch.float32 and out["loss_actor"].shape == ()
    assert td["td_error"].shape == shape


def test_reductions():
    loss, _, _ = build(reduction="none")
    torch.manual_seed(5)
    none = loss(batch((6,)))
    assert none["loss_actor"].shape == (6,) and none["loss_qvalue"].shape == (6,)
    loss.reduction = "sum"
    torch.manual_seed(5)
    total = loss(batch((6,)))
    torch.testing.assert_close(total["loss_qvalue"], none["loss_qvalue"].sum())
    torch.testing.assert_close(total["loss_actor"], none["loss_actor"].sum())


def test_priority_weights_are_applied():
    loss, _, _ = build(reduction="none")
    td = batch((6,))
    torch.manual_seed(5)
    per_sample = loss.qvalue_loss(td.clone())[0]
    weights = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.0, 3.0], dtype=DT)
    td["priority_weight"] = weights
    loss.reduction = "mean"
    torch.manual_seed(5)
    weighted = loss.qvalue_loss(td)[0]
    torch.testing.assert_close(weighted, (weights * per_sample).sum() / weights.sum())


def test_keyword_dispatch():
    loss, _, _ = build()
    td = batch()
    out = loss(
        observation=td["observation"],
        action=td["action"],
        next_observation=td["next", "observation"],
        next_reward=td["next", "reward"],
        next_done=td["next", "done"],
        next_terminated=td["next", "terminated"],
    )
    assert len(out) == len(loss.out_keys)


def test_errors():
    loss, actor, critic = build()
    with pytest.raises(KeyError, match=r"action.* not found"):
        loss(batch().exclude("action"))
    with pytest.raises(ValueError, match="must be the critic"):
        S2ACLoss(actor, SoftQCritic(OBS, ACT))
    with pytest.raises(TypeError, match="SVGDActor"):
        S2ACLoss(critic)
    with pytest.raises(ValueError, match="loss_function"):
        S2ACLoss(actor, loss_function="huber")
    with pytest.raises(ValueError, match="alpha_init"):
        S2ACLoss(actor, alpha_init=0.0)
    with pytest.raises(ValueError, match="target_entropy must be 'auto' or a number, got 'high'"):
        S2ACLoss(actor, target_entropy="high")
    shallow = SVGDActor(Bounded(-1.0, 1.0, (ACT,)), critic, num_steps=0)
    temperature = shallow.temperature
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        S2ACLoss(shallow)
    assert shallow.temperature is temperature  # a refused loss leaves the actor as it was
    with pytest.raises(ValueError, match="already trained by another S2ACLoss"):
        S2ACLoss(actor)
    assert actor.temperature is loss.temperature
    td = batch()
    td["next", "reward"] = torch.randn(5, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"\(.next., .reward.\) has shape \(5, 3\)"):
        loss(td)


def test_copies_of_a_loss_keep_their_actor_bound():
    loss, _, _ = build()
    buffer = io.BytesIO()
    torch.save(loss, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(loss), torch.load(buffer, weights_only=False)):
        assert copied.actor_network.temperature is copied.temperature
        with pytest.raises(ValueError, match="already trained by another S2ACLoss"):
            S2ACLoss(copied.actor_network)


def test_a_deleted_loss_frees_its_actor():
    loss, actor, _ = build()
    del loss
    gc.collect()
    other = S2ACLoss(actor, alpha_init=0.5)
    assert actor.temperature is other.temperature and float(actor.alpha) == pytest.approx(0.5)


def test_state_dict_round_trip():
    loss, actor, _ = build(fixed_alpha=False)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for _ in range(2):
        SoftUpdate(loss, eps=0.5).step()  # targets differ from the online critic
    other, _, _ = build(fixed_alpha=False)
    other.load_state_dict(loss.state_dict())
    td = batch()
    torch.manual_seed(3)
    expected = loss(td.clone())
    torch.manual_seed(3)
    got = other(td.clone())
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key])
    torch.testing.assert_close(other.actor_network.alpha, actor.alpha)


def test_input_tensordict_is_left_unchanged_except_the_declared_outputs():
    loss, _, _ = build()
    assert_input_left_unchanged(loss, batch())
