"""SAC baseline in the same harness as s2ac.py (TorchRL's SACLoss, tanh-Gaussian actor).

python sota-implementations/sac.py env=hopper collector.total_frames=100000
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import SACLoss

import harness


KINDS = {
    "network.actor_cells": "cells",
    "sac.alpha": "number",
    "sac.fixed_alpha": "bool",
    "sac.target_entropy": "entropy",
}


def validate(cfg: DictConfig) -> None:
    harness.validate_common(cfg, KINDS)
    if not cfg.sac.alpha > 0:
        raise harness.ConfigError(f"sac.alpha={cfg.sac.alpha} must be > 0.")


def make_agent(cfg: DictConfig, env) -> harness.Agent:
    net, device = cfg.network, harness.network_device(cfg)
    obs_dim = env.observation_spec["observation"].shape[-1]
    action_spec = env.action_spec.to(device)  # TanhNormal's bounds: copied per call from elsewhere (no CUDA graph)
    action_dim = action_spec.shape[-1]
    actor_net = nn.Sequential(
        MLP(
            in_features=obs_dim,
            out_features=2 * action_dim,
            num_cells=net.actor_cells,
            activation_class=harness.activation(cfg),
        ),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=1e-4),
    )
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=action_spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": action_spec.space.low, "high": action_spec.space.high, "tanh_loc": False},
        return_log_prob=False,
    )
    critic = ValueOperator(
        MLP(
            in_features=obs_dim + action_dim,
            out_features=1,
            num_cells=net.critic_cells,
            activation_class=harness.activation(cfg),
        ),
        in_keys=["observation", "action"],
    )
    actor, critic = actor.to(device), critic.to(device)
    loss = SACLoss(
        actor,
        critic,
        num_qvalue_nets=net.num_qvalue_nets,
        alpha_init=cfg.sac.alpha,
        fixed_alpha=cfg.sac.fixed_alpha,
        target_entropy=cfg.sac.target_entropy,
        loss_function="l2",
        delay_qvalue=True,
    )
    loss.make_value_estimator(gamma=cfg.optim.gamma, device=device)  # TorchRL's default puts gamma on the CPU
    return harness.Agent(loss=loss, policy=actor, optimizers=harness.make_optimizers(cfg, loss))


@hydra.main(version_base="1.3", config_path="config", config_name="sac")
def main(cfg: DictConfig) -> None:
    harness.exit_on_config_error(validate, cfg)
    print(harness.train(cfg, "sac", make_agent))


if __name__ == "__main__":
    main()
