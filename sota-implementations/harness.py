"""Shared training harness for s2ac.py, sac.py and sql.py: envs, collector,
replay buffer, logger, evaluation, checkpoint/resume and the training loop.

A script supplies one function, ``make_agent(cfg, train_env) -> Agent``; the
loop below is the same for every algorithm, so that runs differ only in the
loss and the actor.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_SILENT", "true")

import gymnasium as gym
import numpy as np
import tensordict
import torch
import torchrl
import tqdm
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import CudaGraphModule, TensorDictModuleBase
from torchrl._utils import compile_with_warmup, timeit
from torchrl.collectors import Collector
from torchrl.data import Bounded, LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import (
    Compose,
    DoubleToFloat,
    EnvBase,
    EnvCreator,
    InitTracker,
    ParallelEnv,
    RewardSum,
    SerialEnv,
    StepCounter,
    Transform,
    TransformedEnv,
)
from torchrl.envs.libs.gym import GymEnv, set_gym_backend
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import HardUpdate, LossModule, SoftUpdate, group_optimizers
from torchrl.record import VideoRecorder
from torchrl.record.loggers import generate_exp_name, get_logger

import checkpoint
import metrics_log
import sweep
import torchrl_s2ac
from torchrl_s2ac import NonFiniteError, SoftQCritic, describe_device, first_non_finite
from torchrl_s2ac.envs import until_first_done

SCRIPTS_DIR = Path(__file__).resolve().parent


AUTO_RESUME = "auto"  # resume=auto: continue the run directory's own checkpoint if it has one, else start


def _run_dir(resume: str | None, checkpoint_dir: str, default: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own directory (see :func:`checkpoint.locate`)."""
    if not resume or resume == AUTO_RESUME:
        return default
    try:
        return str(checkpoint.locate(Path(resume), checkpoint_dir)[1])
    except checkpoint.CheckpointError:
        return default  # validation then reports the bad resume= in one line


OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any work starts."""


@dataclasses.dataclass
class Agent:
    """What an algorithm script hands to the harness.

    The update minimises the sum of every ``loss_*`` entry the loss returns; every other
    scalar entry (alpha, entropy, diagnostics) is logged as ``train/<name>``.
    """

    loss: LossModule
    policy: TensorDictModuleBase  # acts in the collector (exploration) and in evaluation (deterministic)
    optimizers: dict[str, torch.optim.Optimizer]  # by what they train ("critic", "actor", ...): names grad norms
    compile_policy: bool = False  # the collector compiles the policy (TorchRL's Collector(compile_policy=...))


# ---------------------------------------------------------------------------
# Configuration checks
# ---------------------------------------------------------------------------


def exit_on_config_error(validate: Callable[[DictConfig], None], cfg: DictConfig) -> None:
    """Run ``validate``; a :class:`ConfigError` ends the program with one line naming the bad value."""
    try:
        validate(cfg)
    except (ConfigError, checkpoint.CheckpointError) as error:
        restore_hydra_files()  # hydra wrote this command's .hydra/ into a directory it does not train in
        raise SystemExit(f"Invalid configuration: {error}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "cells": (
        lambda value: isinstance(value, ListConfig) and all(_is_int(v) and v > 0 for v in value),
        "a list of positive integers (hidden layer widths; [] for none)",
    ),
    "entropy": (lambda value: value == "auto" or _is_number(value), "auto or a finite number (nats)"),
}

COMMON_KINDS = {
    "env.num_envs": "int",
    "env.max_episode_steps": "int",
    "seed": "int",
    "env.parallel": "bool",
    "collector.total_frames": "int",
    "collector.frames_per_batch": "int",
    "collector.init_random_frames": "int",
    "collector.learning_starts": "int",
    "collector.num_workers": "int",
    "replay_buffer.size": "int",
    "optim.batch_size": "int",
    "optim.utd_ratio": "number",
    "optim.gamma": "number",
    "optim.lr_actor": "number",
    "optim.lr_critic": "number",
    "optim.lr_alpha": "number",
    "optim.target_update_polyak": "number",
    "optim.target_update_interval": "int?",
    "optim.max_grad_norm": "number?",
    "logger.eval_every_frames": "int",
    "logger.eval_episodes": "int",
    "logger.log_every_frames": "int",
    "logger.video": "bool",
    "logger.eval_stochastic": "bool",
    "checkpoint.every_frames": "int",
    "num_threads": "int",
    "network.num_qvalue_nets": "int",
    "network.critic_cells": "cells",
}


def check_kinds(cfg: DictConfig, kinds: dict[str, str]) -> None:
    """Raise :class:`ConfigError` for the first ``key`` whose value is not of its kind (``"int?"``: int or null)."""
    for key, kind in kinds.items():
        value = OmegaConf.select(cfg, key)
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        accepts, description = KINDS[kind]
        if not accepts(value):
            shown = list(value) if isinstance(value, ListConfig) else value
            raise ConfigError(f"{key}={shown!r} must be {description}.")


def _video_backend_problem(backend) -> str | None:
    """Why ``logger.backend`` cannot record eval videos, or ``None`` when it can."""
    if not backend:
        return "logger.backend=null records nothing"
    if backend == "csv" and importlib.util.find_spec("torchcodec") is None:
        return "logger.backend=csv writes videos with torchcodec, which is not installed"
    if backend == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return "logger.backend=tensorboard needs the tensorboard package, which is not installed"
    return None


def validate_common(cfg: DictConfig, kinds: dict[str, str] | None = None) -> None:
    """Check the settings shared by every script (and the value kinds in ``kinds``, the script's own).

    Raise :class:`ConfigError` naming the first bad value. Also checks that the checkpoint directory is
    writable and that ``resume`` names a checkpoint.
    """
    check_kinds(cfg, {**COMMON_KINDS, **(kinds or {})})
    c, rb, optim, env = cfg.collector, cfg.replay_buffer, cfg.optim, cfg.env

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    if env.library == "gymnasium":
        need(env.name in gym.registry, f"env.name={env.name!r} is not a registered gymnasium environment.")
    elif env.library == "multigoal":
        from torchrl_s2ac.envs import LAYOUTS

        need(env.get("layout") in LAYOUTS, f"env.layout={env.get('layout')!r} must be one of {sorted(LAYOUTS)}.")
    else:
        raise ConfigError(f"env.library={env.library!r} must be 'gymnasium' or 'multigoal'.")
    need(0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32) (numpy's seeds).")
    need(env.num_envs >= 1, f"env.num_envs={env.num_envs} must be >= 1.")
    need(env.max_episode_steps >= 1, f"env.max_episode_steps={env.max_episode_steps} must be >= 1.")
    need(c.frames_per_batch > 0, f"collector.frames_per_batch={c.frames_per_batch} must be > 0.")
    need(
        c.frames_per_batch % env.num_envs == 0,
        f"collector.frames_per_batch={c.frames_per_batch} must be a multiple of env.num_envs={env.num_envs}.",
    )
    need(c.total_frames >= c.frames_per_batch, f"collector.total_frames={c.total_frames} must be >= frames_per_batch.")
    need(c.init_random_frames >= 0, f"collector.init_random_frames={c.init_random_frames} must be >= 0.")
    need(c.learning_starts >= 0, f"collector.learning_starts={c.learning_starts} must be >= 0.")
    need(
        c.learning_starts <= c.total_frames,
        f"collector.learning_starts={c.learning_starts} is beyond collector.total_frames={c.total_frames} "
        "(no update would run).",
    )
    need(c.backend in ("direct", "process", "ray"), f"collector.backend={c.backend!r} must be direct, process or ray.")
    need(c.num_workers >= 1, f"collector.num_workers={c.num_workers} must be >= 1.")
    if c.backend == "ray":
        need(
            importlib.util.find_spec("ray") is not None,
            "collector.backend=ray needs ray: pip install 'torchrl_s2ac[distributed]'.",
        )
    for name, value in (("network.device", cfg.network.device), ("collector.device", c.device)):
        if value:
            try:
                torch.device(value)
            except RuntimeError:
                raise ConfigError(f"{name}={value!r} is not a torch device.") from None
    need(c.non_finite in ("raise", "skip"), f"collector.non_finite={c.non_finite!r} must be raise or skip.")
    need(
        cfg.network.activation in ACTIVATIONS,
        f"network.activation={cfg.network.activation!r} must be one of {sorted(ACTIVATIONS)}.",
    )
    if compile_settings(cfg).cudagraphs:
        need(
            network_device(cfg).type == "cuda",
            f"compile.cudagraphs=true needs a CUDA network.device; the update runs on {network_device(cfg)}.",
        )
    need(optim.batch_size >= 1, f"optim.batch_size={optim.batch_size} must be >= 1.")
    need(
        optim.batch_size <= max(c.learning_starts, c.frames_per_batch),
        f"optim.batch_size={optim.batch_size} is larger than the data available when updates start "
        f"(collector.learning_starts={c.learning_starts}).",
    )
    need(optim.utd_ratio > 0, f"optim.utd_ratio={optim.utd_ratio} must be > 0.")
    need(0 < optim.gamma <= 1, f"optim.gamma={optim.gamma} must be in (0, 1].")
    need(
        0 <= optim.target_update_polyak < 1,
        f"optim.target_update_polyak={optim.target_update_polyak} must be in [0, 1).",
    )
    interval = optim.get("target_update_interval")
    need(interval is None or interval >= 1, f"optim.target_update_interval={interval} must be >= 1 or null.")
    for name in ("lr_actor", "lr_critic", "lr_alpha"):
        need(optim[name] > 0, f"optim.{name}={optim[name]} must be > 0.")
    need(
        optim.max_grad_norm is None or optim.max_grad_norm > 0,
        f"optim.max_grad_norm={optim.max_grad_norm} must be > 0 (or null: no clipping).",
    )
    need(rb.size >= optim.batch_size, f"replay_buffer.size={rb.size} must be >= optim.batch_size.")
    need(rb.storage in ("tensor", "memmap"), f"replay_buffer.storage={rb.storage!r} must be 'tensor' or 'memmap'.")
    need(cfg.network.num_qvalue_nets >= 1, f"network.num_qvalue_nets={cfg.network.num_qvalue_nets} must be >= 1.")
    need(
        cfg.logger.backend in ("wandb", "csv", "tensorboard", None, ""),
        f"logger.backend={cfg.logger.backend!r} is unknown.",
    )
    for name in ("eval_every_frames", "log_every_frames", "eval_episodes"):
        need(cfg.logger[name] >= 1, f"logger.{name}={cfg.logger[name]} must be >= 1.")
    if cfg.logger.video:
        need(env.library == "gymnasium", "logger.video=true needs a gymnasium (MuJoCo) env.")
        problem = _video_backend_problem(cfg.logger.backend)
        need(problem is None, f"logger.video=true needs a logger that records video ({problem}).")
    need(cfg.checkpoint.every_frames >= 1, f"checkpoint.every_frames={cfg.checkpoint.every_frames} must be >= 1.")
    need(cfg.num_threads >= 0, f"num_threads={cfg.num_threads} must be >= 0 (0: automatic).")
    check_same_run(cfg)
    root = Path(cfg.checkpoint.dir).absolute()
    source = resume_source(cfg)
    if source:
        root, _ = checkpoint.locate(source, cfg.checkpoint.dir)
    checkpoint.check_writable(root)


def resume_source(cfg: DictConfig) -> Path | None:
    """What ``resume`` continues: the named run, or with ``resume=auto`` this run directory if it has a checkpoint."""
    if cfg.resume == AUTO_RESUME:
        own = Path.cwd()
        return own if (Path(cfg.checkpoint.dir).absolute() / checkpoint.POINTER).is_file() else None
    return Path(to_absolute_path(cfg.resume)) if cfg.resume else None


# Hydra rewrites a job's .hydra/ before the job starts, also when resume=auto then skips it: run.json keeps the
# files of the command that trained the run, and a skipped run gets them back.
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def hydra_files() -> dict[str, str]:
    """The text of this run's ``.hydra/`` files (empty outside hydra's output directories)."""
    return {name: (Path(".hydra") / name).read_text() for name in HYDRA_FILES if (Path(".hydra") / name).is_file()}


def recorded_hydra_files() -> dict[str, str]:
    """The ``.hydra/`` files that ``run.json`` recorded for the command that trained this run ({} if none)."""
    return json.loads(Path("run.json").read_text()).get("hydra_files", {}) if Path("run.json").is_file() else {}


def restore_hydra_files(warn: bool = False) -> None:
    """Put back the ``.hydra/`` files recorded in ``run.json`` by the command that trained this run.

    Called whenever a command ends without training in a run directory (a skipped run, a refused setting).
    """
    recorded = recorded_hydra_files()
    if warn and not recorded:
        print(f"warning: {os.getcwd()}/run.json records no .hydra/ files; hydra's are this command's", file=sys.stderr)
    for name, text in recorded.items():
        (Path(".hydra") / name).write_text(text)


# Settings that may differ between the command that trained a run and the one that continues or skips it
# with resume=auto: where and how it runs, its budget and its logging, never what it learns.
RESTART_FREE_KEYS = (
    "resume",
    "num_threads",
    "checkpoint",
    "compile",
    "collector.total_frames",
    "collector.backend",
    "collector.num_workers",
    "collector.ray_address",
    "logger.backend",
    "logger.mode",
    "logger.project_name",
    "logger.group_name",
    "logger.video",
    "logger.eval_stochastic",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def check_same_run(cfg: DictConfig) -> None:
    """``resume=auto``: a :class:`ConfigError` if this run directory was trained with other settings.

    Options the recorded command did not have yet are not compared: a new option's default keeps the behaviour
    that runs trained before it had.
    """
    recorded = recorded_hydra_files().get("config.yaml")
    if cfg.resume != AUTO_RESUME or recorded is None:
        return
    before = _flatten(OmegaConf.to_container(OmegaConf.create(recorded), resolve=False))
    now = _flatten(OmegaConf.to_container(cfg, resolve=False))
    free = tuple(key + "." for key in RESTART_FREE_KEYS)
    differ = [
        key
        for key in sorted(before)
        if before[key] != now.get(key, "<absent>") and key not in RESTART_FREE_KEYS and not key.startswith(free)
    ]
    if differ:
        detail = ", ".join(f"{key}={before[key]!r} there, {now.get(key)!r} here" for key in differ[:3])
        raise ConfigError(f"resume=auto: {os.getcwd()} holds a run trained with other settings ({detail}).")


def finished_result(cfg: DictConfig) -> dict | None:
    """With ``resume=auto``, the final evaluation of this run directory when it already reached its budget."""
    if cfg.resume != AUTO_RESUME:
        return None
    done = metrics_log.final_records(Path("metrics.jsonl"), cfg.collector.total_frames)
    return done[-1] if done else None


def set_aside_orphan_metrics(cfg: DictConfig) -> None:
    """``resume=auto`` starting afresh: records left without a checkpoint move to ``metrics.jsonl.orphan-<k>``.

    A finished run is never restarted: raising its budget needs its checkpoint.
    """
    path = Path("metrics.jsonl")
    if cfg.resume != AUTO_RESUME or resume_source(cfg) is not None or not path.exists():
        return
    finals = metrics_log.final_records(path)
    if finals:
        frames = finals[-1].get("frames")
        raise checkpoint.CheckpointError(
            f"resume=auto: {os.getcwd()} finished at {frames} frames, below collector.total_frames="
            f"{cfg.collector.total_frames}, and has no checkpoint to continue from."
        )
    k = 0
    while path.with_name(f"metrics.jsonl.orphan-{k}").exists():
        k += 1
    path.rename(path.with_name(f"metrics.jsonl.orphan-{k}"))


# ---------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------


@functools.cache  # once per process
def _drop_mujoco_settotalmass_warning() -> None:
    """MuJoCo >= 3.3 prints a deprecation warning for the ``settotalmass`` compiler attribute of gymnasium's
    v5 XMLs each time a model is compiled (every env copy, every process). Drop exactly that message; every
    other MuJoCo warning is still printed."""
    import mujoco

    previous = mujoco.get_mju_user_warning()

    def warn(message: str) -> None:
        if "'settotalmass' is deprecated" in message:
            return
        if previous is not None:
            previous(message)
        else:
            print(f"WARNING: {message}", file=sys.stderr)

    mujoco.set_mju_user_warning(warn)


def _base_env(cfg: DictConfig, from_pixels: bool = False) -> EnvBase:
    if cfg.env.library == "multigoal":
        from torchrl_s2ac.envs import MultiGoalEnv

        return MultiGoalEnv(**multigoal_kwargs(cfg))
    _drop_mujoco_settotalmass_warning()
    with set_gym_backend("gymnasium"):
        return GymEnv(cfg.env.name, from_pixels=from_pixels, pixels_only=False)


def multigoal_kwargs(cfg: DictConfig) -> dict:
    """``MultiGoalEnv`` arguments from ``env.*`` (configs saved before goal_radius/init_noise existed included)."""
    return {
        "layout": cfg.env.layout,
        "obstacle": cfg.env.obstacle,
        "max_steps": cfg.env.max_episode_steps,
        "goal_radius": cfg.env.get("goal_radius", 0.5),
        "init_noise": cfg.env.get("init_noise", 0.0),
    }


NON_FINITE = "non_finite"  # written by NonFiniteGuard, at the root and under "next": 0 when finite, see below


class NonFiniteGuard(Transform):
    """Checks each reset's observation and each step's observation and reward for NaN or inf (one reduction).

    With ``raise_source`` (a name for the env's use, e.g. ``"evaluation"``), a non-finite value raises
    :class:`~torchrl_s2ac.NonFiniteError` naming the key. Without it (collector envs, which may run in
    worker processes that cannot report errors), the non-finite values are replaced by 0 so that the
    policy can act, a step's episode is ended (``truncated``), and ``non_finite`` records which key it
    was (1 + its index in ``GUARDED``); the training loop (:func:`finite_transitions`) then raises or
    skips the transition.
    """

    GUARDED = ("observation", "reward")

    def __init__(self, raise_source: str | None = None) -> None:
        super().__init__()
        self.raise_source = raise_source

    def _check(self, tensordict, keys: tuple[str, ...], event: str) -> torch.Tensor:
        values = {key: tensordict.get(key) for key in keys}
        code = torch.zeros(*tensordict.batch_size, 1, dtype=torch.uint8, device=tensordict.device)
        name = first_non_finite(values)
        if name is None:
            return code
        if self.raise_source is not None:
            label = "next observation" if (name, event) == ("observation", "step") else name
            raise NonFiniteError(f"non-finite {label} returned by an environment {event} ({self.raise_source}).")
        for index, (key, value) in reversed(list(enumerate(values.items()))):  # the first key's code wins
            finite = torch.isfinite(value)
            bad = ~finite.flatten(tensordict.batch_dims).all(-1, keepdim=True)
            code = torch.where(bad, torch.full_like(code, index + 1), code)
            tensordict.set(key, torch.where(finite, value, torch.zeros_like(value)))
        return code

    def _reset(self, tensordict, tensordict_reset):
        tensordict_reset.set(NON_FINITE, self._check(tensordict_reset, self.GUARDED[:1], "reset"))
        return tensordict_reset

    def _step(self, tensordict, next_tensordict):
        code = self._check(next_tensordict, self.GUARDED, "step")
        next_tensordict.set(NON_FINITE, code)
        if self.raise_source is None:
            for key in ("truncated", "done"):
                next_tensordict.set(key, next_tensordict.get(key) | (code > 0))
        return next_tensordict

    def transform_observation_spec(self, observation_spec):
        observation_spec[NON_FINITE] = Bounded(
            0, len(self.GUARDED), shape=(*observation_spec.shape, 1), dtype=torch.uint8, device=observation_spec.device
        )
        return observation_spec


def make_env(
    cfg: DictConfig,
    num_envs: int,
    from_pixels: bool = False,
    evaluation: bool = False,
) -> TransformedEnv:
    """``num_envs`` copies stepped together (``ParallelEnv`` when ``env.parallel``), with the usual transforms, on
    the CPU whatever the policy's device: collectors and rollouts (``auto_cast_to_device``) move observations to
    the policy and actions back, which needs the env's device set (TorchRL's reset logic fails for a batch of
    CPU envs cast to a GPU).

    A :class:`NonFiniteGuard` sees each step first; it raises in ``evaluation`` envs when
    ``collector.non_finite=raise`` and flags non-finite steps otherwise.
    """
    creator = EnvCreator(functools.partial(_base_env, cfg, from_pixels))
    if cfg.env.parallel:
        batched = ParallelEnv(num_envs, creator, serial_for_single=True, device="cpu")
    else:
        batched = SerialEnv(num_envs, creator, device="cpu")
    return TransformedEnv(
        batched,
        Compose(
            NonFiniteGuard(evaluation_guard(cfg) if evaluation else None),
            InitTracker(),
            StepCounter(cfg.env.max_episode_steps),
            DoubleToFloat(),
            RewardSum(),
        ),
    )


def evaluation_guard(cfg: DictConfig) -> str | None:
    """``NonFiniteGuard``'s ``raise_source`` for evaluation envs: raise unless ``collector.non_finite=skip``."""
    return "evaluation" if cfg.collector.non_finite == "raise" else None


def env_specs(cfg: DictConfig) -> EnvBase:
    """A single, unbatched environment for reading specs."""
    return TransformedEnv(_base_env(cfg), Compose(DoubleToFloat()))


# ---------------------------------------------------------------------------
# Collector, replay buffer, logger
# ---------------------------------------------------------------------------


def device(value: str | None) -> torch.device:
    """A ``network.device`` / ``collector.device`` setting: null picks ``cuda:0`` when available, else the CPU."""
    if value:
        return torch.device(value)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def network_device(cfg: DictConfig) -> torch.device:
    """Where the models, the loss and the sampled batches live, and evaluation acts (``network.device``)."""
    return device(cfg.network.get("device"))  # absent from configs saved before the option existed


def collector_device(cfg: DictConfig) -> torch.device:
    """Where the collector runs the policy and stores what it collects (``collector.device``; null:
    ``network.device``)."""
    return device(cfg.collector.device or cfg.network.get("device"))


def ray_init_config(cfg: DictConfig) -> dict:
    """The Ray runtime of ``collector.backend=ray``: a local one (``collector.ray_address`` null) or an
    existing cluster (``"auto"``, ``"ray://host:10001"``). Its workers unpickle the env constructor, which
    lives in this directory's ``harness`` module, and the policy (``torchrl_s2ac``): both are shipped with
    the job (``working_dir``, ``py_modules``), so they import from any working directory and on any node."""
    from torchrl.collectors.distributed.ray import DEFAULT_RAY_INIT_CONFIG

    runtime_env = {
        "working_dir": str(SCRIPTS_DIR),
        "excludes": ["outputs/", "multirun/", "checkpoints/", "wandb/", "__pycache__/"],
        "py_modules": [str(Path(torchrl_s2ac.__file__).parent)],
    }
    return {**DEFAULT_RAY_INIT_CONFIG, "address": cfg.collector.ray_address, "runtime_env": runtime_env}


def collector_seed(seed: int, frames_done: int) -> int:
    """The environments' seed: ``seed`` from the start, and after ``frames_done`` frames of a resumed run one
    that ``numpy.random.SeedSequence`` derives from both (distinct for every seed and resume point)."""
    if frames_done == 0:
        return seed
    return int(np.random.SeedSequence([seed, frames_done]).generate_state(1, dtype=np.uint32)[0])


def make_collector(
    cfg: DictConfig, policy, total_frames: int, init_random_frames: int, frames_done: int, compile_policy: bool = False
):
    """The collector of ``collector.backend``; the loop calls its ``update_policy_weights_()`` after each
    round of updates, so that workers holding a copy of the policy act with the trained weights.
    Its environments are seeded with ``seed`` in a fresh run, and in a run resumed after ``frames_done`` frames
    with a seed drawn from both (:func:`collector_seed`), so that a resumed run does not replay its first episodes.
    ``compile_policy``: the collector runs the policy through :func:`torch.compile` (direct and process backends;
    TorchRL's Ray collector takes no such argument), from its first call (TorchRL's default first call runs the
    policy uncompiled, which would make an ``SVGDActor(compile_acting=True)`` compile its own sampler for it), and
    on a CPU with inductor's C++ wrapper, which spares each call the Python launcher of the graph's kernels."""
    c = cfg.collector
    env_fn = functools.partial(make_env, cfg, cfg.env.num_envs)
    kwargs = dict(
        frames_per_batch=c.frames_per_batch,
        total_frames=total_frames,
        init_random_frames=init_random_frames,
        # The policy and the collected batches on the collector's device; the envs step on the CPU (make_env).
        env_device=torch.device("cpu"),
        policy_device=collector_device(cfg),
        storing_device=collector_device(cfg),
        exploration_type=ExplorationType.RANDOM,
    )
    if c.backend != "ray":
        on_cpu = collector_device(cfg).type == "cpu"
        compile_kwargs = {"warmup": 0, **({"options": {"cpp_wrapper": True}} if on_cpu else {})}
        kwargs["compile_policy"] = compile_kwargs if compile_policy else False
    if c.backend == "direct":
        collector = Collector(env_fn(), policy, **kwargs)
    else:
        if c.backend == "ray":
            kwargs["ray_init_config"] = ray_init_config(cfg)
        collector = Collector(
            [env_fn] * c.num_workers, policy, backend=c.backend, num_collectors=c.num_workers, sync=True, **kwargs
        )
    collector.set_seed(collector_seed(cfg.seed, frames_done))
    collector.update_policy_weights_()  # workers start from the policy's current (e.g. resumed) weights
    return collector


def make_replay_buffer(cfg: DictConfig) -> TensorDictReplayBuffer:
    """Sampled batches are on ``network.device`` (a memmap storage stays on disk and moves each batch)."""
    rb, target = cfg.replay_buffer, network_device(cfg)
    if rb.storage == "memmap":
        storage = LazyMemmapStorage(rb.size, scratch_dir=rb.scratch_dir)
    else:
        storage = LazyTensorStorage(rb.size, device=target)
    buffer = TensorDictReplayBuffer(storage=storage, batch_size=cfg.optim.batch_size)
    if rb.storage == "memmap" and target.type != "cpu":
        buffer.append_transform(functools.partial(TensorDict.to, device=target, non_blocking=True))
    return buffer


def in_multirun() -> bool:
    """Whether this run is a job of a hydra multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_name() -> str | None:
    """``<algorithm>/<env>/<time>`` of the hydra multirun sweep this run belongs to (``None`` for a single run)."""
    if not in_multirun():
        return None
    return "/".join(Path(HydraConfig.get().runtime.output_dir).parent.parts[-3:])


def run_identity(cfg: DictConfig, algorithm: str) -> dict:
    """What identifies a run among others (W&B config and tags, ``run.json`` for report.py)."""
    return {
        "algorithm": algorithm,
        "task": cfg.env.name,
        "seed": cfg.seed,
        "group": cfg.logger.group_name or sweep_name(),  # the W&B group: by default, one per sweep
        "torch_threads": torch.get_num_threads(),
        "machine": describe_device(network_device(cfg)),  # what the run's wall-clock time depends on
        "versions": {"torch": torch.__version__, "torchrl": torchrl.__version__, "tensordict": tensordict.__version__},
    }


def code_version() -> str | None:
    """The commit of the checkout these scripts run from, ``+changes`` when its code (the package, the scripts,
    ``pyproject.toml``) differs from it; ``None`` outside a git checkout."""
    root = Path(__file__).parent.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", "torchrl_s2ac", "sota-implementations", "pyproject.toml")
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def sessions(resumed: bool, frames: int) -> list[dict]:
    """``run.json``'s record of the sessions that trained this run: each one's start (frames done, time) and code
    version (:func:`code_version`), the earlier ones kept when the run resumes (one entry with ``frames`` None
    stands for sessions that predate this record or whose record was lost)."""
    earlier = []
    if resumed and Path("run.json").is_file():
        try:
            earlier = json.loads(Path("run.json").read_text()).get("sessions", [{"frames": None, "code": None}])
        except ValueError:  # torn by a kill while written: the earlier sessions are unknown
            earlier = [{"frames": None, "code": None}]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return [*earlier, {"frames": frames, "started": started, "code": code_version()}]


def make_logger(cfg: DictConfig, identity: dict, name: str):
    """A TorchRL logger (``None`` for ``logger.backend=null``) named ``name``, the run's name, kept across resumes.

    With W&B, the runs of one sweep share a group and carry algorithm, env and seed as tags.
    """
    if not cfg.logger.backend:
        return None
    wandb_kwargs = {
        "mode": cfg.logger.mode,
        "project": cfg.logger.project_name,
        "group": identity["group"],
        "tags": [identity["algorithm"], identity["task"], f"seed={identity['seed']}"],
        "config": {**identity, **OmegaConf.to_container(cfg, resolve=True)},
        "id": name,
        "resume": "allow",
        "dir": os.getcwd(),
    }
    return get_logger(cfg.logger.backend, logger_name=os.getcwd(), experiment_name=name, wandb_kwargs=wandb_kwargs)


def make_optimizers(cfg: DictConfig, loss: LossModule) -> dict[str, torch.optim.Optimizer]:
    """Adam on the critic, the actor and (when learned) the temperature; capturable in a CUDA graph with
    ``compile.cudagraphs`` (its step counters then live on the device)."""
    optim = cfg.optim
    adam = functools.partial(torch.optim.Adam, capturable=compile_settings(cfg).cudagraphs)

    def trainable(params):
        return [p for p in params.values(True, True) if p.requires_grad]

    optimizers = {"critic": adam(trainable(loss.qvalue_network_params), lr=optim.lr_critic)}
    if trainable(loss.actor_network_params):  # a fixed q0 has nothing to train
        optimizers["actor"] = adam(trainable(loss.actor_network_params), lr=optim.lr_actor)
    if isinstance(getattr(loss, "log_alpha", None), torch.nn.Parameter):
        optimizers["alpha"] = adam([loss.log_alpha], lr=optim.lr_alpha)
    return optimizers


def grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """L2 norm of the gradients of every parameter ``optimizer`` trains (a tensor on their device: no host sync)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def make_update(
    cfg: DictConfig, agent: Agent, optimizer: torch.optim.Optimizer, target_updater
) -> Callable[[TensorDict], TensorDict]:
    """One gradient step on a sampled batch, as TorchRL's sota ``sac.py`` builds it: eager, compiled
    (``compile.compile``: :func:`torch.compile` after one eager warm-up call, ``compile_with_warmup``) and/or
    captured in a CUDA graph (``compile.cudagraphs``: ``CudaGraphModule``, CUDA only). ``optimizer`` groups
    ``agent.optimizers`` (the one that steps, and is checkpointed)."""
    trained = [[p for group in opt.param_groups for p in group["params"]] for opt in agent.optimizers.values()]

    def update(batch: TensorDict) -> TensorDict:
        """The sum of every ``loss_*`` minimised once; returns the loss's scalars and the gradient norms."""
        loss_td = agent.loss(batch)
        sum(value for key, value in loss_td.items() if key.startswith("loss_")).backward()
        for name, opt in agent.optimizers.items():  # before clipping: what the loss asked for
            loss_td[f"grad_norm_{name}"] = grad_norm(opt)
        if cfg.optim.max_grad_norm:  # per network: a large critic gradient does not shrink the actor's step
            for parameters in trained:
                torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        target_updater.step()
        return loss_td.detach()

    settings = compile_settings(cfg)
    if not (settings.compile or settings.cudagraphs):
        return update
    if settings.compile:
        mode = settings.compile_mode or ("default" if settings.cudagraphs else "reduce-overhead")
        update = compile_with_warmup(update, mode=mode, warmup=1)
    if settings.cudagraphs:
        update = CudaGraphModule(update, in_keys=[], out_keys=[], warmup=5)

    def replay(batch: TensorDict) -> TensorDict:
        # On CUDA, a graph's outputs (CudaGraphModule's, or reduce-overhead's) are overwritten by its next replay.
        torch.compiler.cudagraph_mark_step_begin()
        return update(batch).clone()

    return replay


def compile_settings(cfg: DictConfig) -> DictConfig:
    """``compile.*`` (TorchRL's sota layout): ``compile``, ``compile_mode``, ``cudagraphs``; all off in configs
    saved before the options existed."""
    return cfg.get("compile") or OmegaConf.create({"compile": False, "compile_mode": None, "cudagraphs": False})


def check_compiled_update(loss: LossModule, metrics: TensorDict) -> None:
    """What a compiled or CUDA-graph update leaves out of its graph (host synchronisations, data-dependent
    branches), checked on its outputs, ``metrics`` (a batch of updates, stacked), at the cost of one
    synchronisation: a non-finite loss stops the run (:class:`~torchrl_s2ac.NonFiniteError`, one line), and S2AC's
    invertibility warning is raised from the logged step ratios."""
    losses = {key: value for key, value in metrics.items() if key.startswith("loss_")}
    finite = torch.stack([torch.isfinite(value).all() for value in losses.values()])
    if not finite.all():
        names = [name for name, ok in zip(losses, finite.tolist()) if not ok]
        raise NonFiniteError(
            f"Non-finite {', '.join(names)} in a compiled update, whose graph skips the SVGD sampler's per-step "
            "checks: rerun with compile.compile=false compile.cudagraphs=false to name the step that produced them."
        )
    stein = getattr(getattr(loss, "actor_network", None), "stein", None)
    if stein is not None and "svgd_step_ratio" in metrics.keys():
        stein.warn_if_not_invertible(metrics["svgd_step_ratio"])


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def evaluation_seed(seed: int, frames: int, final: bool = False) -> int:
    """The seed of the evaluation at ``frames``, drawn by ``numpy.random.SeedSequence`` from the run's ``seed`` and
    ``frames`` (a stream apart from :func:`collector_seed`'s): the same for every algorithm and for a resumed run.
    The final evaluation has its own, so that it does not repeat a periodic one at the same frames."""
    return int(np.random.SeedSequence([seed, frames, 2 if final else 1]).generate_state(1, dtype=np.uint32)[0])


def evaluation_owed(state: dict, total_frames: int) -> bool:
    """Whether a run resumes owing the evaluation due at its frames: a stop skips the evaluation due in the batch
    it interrupts (the final evaluation is never owed: it follows)."""
    return 0 < state["frames"] < total_frames and state["next_eval"] <= state["frames"]


def evaluate(cfg: DictConfig, eval_env: EnvBase, policy, frames: int, final: bool = False) -> dict[str, float]:
    """Mean return over ``logger.eval_episodes`` episodes: ``eval/return`` with the deterministic action selection
    (SAC's Gaussian mean, S2AC's ``s2ac.eval_selection``) and, with ``logger.eval_stochastic``,
    ``eval/return_stochastic`` with the exploring one (SAC's sampled action, S2AC's ``s2ac.train_selection``,
    SQL's sampler): S2AC's argmax-Q particle can score far below its own stochastic policy.

    Both selections start from the same states: before each, the environments and torch's generators are seeded
    with :func:`evaluation_seed` (``seed``, ``frames``, ``final``), so runs of one seed are evaluated on the same
    episodes whatever the algorithm, and a repeated evaluation repeats. The generators are forked: evaluating draws
    nothing from the training's random streams."""
    selections = {"eval/return": ExplorationType.DETERMINISTIC}
    if cfg.logger.get("eval_stochastic"):  # absent from configs saved before the option existed
        selections["eval/return_stochastic"] = ExplorationType.RANDOM
    seed = evaluation_seed(cfg.seed, frames, final)
    # manual_seed reseeds every CUDA generator: fork them all where CUDA is in use (forking starts CUDA)
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        metrics = {}
        for key, exploration in selections.items():
            torch.manual_seed(seed)
            eval_env.set_seed(seed)
            with set_exploration_type(exploration), torch.no_grad():
                rollout = eval_env.rollout(
                    cfg.env.max_episode_steps, policy, break_when_any_done=False, auto_cast_to_device=True
                )
            metrics.update(episode_returns(key, rollout))
            if cfg.logger.video:
                eval_env.transform.dump()
        if cfg.env.library == "multigoal":
            metrics.update(goal_coverage(cfg, policy))
    return metrics


def returns_to_first_done(rollout: TensorDictBase) -> torch.Tensor:
    """``[episodes]``: each episode's return up to its first done (the rollout runs on past it)."""
    return (rollout.get(("next", "reward")).squeeze(-1) * until_first_done(rollout)).sum(-1)


def episode_returns(key: str, rollout: TensorDictBase) -> dict[str, float]:
    """``key`` and ``key_std``: the mean and standard deviation over episodes of :func:`returns_to_first_done`."""
    returns = returns_to_first_done(rollout)
    return {key: returns.mean().item(), f"{key}_std": returns.std().item() if returns.numel() > 1 else 0.0}


@torch.no_grad()
def goal_coverage(cfg: DictConfig, policy) -> dict[str, float]:
    """Multi-goal: distinct goals reached and each goal's share of ``env.coverage_episodes`` exploring episodes.

    Coverage is a property of the stochastic policy (the maximum-entropy solution), so these episodes
    act with ``ExplorationType.RANDOM``; their start noise is seeded, so every evaluation sees the same starts.
    """
    from torchrl_s2ac.envs import MultiGoalEnv, goal_hits

    env = TransformedEnv(
        MultiGoalEnv(**multigoal_kwargs(cfg), batch_size=(cfg.env.coverage_episodes,), device="cpu"),
        NonFiniteGuard(evaluation_guard(cfg)),
    )
    env.set_seed(cfg.seed)
    with set_exploration_type(ExplorationType.RANDOM):
        rollout = env.rollout(cfg.env.max_episode_steps, policy, break_when_any_done=False, auto_cast_to_device=True)
    hits = goal_hits(env.goals, rollout).float()  # [episodes, goals]
    returns = returns_to_first_done(rollout)
    metrics = {"eval/goals_reached": float(hits.any(0).sum()), "eval/explore_return": returns.mean().item()}
    metrics.update({f"eval/goal{k}_fraction": fraction.item() for k, fraction in enumerate(hits.mean(0))})
    return metrics


def make_eval_env(cfg: DictConfig, logger) -> EnvBase:
    env = make_env(cfg, cfg.logger.eval_episodes, from_pixels=bool(cfg.logger.video), evaluation=True)
    if cfg.logger.video:
        env.append_transform(VideoRecorder(logger, tag="eval/video", in_keys=["pixels"]))
    return env


# ---------------------------------------------------------------------------
# Checkpoints and resume (the format is in checkpoint.py)
# ---------------------------------------------------------------------------

# Settings a checkpoint must share with the run that resumes it (beyond algorithm and shapes).
IDENTITY_KEYS = (
    "env.library",
    "env.name",
    "env.layout",
    "env.obstacle",
    "network",
    "replay_buffer.size",
    "s2ac.amortized",
    "s2ac.fixed_alpha",
    "s2ac.fixed_init_std",
    "sac.fixed_alpha",
)


def checkpoint_identity(cfg: DictConfig, algorithm: str, env: EnvBase) -> dict:
    """What a resumed run must share with its checkpoint: algorithm, observation/action shapes, ``IDENTITY_KEYS``."""
    identity = {
        "algorithm": algorithm,
        "observation_shape": list(env.observation_spec["observation"].shape),
        "action_shape": list(env.action_spec.shape),
    }
    for key in IDENTITY_KEYS:
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if isinstance(value, dict):
            identity.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            identity[key] = value
    return identity


def make_target_updater(cfg: DictConfig, loss: LossModule) -> SoftUpdate | HardUpdate:
    """Polyak averaging (``optim.target_update_polyak``), or with ``optim.target_update_interval`` = N a hard copy
    of the critic into its target after every N-th update (DQN, Haarnoja et al.'s SQL). TorchRL's
    :class:`HardUpdate` copies when its counter, which counts from 0, reaches ``value_network_update_interval``:
    every N-th update is an interval of N - 1.

    TorchRL's updaters copy the critic into its target when built: build this before a checkpoint is loaded,
    then :func:`phase_target_updater` with the updates the checkpoint had done."""
    interval = cfg.optim.get("target_update_interval")
    if not interval:
        return SoftUpdate(loss, eps=cfg.optim.target_update_polyak)
    return HardUpdate(loss, value_network_update_interval=interval - 1)


def phase_target_updater(cfg: DictConfig, updater: SoftUpdate | HardUpdate, updates: int) -> None:
    """Puts a hard-copy updater in phase with the ``updates`` a resumed run has done (its next copy after the
    run's next multiple of ``optim.target_update_interval``); Polyak averaging has no phase."""
    if isinstance(updater, HardUpdate):
        updater.counter = updates % cfg.optim.target_update_interval


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current update.

    A second Ctrl-C interrupts at once (the default handler is back). In a multirun job the request
    also stops the sweep (:func:`sweep.record_stop`), and the handler outlives the job
    (``persist=True``): a signal that reaches a worker between two jobs stops the sweep instead of
    killing the worker, which would make joblib end the other workers before they save.
    """

    def __init__(self, persist: bool = False) -> None:
        self.requested = False
        self.persist = persist
        self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _request(self, signum, frame) -> None:
        self.requested = True
        sweep.record_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        if self.persist:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


TRANSITION_KEYS = {
    "observation": "observation",
    "action": "action",
    ("next", "observation"): "next observation",
    ("next", "reward"): "reward",
}


def finite_transitions(data: TensorDict, mode: str, frames: int) -> tuple[TensorDict, int]:
    """The transitions of a collected batch fit for the buffer, and how many were skipped.

    A transition is unfit when its observation, action, next observation or reward holds a NaN or an
    inf, or when :class:`NonFiniteGuard` flagged its observation (at the root) or its step (under
    ``"next"``). ``mode="raise"``: raise :class:`~torchrl_s2ac.NonFiniteError` naming the first such
    key (two host synchronisations per batch); ``mode="skip"``: leave those transitions out.
    """
    values = {label: data.get(key) for key, label in TRANSITION_KEYS.items()}
    flags = {
        "observation": data.get(NON_FINITE).reshape(-1),
        "step": data.get(("next", NON_FINITE)).reshape(-1),
    }
    where = f"collected batch, frames {frames} to {frames + data.numel()}"
    if mode == "raise":
        name = first_non_finite(values)
        if name is not None:
            raise NonFiniteError(f"non-finite {name} in the {where}; collector.non_finite=skip drops it instead.")
        reset_code, step_code = torch.stack([flags["observation"].max(), flags["step"].max()]).tolist()
        if reset_code or step_code:
            label = "observation" if reset_code else ("next observation", "reward")[step_code - 1]
            raise NonFiniteError(
                f"non-finite {label} returned by the environment ({where}); "
                "collector.non_finite=skip drops such transitions instead."
            )
        return data, 0
    keep = (flags["observation"] == 0) & (flags["step"] == 0)
    for value in values.values():
        keep &= torch.isfinite(value).reshape(data.numel(), -1).all(-1)
    skipped = int(data.numel() - keep.sum())
    return (data[keep] if skipped else data), skipped


def train(cfg: DictConfig, algorithm: str, make_agent: Callable[[DictConfig, EnvBase], Agent]) -> dict:
    """Collect, store, update, evaluate, log and checkpoint until ``collector.total_frames``.

    A checkpoint that cannot be written or resumed, and non-finite data, end the program with one line.
    """
    if sweep.stopped():  # queued in a multirun that was stopped: the sweep ends without it
        restore_hydra_files()
        tqdm.tqdm.write(f"{os.getcwd()} not started: its sweep was stopped", file=sys.stderr)
        return {"started": False}
    finished = finished_result(cfg)
    if finished is not None:  # a rerun sweep skips the runs it already finished
        restore_hydra_files(warn=True)
        tqdm.tqdm.write(f"{os.getcwd()} already finished ({finished['frames']} frames): skipped", file=sys.stderr)
        return finished
    try:
        set_aside_orphan_metrics(cfg)
        return _train(cfg, algorithm, make_agent)
    except checkpoint.CheckpointError as error:
        restore_hydra_files()  # a refused resume trains nothing: the directory keeps its own command's files
        raise SystemExit(f"Checkpoint error: {error}") from None
    except NonFiniteError as error:
        raise SystemExit(f"Non-finite data: {error}") from None


def _train(cfg: DictConfig, algorithm: str, make_agent: Callable[[DictConfig, EnvBase], Agent]) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    threads = num_threads(cfg)
    torch.set_num_threads(threads)

    specs = env_specs(cfg)
    agent = make_agent(cfg, specs)
    resume_identity = checkpoint_identity(cfg, algorithm, specs)
    # The grouped optimiser is the one that steps, so it holds Adam's moments: it is the one checkpointed.
    optimizer = group_optimizers(*agent.optimizers.values())
    replay_buffer = make_replay_buffer(cfg)
    checkpoint_root = Path(cfg.checkpoint.dir).absolute()
    state = {
        "frames": 0,  # environment steps collected
        "stored": 0,  # transitions written to the replay buffer (frames - skipped)
        "skipped": 0,  # non-finite transitions left out (collector.non_finite=skip)
        "updates": 0,
        "elapsed": 0.0,
        "run_id": None,
        "next_eval": 0,
        "next_checkpoint": cfg.checkpoint.every_frames,
        "update_credit": 0.0,  # updates owed by optim.utd_ratio but not yet run (a fraction below 1)
    }
    # Built before a checkpoint is loaded: TorchRL's target updaters copy the critic into its target when built,
    # which would replace the resumed target with the online critic.
    target_updater = make_target_updater(cfg, agent.loss)
    source = resume_source(cfg)
    if source:
        checkpoint_root, run_dir = checkpoint.locate(source, cfg.checkpoint.dir)
        os.chdir(run_dir)  # continue in the run's own directory: one metrics.jsonl, W&B run and checkpoint
        state = checkpoint.load(
            checkpoint_root,
            loss=agent.loss,
            optimizers=[optimizer],
            replay_buffer=replay_buffer,
            identity=resume_identity,
        )
        metrics_log.truncate(Path("metrics.jsonl"), state["frames"])
    identity = run_identity(cfg, algorithm)
    trained_by = sessions(bool(source), state["frames"])
    written = Path("run.json.tmp")
    written.write_text(json.dumps({**identity, "sessions": trained_by, "hydra_files": hydra_files()}, indent=1) + "\n")
    written.replace("run.json")
    state["run_id"] = state["run_id"] or generate_exp_name(algorithm.upper(), cfg.logger.exp_name)
    logger = make_logger(cfg, identity, state["run_id"])
    phase_target_updater(cfg, target_updater, state["updates"])
    update = make_update(cfg, agent, optimizer, target_updater)
    compiled_update = compile_settings(cfg).compile or compile_settings(cfg).cudagraphs

    remaining = cfg.collector.total_frames - state["frames"]
    collector = (
        make_collector(
            cfg,
            agent.policy,
            remaining,
            max(0, cfg.collector.init_random_frames - state["frames"]),
            state["frames"],
            compile_policy=agent.compile_policy,
        )
        if remaining > 0
        else None
    )
    eval_env = make_eval_env(cfg, logger)
    progress = tqdm.tqdm(total=cfg.collector.total_frames, initial=state["frames"], desc=algorithm, dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    last_log, start = state["frames"], time.perf_counter()

    session_start, elapsed_before = time.perf_counter(), state["elapsed"]

    def save() -> None:
        state["elapsed"] = elapsed_before + time.perf_counter() - session_start
        checkpoint.save(
            checkpoint_root,
            loss=agent.loss,
            optimizers=[optimizer],
            replay_buffer=replay_buffer,
            state=state,
            identity=resume_identity,
        )

    def record(metrics: dict) -> None:
        """Log to the TorchRL logger and append to metrics.jsonl (read by report.py)."""
        if logger is not None:
            logger.log_metrics(metrics, step=state["frames"])
        elapsed = elapsed_before + time.perf_counter() - session_start
        with Path("metrics.jsonl").open("a") as metrics_file:
            metrics_file.write(json.dumps({"frames": state["frames"], "elapsed_s": elapsed, **metrics}) + "\n")

    multirun = in_multirun()
    stop = StopRequest(persist=multirun)
    try:
        if evaluation_owed(state, cfg.collector.total_frames):  # at the frames it was due at
            record(evaluate(cfg, eval_env, agent.policy, state["frames"]))
            state["next_eval"] += cfg.logger.eval_every_frames
        for data in collector if collector is not None else ():
            data = data.reshape(-1)
            stored, skipped = finite_transitions(data, cfg.collector.non_finite, state["frames"])
            with timeit("rb_extend"):
                if stored.numel():
                    replay_buffer.extend(stored)
            state["frames"] += data.numel()
            state["stored"] += stored.numel()
            state["skipped"] += skipped
            progress.update(data.numel())
            done = stored.get(("next", "done"))
            if done.any():
                window.setdefault("train/episode_return", []).extend(
                    stored.get(("next", "episode_reward"))[done].tolist()
                )
            if state["frames"] >= cfg.collector.learning_starts and len(replay_buffer) >= cfg.optim.batch_size:
                # optim.utd_ratio updates per collected frame, exactly over the run: the fraction a batch does
                # not run is carried to the next (0.01 with 50-frame batches is one update every other batch).
                credit = state.get("update_credit", 0.0) + data.numel() * cfg.optim.utd_ratio
                num_updates = math.floor(credit + 1e-9)
                state["update_credit"] = max(0.0, credit - num_updates)
                # The collector closes its env before yielding the last batch, and TorchRL's batched env then
                # raises torch's thread count: back to this run's (also what a compiled update was built for).
                torch.set_num_threads(threads)
                with timeit("update"):
                    outputs = []
                    for _ in range(num_updates):
                        if stop.requested:  # between updates: the batch is stored, the counters say how many ran
                            break
                        try:
                            outputs.append(update(replay_buffer.sample()))
                        except NonFiniteError as error:
                            raise NonFiniteError(f"{error} (replay sample for update {state['updates'] + 1})") from None
                        state["updates"] += 1
                state["update_credit"] += num_updates - len(outputs)  # stopped between updates: owed on resume
                if outputs:
                    collector.update_policy_weights_()  # workers with a copy of the policy act on the new weights
                    batch_metrics = torch.stack(outputs)
                    if compiled_update:
                        check_compiled_update(agent.loss, batch_metrics)
                    # the mean over this batch's updates of every scalar (per-sample outputs such as td errors
                    # are not metrics), read from the device in one host sync
                    scalars = {key: value.float().mean() for key, value in batch_metrics.items() if value.ndim == 1}
                    for key, mean in zip(scalars, torch.stack(list(scalars.values())).tolist()):
                        window.setdefault(f"train/{key}", []).append(mean)
            metrics = {}
            if state["frames"] >= state["next_eval"] and not stop.requested:
                with timeit("eval"):
                    metrics.update(evaluate(cfg, eval_env, agent.policy, state["frames"]))
                state["next_eval"] += cfg.logger.eval_every_frames
                progress.set_postfix(eval_return=f"{metrics['eval/return']:.1f}")
            if metrics or state["frames"] - last_log >= cfg.logger.log_every_frames:
                elapsed = time.perf_counter() - start
                metrics.update({key: float(np.mean(values)) for key, values in window.items() if values})
                metrics["time/fps"] = (state["frames"] - last_log) / max(elapsed, 1e-9)
                metrics["train/updates"] = state["updates"]
                if state["skipped"]:
                    metrics["train/skipped_transitions"] = state["skipped"]
                metrics.update({f"time/{k}": v for k, v in timeit.todict(percall=True).items()})
                record(metrics)
                window, last_log, start = {}, state["frames"], time.perf_counter()
                timeit.erase()
            if state["frames"] >= state["next_checkpoint"]:
                save()
                state["next_checkpoint"] += cfg.checkpoint.every_frames
            if stop.requested:  # buffer, counters and weights agree
                save()
                break
    finally:
        stop.restore()
        progress.close()
        if collector is not None:
            collector.shutdown()
            # torchrl 0.14: a weight-sync scheme left to its __del__ at interpreter exit deadlocks
            # (it starts a queue thread during finalisation); stop it while the interpreter is alive.
            for scheme in (getattr(collector, "_weight_sync_schemes", None) or {}).values():
                scheme.shutdown()
    if stop.requested:
        if logger is not None and cfg.logger.backend == "wandb":
            import wandb

            wandb.finish()
        tqdm.tqdm.write(f"Interrupted at {state['frames']} frames; resume with resume={os.getcwd()}", file=sys.stderr)
        if not multirun:
            raise SystemExit(130)
        # a multirun job returns: raising would make joblib end the other jobs before they save (sweep.py)
        return {"frames": state["frames"], "updates": state["updates"], "interrupted": True}
    save()  # before the final record: a run killed in between resumes and evaluates again, never skipped unsaved
    final = evaluate(cfg, eval_env, agent.policy, state["frames"], final=True)
    record({**final, "final": 1})
    eval_env.close()
    if logger is not None and cfg.logger.backend == "wandb":
        import wandb

        wandb.finish()
    return {"frames": state["frames"], "updates": state["updates"], **final, "checkpoint": str(checkpoint_root)}


def make_critic(cfg: DictConfig, env: EnvBase) -> SoftQCritic:
    """The soft Q ensemble of S2AC and SQL, from ``network.critic_cells``, ``activation``, ``num_qvalue_nets``."""
    net = cfg.network
    return SoftQCritic(
        env.observation_spec["observation"].shape[-1],
        env.action_spec.shape[-1],
        num_cells=net.critic_cells,
        activation_class=activation(cfg),
        num_qvalue_nets=net.num_qvalue_nets,
    )


def num_threads(cfg: DictConfig) -> int:
    """``cfg.num_threads``, or when 0 the cores divided among the runs a local sweep runs at once."""
    if cfg.num_threads:
        return cfg.num_threads
    parallel_runs = 1
    if in_multirun():
        parallel_runs = HydraConfig.get().launcher.get("n_jobs", 1) or 1
        parallel_runs = os.cpu_count() if parallel_runs < 0 else parallel_runs  # joblib: -1 = one per core
    return max(1, (os.cpu_count() or 1) // parallel_runs)


ACTIVATIONS = {"elu": torch.nn.ELU, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}


def activation(cfg: DictConfig) -> type[torch.nn.Module]:
    """The hidden activation ``network.activation`` names (checked by :func:`validate_common`)."""
    return ACTIVATIONS[cfg.network.activation]
