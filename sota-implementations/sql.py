"""Soft Q-learning (Haarnoja et al., 2017) baseline in the same harness as s2ac.py.

    python sota-implementations/sql.py env=hopper collector.total_frames=100000

A soft Q-function trained against the importance-sampled soft value, and an
amortized sampler a = f(s, noise) trained along the SVGD direction
(torchrl_s2ac.SQLLoss). Acting: one sampler pass; noise 0 in evaluation.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import harness
from torchrl_s2ac import AmortizedSampler, RBFKernel, SQLLoss


KINDS = {
    "network.sampler_cells": "cells",
    "sql.alpha": "number",
    "sql.num_value_samples": "int",
    "sql.num_particles": "int",
    "sql.kernel_sigma": "number?",
}


def validate(cfg: DictConfig) -> None:
    harness.validate_common(cfg, KINDS)
    s = cfg.sql
    if not s.alpha > 0:
        raise harness.ConfigError(f"sql.alpha={s.alpha} must be > 0.")
    if s.kernel_sigma is not None and not s.kernel_sigma > 0:
        raise harness.ConfigError(f"sql.kernel_sigma={s.kernel_sigma} must be > 0 (or null).")
    if s.kernel_rule not in ("median", "mean"):
        raise harness.ConfigError(f"sql.kernel_rule={s.kernel_rule!r} must be median or mean.")
    if s.num_value_samples < 1:
        raise harness.ConfigError(f"sql.num_value_samples={s.num_value_samples} must be >= 1.")
    if s.num_particles < 2:
        raise harness.ConfigError(f"sql.num_particles={s.num_particles} must be >= 2.")


def make_agent(cfg: DictConfig, env) -> harness.Agent:
    s, net = cfg.sql, cfg.network
    obs_dim = env.observation_spec["observation"].shape[-1]
    device = harness.network_device(cfg)
    critic = harness.make_critic(cfg, env).to(device)
    sampler = AmortizedSampler(
        env.action_spec, obs_dim, num_cells=net.sampler_cells, activation_class=harness.activation(cfg)
    ).to(device)
    loss = SQLLoss(
        sampler,
        critic,
        alpha_init=s.alpha,
        num_value_samples=s.num_value_samples,
        num_particles=s.num_particles,
        kernel=RBFKernel(sigma=s.kernel_sigma, rule=s.kernel_rule),
    )
    loss.make_value_estimator(gamma=cfg.optim.gamma)
    return harness.Agent(
        loss=loss,
        policy=sampler,
        optimizers=harness.make_optimizers(cfg, loss),
    )


@hydra.main(version_base="1.3", config_path="config", config_name="sql")
def main(cfg: DictConfig) -> None:
    harness.exit_on_config_error(validate, cfg)
    print(harness.train(cfg, "sql", make_agent))


if __name__ == "__main__":
    main()
