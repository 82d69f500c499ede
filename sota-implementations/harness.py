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
import os
import random
import signal
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
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl._utils import timeit
from torchrl.collectors import Collector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer
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
    TransformedEnv,
)
from torchrl.envs.libs.gym import GymEnv, set_gym_backend
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import HardUpdate, LossModule, SoftUpdate, group_optimizers
from torchrl.record import VideoRecorder
from torchrl.record.loggers import generate_exp_name, get_logger

import torchrl_s2ac
from torchrl_s2ac import SoftQCritic
from torchrl_s2ac.envs import until_first_done

SCRIPTS_DIR = Path(__file__).resolve().parent


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


# ---------------------------------------------------------------------------
# Configuration checks
# ---------------------------------------------------------------------------


def exit_on_config_error(validate: Callable[[DictConfig], None], cfg: DictConfig) -> None:
    """Run ``validate``; a :class:`ConfigError` ends the program with one line naming the bad value."""
    try:
        validate(cfg)
    except ConfigError as error:
        raise SystemExit(f"Invalid configuration: {error}") from None


def validate_common(cfg: DictConfig) -> None:
    """Check the settings shared by every script; raise :class:`ConfigError` naming the bad value."""
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
    need(
        optim.batch_size <= max(c.learning_starts, c.frames_per_batch),
        f"optim.batch_size={optim.batch_size} is larger than the data available when updates start "
        f"(collector.learning_starts={c.learning_starts}).",
    )
    need(optim.batch_size >= 1, f"optim.batch_size={optim.batch_size} must be >= 1.")
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
    need(rb.size >= optim.batch_size, f"replay_buffer.size={rb.size} must be >= optim.batch_size.")
    need(rb.storage in ("tensor", "memmap"), f"replay_buffer.storage={rb.storage!r} must be 'tensor' or 'memmap'.")
    need(
        cfg.logger.backend in ("wandb", "csv", "tensorboard", None, ""),
        f"logger.backend={cfg.logger.backend!r} is unknown.",
    )
    need(not (cfg.logger.video and env.library != "gymnasium"), "logger.video=true needs a gymnasium (MuJoCo) env.")
    need(cfg.logger.eval_episodes >= 1, f"logger.eval_episodes={cfg.logger.eval_episodes} must be >= 1.")
    if cfg.resume:
        need(Path(to_absolute_path(cfg.resume)).is_file(), f"resume={cfg.resume!r}: no such checkpoint file.")


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


def make_env(
    cfg: DictConfig, num_envs: int, from_pixels: bool = False, device: torch.device | None = None
) -> TransformedEnv:
    """``num_envs`` copies stepped together (``ParallelEnv`` when ``env.parallel``), with the usual transforms.

    ``device``: where the env's outputs are placed (the policy's device for evaluation).
    """
    creator = EnvCreator(functools.partial(_base_env, cfg, from_pixels))
    if cfg.env.parallel:
        batched = ParallelEnv(num_envs, creator, serial_for_single=True, device=device)
    else:
        batched = SerialEnv(num_envs, creator, device=device)
    return TransformedEnv(
        batched,
        Compose(InitTracker(), StepCounter(cfg.env.max_episode_steps), DoubleToFloat(), RewardSum()),
    )


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
    """Where the models, the loss, the sampled batches and evaluation live (``network.device``)."""
    return device(cfg.network.get("device"))  # absent from configs saved before the option existed


def collector_device(cfg: DictConfig) -> torch.device:
    """Where the collector runs the policy (``collector.device``; null: ``network.device``)."""
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


def make_collector(cfg: DictConfig, policy, total_frames: int, init_random_frames: int):
    """The collector of ``collector.backend``; the loop calls its ``update_policy_weights_()`` after each
    round of updates, so that workers holding a copy of the policy act with the trained weights."""
    c = cfg.collector
    env_fn = functools.partial(make_env, cfg, cfg.env.num_envs)
    kwargs = dict(
        frames_per_batch=c.frames_per_batch,
        total_frames=total_frames,
        init_random_frames=init_random_frames,
        device=collector_device(cfg),
        exploration_type=ExplorationType.RANDOM,
    )
    if c.backend == "direct":
        collector = Collector(env_fn(), policy, **kwargs)
    else:
        if c.backend == "ray":
            kwargs["ray_init_config"] = ray_init_config(cfg)
        collector = Collector(
            [env_fn] * c.num_workers, policy, backend=c.backend, num_collectors=c.num_workers, sync=True, **kwargs
        )
    collector.set_seed(cfg.seed)
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


def sweep_name() -> str | None:
    """``<algorithm>/<env>/<time>`` of the hydra multirun sweep this run belongs to (``None`` for a single run)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
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
        "versions": {"torch": torch.__version__, "torchrl": torchrl.__version__, "tensordict": tensordict.__version__},
    }


def make_logger(cfg: DictConfig, identity: dict, run_id: str | None):
    """A TorchRL logger; with W&B, the runs of one sweep share a group and carry algorithm, env and seed as tags."""
    if not cfg.logger.backend:
        return None
    name = run_id or generate_exp_name(identity["algorithm"].upper(), cfg.logger.exp_name)
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
    """Adam on the critic, the actor and (when learned) the temperature."""
    optim = cfg.optim

    def trainable(params):
        return [p for p in params.values(True, True) if p.requires_grad]

    optimizers = {"critic": torch.optim.Adam(trainable(loss.qvalue_network_params), lr=optim.lr_critic)}
    if trainable(loss.actor_network_params):  # a fixed q0 has nothing to train
        optimizers["actor"] = torch.optim.Adam(trainable(loss.actor_network_params), lr=optim.lr_actor)
    if isinstance(getattr(loss, "log_alpha", None), torch.nn.Parameter):
        optimizers["alpha"] = torch.optim.Adam([loss.log_alpha], lr=optim.lr_alpha)
    return optimizers


def grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """L2 norm of the gradients of every parameter ``optimizer`` trains (a tensor: no host sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def evaluate(cfg: DictConfig, eval_env: EnvBase, policy) -> dict[str, float]:
    """Mean return over ``logger.eval_episodes`` episodes, deterministic action selection."""
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        rollout = eval_env.rollout(cfg.env.max_episode_steps, policy, break_when_any_done=False)
    reward = rollout.get(("next", "reward")).squeeze(-1)  # [episodes, T]
    returns = (reward * until_first_done(rollout)).sum(-1)
    metrics = {
        "eval/return": returns.mean().item(),
        "eval/return_std": returns.std().item() if returns.numel() > 1 else 0.0,
    }
    if cfg.logger.video:
        eval_env.transform.dump()
    if cfg.env.library == "multigoal":
        metrics.update(goal_coverage(cfg, policy))
    return metrics


@torch.no_grad()
def goal_coverage(cfg: DictConfig, policy) -> dict[str, float]:
    """Multi-goal: distinct goals reached and each goal's share of ``env.coverage_episodes`` exploring episodes.

    Coverage is a property of the stochastic policy (the maximum-entropy solution), so these episodes
    act with ``ExplorationType.RANDOM``; their start noise is seeded, so every evaluation sees the same starts.
    """
    from torchrl_s2ac.envs import MultiGoalEnv, goal_hits

    env = MultiGoalEnv(**multigoal_kwargs(cfg), batch_size=(cfg.env.coverage_episodes,))
    env.set_seed(cfg.seed)
    with set_exploration_type(ExplorationType.RANDOM):
        rollout = env.rollout(cfg.env.max_episode_steps, policy, break_when_any_done=False)
    hits = goal_hits(env.goals, rollout).float()  # [episodes, goals]
    returns = (rollout.get(("next", "reward")).squeeze(-1) * until_first_done(rollout)).sum(-1)
    metrics = {"eval/goals_reached": float(hits.any(0).sum()), "eval/explore_return": returns.mean().item()}
    metrics.update({f"eval/goal{k}_fraction": fraction.item() for k, fraction in enumerate(hits.mean(0))})
    return metrics


def make_eval_env(cfg: DictConfig, logger) -> EnvBase:
    env = make_env(cfg, cfg.logger.eval_episodes, from_pixels=bool(cfg.logger.video), device=network_device(cfg))
    if cfg.logger.video:
        env.append_transform(VideoRecorder(logger, tag="eval/video", in_keys=["pixels"]))
    return env


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_checkpoint(path: Path, agent: Agent, replay_buffer, state: dict) -> None:
    """Everything a resumed run needs: modules + targets (the loss), optimisers, buffer, counters, RNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer_dir = path.with_suffix(".buffer")
    replay_buffer.dumps(buffer_dir)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "loss": agent.loss.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in agent.optimizers.items()},
            "state": state,
            "buffer_dir": str(buffer_dir),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path, agent: Agent, replay_buffer) -> dict:
    checkpoint = torch.load(path, weights_only=False)
    agent.loss.load_state_dict(checkpoint["loss"])
    for name, opt in agent.optimizers.items():
        opt.load_state_dict(checkpoint["optimizers"][name])
    replay_buffer.loads(checkpoint["buffer_dir"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    np.random.set_state(checkpoint["rng"]["numpy"])
    random.setstate(checkpoint["rng"]["python"])
    return checkpoint["state"]


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current batch.

    A second Ctrl-C interrupts at once (the default handler is back).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: DictConfig, algorithm: str, make_agent: Callable[[DictConfig, EnvBase], Agent]) -> dict:
    """Collect, store, update, evaluate, log and checkpoint until ``collector.total_frames``."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(num_threads(cfg))

    agent = make_agent(cfg, env_specs(cfg))
    replay_buffer = make_replay_buffer(cfg)
    state = {
        "frames": 0,
        "updates": 0,
        "elapsed": 0.0,
        "run_id": None,
        "next_eval": 0,
        "next_checkpoint": cfg.checkpoint.every_frames,
    }
    if cfg.resume:
        state = load_checkpoint(Path(to_absolute_path(cfg.resume)), agent, replay_buffer)
    identity = run_identity(cfg, algorithm)
    Path("run.json").write_text(json.dumps(identity, indent=1) + "\n")
    logger = make_logger(cfg, identity, state["run_id"])
    state["run_id"] = getattr(getattr(logger, "experiment", None), "id", None) or state["run_id"]
    if cfg.optim.get("target_update_interval"):  # a hard copy every N updates (DQN, Haarnoja et al.'s SQL)
        target_updater = HardUpdate(agent.loss, value_network_update_interval=cfg.optim.target_update_interval)
    else:
        target_updater = SoftUpdate(agent.loss, eps=cfg.optim.target_update_polyak)
    optimizer = group_optimizers(*agent.optimizers.values())
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def update(batch: TensorDict) -> TensorDict:
        """One gradient step on the sum of every ``loss_*``; returns the loss's scalars and the gradient norms."""
        loss_td = agent.loss(batch)
        sum(value for key, value in loss_td.items() if key.startswith("loss_")).backward()
        for name, opt in agent.optimizers.items():  # before clipping: what the loss asked for
            loss_td[f"grad_norm_{name}"] = grad_norm(opt)
        if cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        target_updater.step()
        return loss_td.detach()

    remaining = cfg.collector.total_frames - state["frames"]
    collector = (
        make_collector(cfg, agent.policy, remaining, max(0, cfg.collector.init_random_frames - state["frames"]))
        if remaining > 0
        else None
    )
    eval_env = make_eval_env(cfg, logger)
    checkpoint_path = Path(cfg.checkpoint.dir).absolute() / "last.pt"
    progress = tqdm.tqdm(total=cfg.collector.total_frames, initial=state["frames"], desc=algorithm, dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    last_log, start = state["frames"], time.perf_counter()

    session_start, elapsed_before = time.perf_counter(), state["elapsed"]

    def checkpoint() -> None:
        state["elapsed"] = elapsed_before + time.perf_counter() - session_start
        save_checkpoint(checkpoint_path, agent, replay_buffer, state)

    metrics_file = Path("metrics.jsonl").open("a")

    def record(metrics: dict) -> None:
        """Log to the TorchRL logger and append to metrics.jsonl (read by report.py)."""
        if logger is not None:
            logger.log_metrics(metrics, step=state["frames"])
        elapsed = elapsed_before + time.perf_counter() - session_start
        metrics_file.write(json.dumps({"frames": state["frames"], "elapsed_s": elapsed, **metrics}) + "\n")
        metrics_file.flush()

    stop = StopRequest()
    try:
        for data in collector if collector is not None else ():
            with timeit("rb_extend"):
                replay_buffer.extend(data.reshape(-1))
            state["frames"] += data.numel()
            progress.update(data.numel())
            done = data.get(("next", "done"))
            if done.any():
                window.setdefault("train/episode_return", []).extend(
                    data.get(("next", "episode_reward"))[done].tolist()
                )
            if state["frames"] >= cfg.collector.learning_starts:
                num_updates = max(1, round(data.numel() * cfg.optim.utd_ratio))
                with timeit("update"):
                    batch_metrics = torch.stack([update(replay_buffer.sample()) for _ in range(num_updates)])
                state["updates"] += num_updates
                collector.update_policy_weights_()  # workers with a copy of the policy act on the new weights
                for key, value in batch_metrics.items():  # the mean over this batch's updates, one host sync
                    if value.ndim == 1:  # scalars per update; per-sample outputs (e.g. td errors) are not metrics
                        window.setdefault(f"train/{key}", []).append(value.float().mean().item())
            metrics = {}
            if state["frames"] >= state["next_eval"]:
                with timeit("eval"):
                    metrics.update(evaluate(cfg, eval_env, agent.policy))
                state["next_eval"] += cfg.logger.eval_every_frames
                progress.set_postfix(eval_return=f"{metrics['eval/return']:.1f}")
            if metrics or state["frames"] - last_log >= cfg.logger.log_every_frames:
                elapsed = time.perf_counter() - start
                metrics.update({key: float(np.mean(values)) for key, values in window.items() if values})
                metrics["time/fps"] = (state["frames"] - last_log) / max(elapsed, 1e-9)
                metrics["train/updates"] = state["updates"]
                metrics.update({f"time/{k}": v for k, v in timeit.todict(percall=True).items()})
                record(metrics)
                window, last_log, start = {}, state["frames"], time.perf_counter()
                timeit.erase()
            if state["frames"] >= state["next_checkpoint"]:
                checkpoint()
                state["next_checkpoint"] += cfg.checkpoint.every_frames
            if stop.requested:  # only between batches: buffer, counters and weights agree
                checkpoint()
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
        metrics_file.close()
        if logger is not None and cfg.logger.backend == "wandb":
            import wandb

            wandb.finish()
        tqdm.tqdm.write(
            f"Interrupted at {state['frames']} frames; resume with resume={checkpoint_path}", file=sys.stderr
        )
        raise SystemExit(130)
    final = evaluate(cfg, eval_env, agent.policy)
    record({**final, "final": 1})
    metrics_file.close()
    checkpoint()
    eval_env.close()
    if logger is not None and cfg.logger.backend == "wandb":
        import wandb

        wandb.finish()
    return {"frames": state["frames"], "updates": state["updates"], **final, "checkpoint": str(checkpoint_path)}


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
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        parallel_runs = HydraConfig.get().launcher.get("n_jobs", 1) or 1
        parallel_runs = os.cpu_count() if parallel_runs < 0 else parallel_runs  # joblib: -1 = one per core
    return max(1, (os.cpu_count() or 1) // parallel_runs)


ACTIVATIONS = {"elu": torch.nn.ELU, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}


def activation(cfg: DictConfig) -> type[torch.nn.Module]:
    if cfg.network.activation not in ACTIVATIONS:
        raise ConfigError(f"network.activation={cfg.network.activation!r} must be one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[cfg.network.activation]
