# Two entry points: `make train` (main job) and `make test` (the test suite, docs build included).
# Both create and reuse a virtualenv in .venv; torch is pinned to the CPU build.
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
export MUJOCO_GL ?= egl
export WANDB_MODE ?= offline

.PHONY: setup train test docs bench entropy compare multigoal clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

# Main job: S2AC on HalfCheetah-v5 with the authors' settings (override with ARGS="env=hopper ...").
train: $(STAMP)
	$(PY) sota-implementations/s2ac.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/bench_update.py

entropy: $(STAMP)
	$(PY) sota-implementations/entropy_validation.py --out results/entropy

multigoal: $(STAMP)
	for layout in three_goals four_goals; do \
		$(PY) sota-implementations/multigoal.py --layout $$layout --seeds 0 1 2 --frames 5000 || exit 1; \
	done

compare: $(STAMP)
	$(PY) sota-implementations/compare.py --env hopper --frames 30000 --eval-every 2500 --threads 2 \
		--out results/hopper collector.init_random_frames=5000

clean:
	rm -rf $(VENV) docs/_build outputs
