import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RL_WARNINGS", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist workers share the cores: each gets its share of torch threads, never more (oversubscribed torch
# threads on two cores made a benchmark here 20x slower).
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
