"""Collectors act on the trained weights: the corner probe, for the direct, process and Ray backends.

The critic is set so that Q strongly prefers one corner of the action box; the collected actions must
go there. Then the critic is changed in place (as an optimizer step does) to prefer the opposite corner
and ``collector.update_policy_weights_()`` is called, as the training loop does after each round of
updates: the next batch must be collected at the new corner. A worker acting on stale weights fails.
"""

import functools

import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs import InitTracker, TransformedEnv
from torchrl.envs.utils import ExplorationType

from torchrl_s2ac import SoftQCritic, SVGDActor
from torchrl_s2ac.envs import MultiGoalEnv

# The Ray runtimes of a test run share one xdist worker (make test: --dist loadgroup): two at once on two cores
# time out starting their workers.
BACKENDS = ["direct", "process", pytest.param("ray", marks=pytest.mark.xdist_group("ray"))]


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for this module (started on first use, stopped at the end)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def prefer_corner_(critic: SoftQCritic, sign: float) -> None:
    """In place: Q(s, a) = 20 sign (a_1 + a_2) + 100 for every member (one linear hidden unit)."""
    with torch.no_grad():
        for weight, bias in zip(critic.weights, critic.biases):
            weight.zero_()
            bias.zero_()
        critic.weights[0][:, critic.observation_dim :, 0] = 20.0 * sign
        critic.biases[0][:, 0, 0] = 100.0  # keeps the hidden unit in the ELU's linear part
        critic.weights[-1][:, 0, 0] = 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_collected_actions_follow_the_synced_critic(backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_runtime")
    torch.manual_seed(0)
    env_fn = functools.partial(MultiGoalEnv, max_steps=10)
    critic = SoftQCritic(2, 2, num_cells=(16,))
    actor = SVGDActor(env_fn().action_spec, critic, num_particles=8, num_steps=3, num_cells=(16,), warn_ratio=None)
    prefer_corner_(critic, +1.0)
    kwargs = dict(frames_per_batch=20, total_frames=60, exploration_type=ExplorationType.DETERMINISTIC)
    if backend == "direct":
        collector = Collector(TransformedEnv(env_fn(), InitTracker()), actor, **kwargs)
    else:
        collector = Collector([env_fn] * 2, actor, backend=backend, num_collectors=2, sync=True, **kwargs)
    collector.update_policy_weights_()
    corners = []
    try:
        for data in collector:
            corners.append(data["action"].sum(-1).mean().item())  # a_1 + a_2: +2 and -2 at the two corners
            prefer_corner_(critic, -1.0 if len(corners) % 2 else +1.0)
            collector.update_policy_weights_()
    finally:
        collector.shutdown()
    assert len(corners) == 3
    assert corners[0] > 1.5 and corners[1] < -1.5 and corners[2] > 1.5, corners
