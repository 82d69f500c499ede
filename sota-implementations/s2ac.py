"""S2AC (Stein Soft Actor-Critic) on gymnasium MuJoCo, the TorchRL way.

    python sota-implementations/s2ac.py env=hopper collector.total_frames=100000

The actor samples exp(Q/alpha) with SVGD from a learned Gaussian q0; the loss
uses the closed-form Stein log-density. Envs, collector, replay buffer,
logging and checkpoints come from the shared harness (harness.py).
"""

from __future__ import annotations

import warnings

import hydra
from omegaconf import DictConfig

import harness
from torchrl_s2ac import AmortizedSampler, RBFKernel, S2ACLoss, SVGDActor
from torchrl_s2ac.stein import MIXED_PRECISION_DTYPES, has_bf16_matmul


KINDS = {
    "network.init_cells": "cells",
    "s2ac.num_particles": "int",
    "s2ac.num_steps": "int",
    "s2ac.step_size": "number",
    "s2ac.kernel_sigma": "number?",
    "s2ac.max_step_ratio": "number?",
    "s2ac.fixed_init_std": "number?",
    "s2ac.init_std_min": "number",
    "s2ac.alpha": "number",
    "s2ac.fixed_alpha": "bool",
    "s2ac.target_entropy": "entropy",
    "s2ac.amortized": "bool",
    "s2ac.compile": "bool",
}
SCORE_DTYPES = {None if dtype is None else str(dtype).removeprefix("torch."): dtype for dtype in MIXED_PRECISION_DTYPES}


def validate(cfg: DictConfig) -> None:
    harness.validate_common(cfg, KINDS)
    s = cfg.s2ac
    if s.num_particles < 2:
        raise harness.ConfigError(f"s2ac.num_particles={s.num_particles} must be >= 2.")
    if s.num_steps < 1:
        raise harness.ConfigError(
            f"s2ac.num_steps={s.num_steps} must be >= 1 (with no SVGD step the policy is q0 alone: use sac.py)."
        )
    for name in ("kernel_sigma", "max_step_ratio", "fixed_init_std"):
        if s[name] is not None and not s[name] > 0:
            raise harness.ConfigError(f"s2ac.{name}={s[name]} must be > 0 (or null).")
    if not 0 < s.init_std_min < 1:
        raise harness.ConfigError(f"s2ac.init_std_min={s.init_std_min} must be in (0, 1) (q0's sigma is at most 1).")
    if s.get("score_dtype") not in SCORE_DTYPES:
        raise harness.ConfigError(f"s2ac.score_dtype={s.score_dtype!r} must be null, bfloat16 or float16.")
    device = harness.network_device(cfg)
    if s.get("score_dtype") == "bfloat16" and not has_bf16_matmul(device):
        warnings.warn(
            f"s2ac.score_dtype=bfloat16 on {device} without bf16 matrix units (AVX-512 BF16, "
            "AMX or a bf16 GPU): its matmuls are emulated, about 50x slower than the fp32 default.",
            stacklevel=2,
        )
    if s.kernel_rule not in ("median", "mean"):
        raise harness.ConfigError(f"s2ac.kernel_rule={s.kernel_rule!r} must be median or mean.")
    if not s.step_size > 0:
        raise harness.ConfigError(f"s2ac.step_size={s.step_size} must be > 0.")
    if not s.alpha > 0:
        raise harness.ConfigError(f"s2ac.alpha={s.alpha} must be > 0.")
    for name in ("train_selection", "eval_selection"):
        if s[name] not in ("random", "max", "softmax", "amortized"):
            raise harness.ConfigError(f"s2ac.{name}={s[name]!r} must be random, max, softmax or amortized.")
        if s[name] == "amortized" and not s.get("amortized", False):
            raise harness.ConfigError(f"s2ac.{name}=amortized needs s2ac.amortized=true (a trained sampler).")


def make_agent(cfg: DictConfig, env) -> harness.Agent:
    s, net = cfg.s2ac, cfg.network
    obs_dim = env.observation_spec["observation"].shape[-1]
    critic = harness.make_critic(cfg, env)
    sampler = None
    if s.get("amortized", False):  # absent from configs saved before the option existed
        sampler = AmortizedSampler(
            env.action_spec, obs_dim, num_cells=net.init_cells, activation_class=harness.activation(cfg)
        )
    actor = SVGDActor(
        env.action_spec,
        critic,
        num_particles=s.num_particles,
        num_steps=s.num_steps,
        step_size=s.step_size,
        kernel=RBFKernel(sigma=s.kernel_sigma, rule=s.kernel_rule),
        alpha=s.alpha,
        num_cells=net.init_cells,
        activation_class=harness.activation(cfg),
        fixed_init_std=s.fixed_init_std,
        std_bounds=(s.get("init_std_min", 0.1), 1.0),  # absent from configs saved before the option existed
        max_step_ratio=s.max_step_ratio,
        score_dtype=SCORE_DTYPES[s.get("score_dtype")],  # absent from configs saved before the option existed
        train_selection=s.train_selection,
        eval_selection=s.eval_selection,
        compile_acting=s.get("compile", False),  # absent from configs saved before the option existed
        amortized_sampler=sampler,
    ).to(harness.network_device(cfg))  # the critic and the temperature are the actor's: they move with it
    loss = S2ACLoss(actor, fixed_alpha=s.fixed_alpha, target_entropy=s.target_entropy)
    loss.make_value_estimator(gamma=cfg.optim.gamma)
    return harness.Agent(
        loss=loss,
        policy=actor,  # holds the critic and the temperature: weight syncs and checkpoints carry them
        optimizers=harness.make_optimizers(cfg, loss),
        compile_policy=s.get("compile", False),  # the collector compiles the whole actor; evaluation: compile_acting
    )


@hydra.main(version_base="1.3", config_path="config", config_name="s2ac")
def main(cfg: DictConfig) -> None:
    harness.exit_on_config_error(validate, cfg)
    print(harness.train(cfg, "s2ac", make_agent))


if __name__ == "__main__":
    main()
