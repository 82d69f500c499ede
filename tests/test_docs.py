"""The documentation builds without warnings, its example runs and the docstrings' examples run."""

import doctest
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchrl_s2ac

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "api.html").exists()


def test_torchrl_loop_example_runs():
    # one torch thread: pytest-xdist's other worker shares the cores
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "s2ac_torchrl_loop.py"), "1200"],
        capture_output=True,
        text=True,
        timeout=1500,  # a hang guard: ~100 s alone on 2 cores, 6x that on a machine shared with other jobs
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "episode return" in result.stdout


PUBLIC_MODULES = [
    "torchrl_s2ac.kernels",
    "torchrl_s2ac.stein",
    "torchrl_s2ac.modules.actor",
    "torchrl_s2ac.modules.critic",
    "torchrl_s2ac.modules.sampler",
    "torchrl_s2ac.modules.temperature",
    "torchrl_s2ac.objectives.s2ac",
    "torchrl_s2ac.objectives.sql",
]
CLASSES_WITH_EXAMPLES = [
    "RBFKernel",
    "SteinEntropy",
    "SVGDActor",
    "SoftQCritic",
    "CriticEnsemble",
    "AmortizedSampler",
    "Temperature",
    "S2ACLoss",
    "SQLLoss",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_docstring_examples_run(module):
    torch.manual_seed(0)
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", CLASSES_WITH_EXAMPLES)
def test_public_classes_have_runnable_examples(name):
    doc = getattr(torchrl_s2ac, name).__doc__
    assert "Examples:" in doc and ">>> " in doc
