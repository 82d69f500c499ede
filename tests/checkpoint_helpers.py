"""A tiny replay buffer, network and optimiser to checkpoint (shared by test_faults.py and its killed child process).

The buffer wraps after CAPACITY rows; every row holds its own write number, so that the buffer's contents
can be checked against the counters after any kill.
"""

import sys
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sota-implementations"))
import checkpoint  # noqa: E402

CAPACITY, ROWS_PER_SAVE, WIDTH = 64, 10, 4096
IDENTITY = {"algorithm": "test", "replay_buffer.size": CAPACITY}


def fresh():
    net = torch.nn.Linear(4, 4)
    optimizer = torch.optim.Adam(net.parameters())
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(CAPACITY), batch_size=4)
    return net, optimizer, buffer


def write_rows(buffer, net, stored: int, count: int) -> dict:
    """Append ``count`` rows numbered from ``stored``; the weights record the count, as counters and weights agree."""
    rows = torch.arange(stored, stored + count, dtype=torch.float32)
    buffer.extend(TensorDict({"observation": rows[:, None].expand(count, WIDTH).clone()}, [count]))
    with torch.no_grad():
        net.weight.fill_(stored + count)
    return {"frames": stored + count, "stored": stored + count}


def save(root, net, optimizer, buffer, state):
    return checkpoint.save(root, loss=net, optimizers=[optimizer], replay_buffer=buffer, state=state, identity=IDENTITY)


def load_and_verify(root) -> int:
    """Load the current checkpoint into fresh objects and check that buffer, cursor and weights match its counters."""
    net, optimizer, buffer = fresh()
    state = checkpoint.load(root, loss=net, optimizers=[optimizer], replay_buffer=buffer, identity=IDENTITY)
    stored = state["stored"]
    length = min(stored, CAPACITY)
    assert len(buffer) == length and buffer.writer._cursor == stored % CAPACITY
    # Slot p holds the last row written there: the largest number below `stored` congruent to p.
    expected = torch.tensor([stored - 1 - (stored - 1 - p) % CAPACITY for p in range(length)], dtype=torch.float32)
    assert torch.equal(buffer.storage[:length]["observation"], expected[:, None].expand(length, WIDTH))
    assert (net.weight == stored).all()
    return stored
