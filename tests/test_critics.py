"""Any TensorDict critic: a generic critic ensembled by CriticEnsemble matches SoftQCritic; bad critics are named."""

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import MLP, ValueOperator

from helpers import transition_batch
from torchrl_s2ac import AmortizedSampler, CriticEnsemble, S2ACLoss, SoftQCritic, SQLLoss, SVGDActor

DT = torch.float64
OBS, ACT, CELLS = 3, 2, (16, 8)
SPEC = Bounded(-torch.ones(ACT), torch.ones(ACT), (ACT,))


def generic_copy_of(critic: SoftQCritic) -> CriticEnsemble:
    """A ValueOperator(MLP) ensemble holding the same weights as ``critic``."""
    ensemble = CriticEnsemble(
        ValueOperator(
            MLP(in_features=OBS + ACT, out_features=1, num_cells=list(CELLS), activation_class=nn.ELU),
            in_keys=["observation", "action"],
        ),
        critic.num_qvalue_nets,
        OBS,
        ACT,
    ).to(DT)
    with torch.no_grad():
        for member, value_operator in enumerate(ensemble.members):
            linears = [m for m in value_operator.modules() if isinstance(m, nn.Linear)]
            for linear, weight, bias in zip(linears, critic.weights, critic.biases, strict=True):
                linear.weight.copy_(weight[member].T)
                linear.bias.copy_(bias[member, 0])
    return ensemble


def soft_q_and_generic_copy():
    """A SoftQCritic, a generic ensemble with its weights, and a batch."""
    torch.manual_seed(0)
    critic = SoftQCritic(OBS, ACT, num_cells=CELLS, num_qvalue_nets=2).to(DT)
    return critic, generic_copy_of(critic), transition_batch(6, OBS, ACT, DT)


def losses_and_grads(loss, data, seed):
    torch.manual_seed(seed)
    out = loss(data.clone())
    grads = {}
    for key in ("loss_actor", "loss_qvalue", "loss_alpha"):
        loss.zero_grad()
        out[key].backward(retain_graph=True)
        grads[key] = [
            p.grad.clone() if p.grad is not None else None for p in loss.actor_network_params.values(True, True)
        ]
    return out.detach(), grads


def test_generic_critic_gives_the_soft_q_critic_losses_and_gradients():
    critic, generic, data = soft_q_and_generic_copy()
    results = []
    for energy in (critic, generic):
        torch.manual_seed(1)
        actor = SVGDActor(SPEC, energy, num_particles=4, num_steps=2, num_cells=(16,), max_step_ratio=0.5).to(DT)
        loss = S2ACLoss(actor, fixed_alpha=False).make_value_estimator(gamma=0.9)
        results.append((loss, *losses_and_grads(loss, data, seed=2)))
    (soft_q_loss, soft_q_out, soft_q_grads), (generic_loss, generic_out, generic_grads) = results
    for key in ("loss_actor", "loss_qvalue", "loss_alpha", "entropy"):
        torch.testing.assert_close(generic_out[key], soft_q_out[key])
    for key in soft_q_grads:  # q0's gradients from each loss term
        for expected, got in zip(soft_q_grads[key], generic_grads[key], strict=True):
            torch.testing.assert_close(got, expected)
    # The critic's gradients, member by member, in each parametrisation.
    torch.manual_seed(2)
    soft_q_loss.zero_grad()
    soft_q_loss(data.clone())["loss_qvalue"].backward()
    torch.manual_seed(2)
    generic_loss.zero_grad()
    generic_loss(data.clone())["loss_qvalue"].backward()
    grads = [generic_copy_grads(generic_loss.actor_network.critic, k) for k in range(2)]
    for k in range(2):
        for index, (weight, bias) in enumerate(zip(critic.weights, critic.biases)):
            torch.testing.assert_close(grads[k][index][0], weight.grad[k].T)
            torch.testing.assert_close(grads[k][index][1], bias.grad[k, 0])


def generic_copy_grads(ensemble, member):
    linears = [m for m in ensemble.members[member].modules() if isinstance(m, nn.Linear)]
    return [(linear.weight.grad, linear.bias.grad) for linear in linears]


def test_sql_accepts_a_generic_critic():
    critic, generic, data = soft_q_and_generic_copy()
    outs = []
    for energy in (critic, generic):
        torch.manual_seed(1)
        loss = SQLLoss(AmortizedSampler(SPEC, OBS, num_cells=[8]).to(DT), energy).make_value_estimator(gamma=0.9)
        torch.manual_seed(2)
        outs.append(loss(data.clone()).detach())
    for key in ("loss_actor", "loss_qvalue", "svgd_norm"):
        torch.testing.assert_close(outs[1][key], outs[0][key])


def test_critic_without_hidden_layers():
    critic = SoftQCritic(OBS, ACT, num_cells=(), num_qvalue_nets=2).to(DT)
    observation = torch.randn(5, OBS, dtype=DT)
    action = torch.randn(5, ACT, dtype=DT, requires_grad=True)
    q, dq_da = critic.values_and_action_grad(observation, action)
    expected = torch.stack(
        [torch.cat([observation, action], -1) @ critic.weights[0][k] + critic.biases[0][k, 0] for k in range(2)]
    )
    torch.testing.assert_close(q, expected.squeeze(-1))
    for k in range(2):
        (grad,) = torch.autograd.grad(q[k].sum(), action, retain_graph=True)
        torch.testing.assert_close(dq_da[k], grad)
    actor = SVGDActor(SPEC, critic, num_particles=4, num_cells=(8,)).to(DT)
    assert actor(TensorDict({"observation": observation}, [5]))["action"].shape == (5, ACT)


def test_bad_critics_are_named():
    def module(in_keys, out_keys, out_features=1):
        return TensorDictModule(nn.Linear(OBS + ACT, out_features), in_keys=in_keys, out_keys=out_keys)

    class Concat(nn.Module):
        def __init__(self, out_features):
            super().__init__()
            self.linear = nn.Linear(OBS + ACT, out_features)

        def forward(self, observation, action):
            return self.linear(torch.cat([observation, action], -1))

    with pytest.raises(ValueError, match="the critic must read 'action'"):
        SVGDActor(SPEC, module(["observation", "act"], ["state_action_value"]), observation_dim=OBS)
    with pytest.raises(ValueError, match="must write 'state_action_value'"):
        SVGDActor(SPEC, module(["observation", "action"], ["q"]), observation_dim=OBS)
    wide = TensorDictModule(Concat(3), in_keys=["observation", "action"], out_keys=["state_action_value"])
    with pytest.raises(ValueError, match=r"'state_action_value' has shape \(1, 3\); expected \(1, 1\)"):
        SVGDActor(SPEC, wide, observation_dim=OBS)
    with pytest.raises(ValueError, match="observation_dim is required"):
        SVGDActor(SPEC, module(["observation", "action"], ["state_action_value"]))
    with pytest.raises(ValueError, match="num_qvalue_nets=3 but the SoftQCritic holds 2"):
        SVGDActor(SPEC, SoftQCritic(OBS, ACT), num_qvalue_nets=3)


@pytest.mark.parametrize("generic", [False, True], ids=["SoftQCritic", "CriticEnsemble"])
def test_bf16_score_path_stays_close_to_full_precision(generic):
    """The S2AC loss with the SVGD score in bf16 (the closed-form SoftQCritic path, and the autograd path of a
    generic critic whose forward runs under autocast) against fp32: the same draws, outputs within bf16 rounding,
    and not bit-identical (the option is in effect)."""
    torch.manual_seed(0)
    critic = SoftQCritic(OBS, ACT, num_cells=CELLS, num_qvalue_nets=2)
    critic = generic_copy_of(critic).float() if generic else critic
    spec = Bounded(-1.0, 1.0, (ACT,))
    outputs = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)  # the same q0 network for both precisions
        actor = SVGDActor(
            spec, copy.deepcopy(critic), observation_dim=OBS, num_particles=8, num_cells=CELLS, score_dtype=dtype
        )
        loss = S2ACLoss(actor).make_value_estimator(gamma=0.99)
        torch.manual_seed(2)
        outputs[dtype] = loss(transition_batch(32, OBS, ACT)).detach()
    full, low = outputs[None], outputs[torch.bfloat16]
    assert not torch.equal(low["entropy"], full["entropy"])
    for key in ("loss_actor", "loss_qvalue", "entropy", "q_mean"):
        torch.testing.assert_close(low[key], full[key], rtol=0.02, atol=0.02, msg=key)
