"""The policy carries everything it acts with; losses train through their own parameters.

Each way a TorchRL user moves a policy around (deepcopy, pickle, ``state_dict``, ``from_module`` /
``to_module``, ``.to()``) must carry the critic and the temperature and reproduce the actions for a
fixed seed; a deep copy of a loss must train its own parameters.
"""

import copy
import pickle

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ValueOperator

from helpers import transition_batch
from torchrl_s2ac import AmortizedSampler, S2ACLoss, SoftQCritic, SQLLoss, SVGDActor

OBS, ACT = 3, 2
SPEC = Bounded(-torch.ones(ACT), torch.ones(ACT), (ACT,))


def generic_critic(num_cells=(16, 16)):
    return ValueOperator(
        MLP(in_features=OBS + ACT, out_features=1, num_cells=list(num_cells)), in_keys=["observation", "action"]
    )


def make_actor(critic_kind="soft_q", seed=0, **kwargs):
    torch.manual_seed(seed)
    if critic_kind == "soft_q":
        critic = SoftQCritic(OBS, ACT, num_cells=(16, 16))
    else:
        critic = generic_critic()
        kwargs.setdefault("observation_dim", OBS)
    kwargs = {"num_particles": 5, "num_steps": 2, "num_cells": (16,), "max_step_ratio": 0.5, **kwargs}
    return SVGDActor(SPEC, critic, warn_ratio=None, **kwargs)


def train_like(actor):
    """Change every parameter and buffer the actor acts with, as training would (the temperature too)."""
    tensors = {id(t): t for t in (*actor.parameters(), *actor.critic.parameters(), *actor.buffers())}
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.add_(0.3 * torch.randn_like(tensor))


def actions(actor, observation, seed=7):
    torch.manual_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        deterministic = actor(TensorDict({"observation": observation}, observation.shape[:-1]))["action"]
    torch.manual_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        sample = actor(TensorDict({"observation": observation}, observation.shape[:-1]))["action"]
    return torch.cat([deterministic, sample], -1)


def load_state_dict(trained):
    fresh = make_actor(_kind(trained), seed=1)
    fresh.load_state_dict(trained.state_dict())
    return fresh


def deepcopy_then_load(trained, before):
    fresh = copy.deepcopy(before)
    fresh.load_state_dict(trained.state_dict())
    return fresh


def from_module_to_module(trained):
    fresh = make_actor(_kind(trained), seed=1)
    TensorDict.from_module(trained).to_module(fresh)
    return fresh


def _kind(actor):
    return "soft_q" if isinstance(actor.critic, SoftQCritic) else "generic"


TRANSFERS = {
    "deepcopy": lambda trained, before: copy.deepcopy(trained),
    "pickle": lambda trained, before: pickle.loads(pickle.dumps(trained)),
    "state_dict": lambda trained, before: load_state_dict(trained),
    "deepcopy_then_load": deepcopy_then_load,
    "from_module_to_module": lambda trained, before: from_module_to_module(trained),
}


@pytest.mark.parametrize("critic_kind", ["soft_q", "generic"])
@pytest.mark.parametrize("transfer", sorted(TRANSFERS))
def test_copies_and_checkpoints_carry_the_critic_and_act_alike(critic_kind, transfer):
    actor = make_actor(critic_kind)
    before = copy.deepcopy(actor)
    train_like(actor)
    observation = torch.randn(16, OBS)
    expected = actions(actor, observation)
    assert not torch.allclose(expected, actions(before, observation))  # training changed the actions
    other = TRANSFERS[transfer](actor, before)
    torch.testing.assert_close(actions(other, observation), expected)
    torch.testing.assert_close(other.alpha, actor.alpha)


@pytest.mark.parametrize("critic_kind", ["soft_q", "generic"])
def test_every_parameter_and_buffer_follows_to(critic_kind):
    actor = make_actor(critic_kind, amortized_sampler=AmortizedSampler(SPEC, OBS, num_cells=[8]))
    loss = S2ACLoss(actor, fixed_alpha=False)
    train_like(actor)
    reference = make_actor(critic_kind, seed=1, amortized_sampler=AmortizedSampler(SPEC, OBS, num_cells=[8]))
    reference.to(torch.float64).load_state_dict(actor.state_dict())  # float64 copies of the trained values
    observation = torch.randn(16, OBS, dtype=torch.float64)
    actor.to(torch.float64)
    floating = [t for t in actor.state_dict().values() if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for t in floating)
    torch.testing.assert_close(actions(actor, observation), actions(reference, observation))
    loss.to(torch.float64)
    for name, tensor in loss.state_dict().items():
        assert not tensor.is_floating_point() or tensor.dtype == torch.float64, name
    actor.to("meta")  # a device: nothing may stay behind
    assert all(t.device.type == "meta" for t in actor.state_dict().values())


@pytest.mark.parametrize("build", ["s2ac", "sql"])
def test_a_loss_built_from_modules_on_a_device_keeps_everything_there(build):
    # Users build the loss from modules already moved (to a GPU; here the meta device) and never move the loss
    # itself: what the loss and make_value_estimator create (gamma among them) must land beside the parameters.
    if build == "s2ac":
        loss = S2ACLoss(make_actor().to("meta"), fixed_alpha=False, alpha_init=0.2)  # no .item() on meta
    else:
        sampler = AmortizedSampler(SPEC, OBS, num_cells=[8]).to("meta")
        loss = SQLLoss(sampler, SoftQCritic(OBS, ACT, num_cells=(16,)).to("meta"))
    loss.make_value_estimator(gamma=0.9)
    stray = [name for name, tensor in loss.state_dict().items() if tensor.device.type != "meta"]
    assert "_value_estimator.gamma" in loss.state_dict() and not stray, stray


def s2ac_loss(amortized=False, fixed_alpha=False):
    sampler = AmortizedSampler(SPEC, OBS, num_cells=[8]) if amortized else None
    loss = S2ACLoss(make_actor(amortized_sampler=sampler), fixed_alpha=fixed_alpha)
    return loss.make_value_estimator(gamma=0.9)


def sql_loss():
    torch.manual_seed(0)
    loss = SQLLoss(AmortizedSampler(SPEC, OBS, num_cells=[8]), SoftQCritic(OBS, ACT, num_cells=(16,)))
    return loss.make_value_estimator(gamma=0.9)


def batch(n=8):
    return transition_batch(n, OBS, ACT)


@pytest.mark.parametrize(
    "make_loss", [s2ac_loss, lambda: s2ac_loss(amortized=True), sql_loss], ids=["s2ac", "s2ac-amortized", "sql"]
)
def test_deepcopy_of_a_loss_trains_its_own_parameters(make_loss):
    original = make_loss()
    loss = copy.deepcopy(original)
    untouched = {name: p.detach().clone() for name, p in original.named_parameters()}
    before = {name: p.detach().clone() for name, p in loss.named_parameters()}
    out = loss(batch())
    sum(value for key, value in out.items() if key.startswith("loss_")).backward()
    trainable = dict(loss.named_parameters())
    assert trainable
    no_grad = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached {no_grad}"
    torch.optim.Adam(loss.parameters(), lr=1e-2).step()
    unchanged = [name for name, p in trainable.items() if torch.equal(p.detach(), before[name])]
    assert not unchanged, f"Adam did not change {unchanged}"
    for name, p in original.named_parameters():  # the original is independent of its copy
        assert torch.equal(p.detach(), untouched[name]) and p.grad is None, name
    # The copy's policy holds the parameters the copy trains.
    assert {id(p) for p in loss.actor_network.parameters()} <= {id(p) for p in trainable.values()}


def test_loss_parameter_sets_are_disjoint_and_the_actor_acts_with_the_trained_ones():
    loss = s2ac_loss(amortized=True)
    actor = loss.actor_network
    actor_ids = {id(p) for p in loss.actor_network_params.values(True, True) if isinstance(p, torch.nn.Parameter)}
    critic_ids = {id(p) for p in loss.qvalue_network_params.values(True, True)}
    assert actor_ids and critic_ids and not actor_ids & critic_ids and id(loss.log_alpha) not in actor_ids | critic_ids
    # Together they are every parameter the actor holds, trained in place.
    assert actor_ids | critic_ids | {id(loss.log_alpha)} == {id(p) for p in actor.parameters()}
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.1)
    out = loss(batch())
    (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"] + out["loss_amortized"]).backward()
    optimizer.step()
    assert torch.equal(actor.alpha, loss.temperature().detach())
    assert actor.alpha.item() != pytest.approx(0.2)  # the learned temperature moved and the actor follows


def test_training_on_a_rollout_collected_with_gradients_on():
    from torchrl_s2ac.envs import MultiGoalEnv

    torch.manual_seed(0)
    env = MultiGoalEnv(max_steps=10)
    actor = SVGDActor(
        env.action_spec,
        SoftQCritic(2, 2, num_cells=(16,)),
        num_particles=4,
        num_steps=2,
        num_cells=(16,),
        max_step_ratio=0.5,
    )
    loss = S2ACLoss(actor, fixed_alpha=False).make_value_estimator(gamma=0.9)
    with set_exploration_type(ExplorationType.RANDOM):
        data = env.rollout(10, actor)  # gradients on: the actions carry the sampler's graph
    assert data["action"].requires_grad
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    for _ in range(3):
        out = loss(data)
        (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).backward()
        optimizer.step()
        optimizer.zero_grad()
