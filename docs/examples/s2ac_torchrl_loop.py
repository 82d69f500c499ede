"""S2AC composed in a plain TorchRL loop: env, Collector, replay buffer, SoftUpdate, Adam.

python docs/examples/s2ac_torchrl_loop.py [total_frames]
"""

import sys

import torch
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, DoubleToFloat, GymEnv, InitTracker, RewardSum, StepCounter, TransformedEnv
from torchrl.objectives import SoftUpdate

from torchrl_s2ac import S2ACLoss, SoftQCritic, SVGDActor

total_frames = int(sys.argv[1]) if len(sys.argv) > 1 else 15_000
torch.manual_seed(0)
env = TransformedEnv(GymEnv("Pendulum-v1"), Compose(InitTracker(), DoubleToFloat(), StepCounter(200), RewardSum()))
env.set_seed(0)

# The critic is the energy the actor samples from: pi(a|s) ∝ exp(Q(s, a) / alpha).
critic = SoftQCritic(env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1])
actor = SVGDActor(env.action_spec, critic, num_particles=10, num_steps=3, step_size=0.1, max_step_ratio=0.5)

loss = S2ACLoss(actor)  # alpha fixed at the actor's 0.2, as in the paper
loss.make_value_estimator(gamma=0.99)
target_updater = SoftUpdate(loss, tau=0.005)
optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)

collector = Collector(env, actor, frames_per_batch=50, total_frames=total_frames, init_random_frames=1_000)
replay_buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100_000), batch_size=100)

frames = 0
for data in collector:
    replay_buffer.extend(data)
    frames += data.numel()
    if frames < 1_000:
        continue
    for _ in range(data.numel()):  # one update per collected frame
        losses = loss(replay_buffer.sample())
        (losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_alpha"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        target_updater.step()
    finished = data["next", "done"]
    if finished.any():
        episode_return = data["next", "episode_reward"][finished].mean().item()
        print(f"frames {frames:6d}  episode return {episode_return:8.1f}  entropy {losses['entropy'].item():6.2f}")
collector.shutdown()
