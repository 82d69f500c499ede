"""AmortizedSampler, and S2AC's amortized variant learning to reproduce the SVGD particles."""

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_s2ac import AmortizedSampler, RBFKernel, S2ACLoss, SoftQCritic, SVGDActor

SPEC = Bounded(-torch.ones(2), torch.ones(2), (2,))


def energy_distance(x, y):
    """Energy distance between two sample sets ``[n, d]`` and ``[k, d]`` (zero iff equal laws, in the limit)."""
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def test_sampler_shapes_noise_and_bounds():
    spec = Bounded(torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0]), (2,))
    sampler = AmortizedSampler(spec, 3, num_cells=(8,))
    observation = torch.randn(4, 5, 3)
    draws = sampler.sample(observation, 6)
    assert draws.action.shape == draws.unsquashed.shape == draws.noise.shape == (4, 5, 6, 2)
    assert draws.noise.abs().max() <= 3
    assert (draws.action >= spec.space.low).all() and (draws.action <= spec.space.high).all()
    torch.testing.assert_close(draws.action, sampler.squash(sampler.transport(observation, draws.noise)))
    obs = torch.randn(7, 3)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        a1 = sampler(TensorDict({"observation": obs}, [7]))["action"]
        a2 = sampler(TensorDict({"observation": obs}, [7]))["action"]
    torch.testing.assert_close(a1, a2)  # noise 0
    with set_exploration_type(ExplorationType.RANDOM):
        a3 = sampler(TensorDict({"observation": obs}, [7]))["action"]
    assert a3.shape == (7, 2) and not torch.allclose(a1, a3)


def test_sampler_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="bounded action spec"):
        AmortizedSampler(torch.zeros(2), 3)
    sampler = AmortizedSampler(SPEC, 3, num_cells=(8,))
    with pytest.raises(ValueError, match=r"observations shaped \[..., 3\], got \(4, 2\)"):
        sampler.sample(torch.randn(4, 2), 5)
    with pytest.raises(ValueError, match="noise of shape"):
        sampler.transport(torch.randn(4, 3), torch.randn(4, 5, 3))


def test_actor_amortized_selection_needs_a_sampler_and_no_log_prob():
    critic = SoftQCritic(3, 2, num_cells=(8,))
    with pytest.raises(ValueError, match="needs an amortized_sampler"):
        SVGDActor(SPEC, critic, eval_selection="amortized")
    with pytest.raises(ValueError, match="return_log_prob"):
        SVGDActor(
            SPEC,
            critic,
            train_selection="amortized",
            amortized_sampler=AmortizedSampler(SPEC, 3),
            return_log_prob=True,
        )
    with pytest.raises(ValueError, match="amortized_sampler maps 4-d observations"):
        SVGDActor(SPEC, critic, amortized_sampler=AmortizedSampler(SPEC, 4))


def make_fixed_target(seed=0):
    """A fixed 2-D target: a random critic with a steep output layer, fixed q0 = N(0, 0.5^2), L = 10."""
    torch.manual_seed(seed)
    critic = SoftQCritic(2, 2, num_cells=(32, 32), num_qvalue_nets=1)
    with torch.no_grad():
        critic.weights[-1].mul_(6.0)
    sampler = AmortizedSampler(SPEC, 2, num_cells=(64, 64))
    actor = SVGDActor(
        SPEC,
        critic,
        num_particles=10,
        num_steps=10,
        step_size=0.1,
        kernel=RBFKernel(),
        alpha=0.2,
        fixed_init_std=0.5,
        max_step_ratio=0.5,
        warn_ratio=None,
        train_selection="amortized",
        amortized_sampler=sampler,
    )
    return S2ACLoss(actor), actor, sampler


def test_amortized_sampler_moves_toward_the_svgd_particles():
    loss, actor, sampler = make_fixed_target()
    states = torch.randn(3, 2)
    batch = states.repeat(40, 1)  # 120 states: 40 copies of each

    def distances():
        with torch.no_grad():
            svgd = actor.sample_particles(states.repeat(200, 1), with_log_prob=False).action  # [600, 10, 2]
            svgd_again = actor.sample_particles(states.repeat(200, 1), with_log_prob=False).action
            amortized = sampler.sample(states.repeat(200, 1), 10).action
        per_state = lambda x: x.reshape(200, 3, 10, 2).transpose(0, 1).reshape(3, 2000, 2)  # noqa: E731
        svgd, svgd_again, amortized = per_state(svgd), per_state(svgd_again), per_state(amortized)
        return (
            torch.stack([energy_distance(amortized[k], svgd[k]) for k in range(3)]),
            torch.stack([energy_distance(svgd_again[k], svgd[k]) for k in range(3)]),
        )

    before, noise_floor = distances()
    optimizer = torch.optim.Adam(sampler.parameters(), lr=3e-3)
    for _ in range(300):
        with torch.no_grad():
            sample = actor.sample_particles(batch, with_log_prob=False)
        optimizer.zero_grad()
        loss.amortized_loss(sample, TensorDict({"observation": batch}, [len(batch)])).backward()
        optimizer.step()
    after, _ = distances()
    # The untrained network is far from the SVGD particles' law; the trained one is close to it.
    assert (before > 10 * noise_floor.max()).all(), (before, noise_floor)
    assert (after < 0.2 * before).all(), (before, after)
    # Acting with it goes through the sampler only.
    with set_exploration_type(ExplorationType.RANDOM):
        action = actor(TensorDict({"observation": states}, [3]))["action"]
    assert action.shape == (3, 2)


def test_amortized_loss_trains_the_sampler_only():
    loss, actor, sampler = make_fixed_target()
    td = TensorDict(
        {
            "observation": torch.randn(6, 2),
            "action": torch.rand(6, 2) * 2 - 1,
            "next": {
                "observation": torch.randn(6, 2),
                "reward": torch.randn(6, 1),
                "done": torch.zeros(6, 1, dtype=torch.bool),
                "terminated": torch.zeros(6, 1, dtype=torch.bool),
            },
        },
        [6],
    )
    out = loss(td)
    assert out["loss_amortized"] > 0
    out["loss_amortized"].backward()
    assert all(p.grad is not None for p in sampler.parameters())
    assert all(p.grad is None for p in actor.critic.parameters())
