"""The S2AC update under torch.compile: one graph (no breaks), and the same losses and gradients as eager."""

import importlib
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torch._inductor import config as inductor_config
from torchrl.data import Bounded

from helpers import transition_batch
from torchrl_s2ac import AmortizedSampler, NonFiniteError, S2ACLoss, SoftQCritic, SQLLoss, SVGDActor


def hopper_loss(score_dtype=None, fixed_alpha=True, **network) -> S2ACLoss:
    """S2AC at Hopper-v5 shapes (11-d observations, 3-d actions), the MuJoCo defaults otherwise."""
    actor = SVGDActor(
        Bounded(-1.0, 1.0, (3,)), SoftQCritic(11, 3, **network), max_step_ratio=0.5, score_dtype=score_dtype
    )
    return S2ACLoss(actor, fixed_alpha=fixed_alpha, max_alpha=1.0).make_value_estimator(gamma=0.99)


def objective(loss: S2ACLoss):
    """The update's forward: the loss's outputs and the sum of its ``loss_*`` entries (what is backpropagated)."""

    def forward(data):
        out = loss(data)
        return sum(value for key, value in out.items() if key.startswith("loss_")), out

    return forward


@pytest.mark.parametrize("score_dtype, fixed_alpha", [(None, True), (torch.bfloat16, True), (None, False)])
def test_s2ac_update_has_no_graph_breaks(score_dtype, fixed_alpha):
    loss = hopper_loss(score_dtype, fixed_alpha)  # a learned alpha under a clamp: its bound checks stay in the graph
    explanation = torch._dynamo.explain(objective(loss))(transition_batch(100, 11, 3))
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_sql_update_has_no_graph_breaks():
    # The sampler's SVGD direction from the critic's closed-form action gradient: no autograd call in the graph.
    loss = SQLLoss(AmortizedSampler(Bounded(-1.0, 1.0, (3,)), 11), SoftQCritic(11, 3)).make_value_estimator(gamma=0.99)
    explanation = torch._dynamo.explain(objective(loss))(transition_batch(100, 11, 3))
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]


def test_compiled_loss_matches_eager():
    loss = hopper_loss(num_cells=(32, 32))
    data = transition_batch(16, 11, 3)
    parameters = [p for p in loss.parameters() if p.requires_grad]
    compiled = torch.compile(objective(loss))
    results = []
    # fallback_random: the compiled graph draws its random numbers as eager does, so one seed gives one sample
    with inductor_config.patch(fallback_random=True):
        for forward in (objective(loss), compiled):
            torch.manual_seed(3)
            total, out = forward(data.clone())
            grads = torch.autograd.grad(total, parameters)
            results.append((out.detach(), grads))
    (eager, eager_grads), (compiled_out, compiled_grads) = results
    assert set(compiled_out.keys()) == set(eager.keys())
    for key, value in eager.items():
        torch.testing.assert_close(compiled_out[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-5)


def test_compiled_update_outputs_are_checked(monkeypatch):
    """The checks a compiled update leaves out of its graph run on its stacked outputs in the scripts' harness."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "sota-implementations"))
    harness = importlib.import_module("harness")
    loss = hopper_loss(num_cells=(8,))

    def outputs(loss_actor, step_ratio):
        values = {"loss_actor": loss_actor, "loss_qvalue": [1.0, 1.0], "svgd_step_ratio": step_ratio}
        return TensorDict({key: torch.tensor(value) for key, value in values.items()}, [2])

    harness.check_compiled_update(loss, outputs([0.1, 0.2], [0.3, 0.5]))  # nothing to report
    with pytest.raises(NonFiniteError, match="Non-finite loss_actor in a compiled update"):
        harness.check_compiled_update(loss, outputs([0.1, float("nan")], [0.3, 0.5]))
    with pytest.warns(UserWarning, match="invertibility condition violated"):
        harness.check_compiled_update(loss, outputs([0.1, 0.2], [0.3, 1.5]))
