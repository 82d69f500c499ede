# Two entry points: `make train` (main job) and `make test` (the test suite, docs build included).
# Both create and reuse a virtualenv in .venv with torch pinned to 2.13.0. Where pip's default index serves the
# CUDA build (plain PyPI on Linux), TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU one.
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
export MUJOCO_GL ?= egl
export WANDB_MODE ?= offline

.PHONY: setup train test docs bench entropy hopper walker2d halfcheetah ant ablations multigoal multigoal_temperature campaign clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

# Main job: S2AC on HalfCheetah-v5 with the authors' settings and the compiled update (same math, 1.4-1.7x faster
# on CPU); override with ARGS="env=hopper ..." (ARGS="compile.compile=false" for the eager update).
train: $(STAMP)
	$(PY) sota-implementations/s2ac.py compile.compile=true $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/bench_update.py

entropy: $(STAMP)
	$(PY) sota-implementations/entropy_validation.py --out results/entropy
	$(PY) sota-implementations/entropy_dimensions.py --out results/entropy

# Evidence: hydra multirun sweeps (parallel local runs, one torch thread each when JOBS=2), then reports.
SEEDS ?= 0,1,2,3,4
JOBS ?= 2
EVAL := logger.eval_every_frames=5000 logger.eval_episodes=10

# S2AC vs SAC vs SQL on one MuJoCo task, one multirun per algorithm, then the report (hours per S2AC run on 2 cores).
# Each algorithm with its authors' settings; SQL with Haarnoja et al.'s (experiment/sql_mujoco_haarnoja.yaml) and
# their per-task temperature. resume=auto: rerun after a stop to finish what is unfinished (each run continues from
# its own checkpoint), or with a larger budget to extend finished runs whose checkpoints are still here
# (collector.total_frames may change on resume; the replay buffer is sized for 100k from the start).
# Run directories are named by what varies (seed), never by job number, so a rerun with more seeds finds the
# finished ones. S2AC_SCORE=bfloat16 runs S2AC's SVGD score path in bf16 (1.56x faster compiled update on a CPU with
# AMX, the same learning in the ablation's default_bf16 arm); a rerun keeps its runs' precision.
S2AC_SCORE ?= null
# What the report plots beside the returns: the entropy (S2AC's closed form, SAC's sample estimate), q0's sigma
# (mean and batch minimum: its collapse), the share of states whose SVGD step was capped, the Q scale and the
# critic's gradient norm.
DIAGNOSTICS := train/entropy train/init_scale_mean train/init_scale_min train/svgd_capped_fraction \
	train/q_mean train/grad_norm_critic
# $(call compare,task,seeds,frames,out dir,SQL alpha,how the second report scores the stochastic policies)
define compare
	$(PY) sota-implementations/s2ac.py -m $(call comparison,$(1),$(2),$(3)) compile.compile=true \
		s2ac.score_dtype=$(S2AC_SCORE) hydra.sweep.dir=$(4)/s2ac
	$(PY) sota-implementations/sac.py -m $(call comparison,$(1),$(2),$(3)) hydra.sweep.dir=$(4)/sac
	$(PY) sota-implementations/sql.py -m $(call comparison,$(1),$(2),$(3)) +experiment=sql_mujoco_haarnoja \
		sql.alpha=$(5) hydra.sweep.dir=$(4)/sql
	$(PY) sota-implementations/report.py $(4) --diagnostics $(DIAGNOSTICS)
	$(PY) sota-implementations/report.py $(4) $(6) --out $(4)/stochastic
endef
comparison = env=$(1) seed=$(2) collector.total_frames=$(3) $(EVAL) replay_buffer.size=100000 \
	hydra.launcher.n_jobs=$(JOBS) resume=auto 'hydra.sweep.subdir=seed$${seed}'

# Hopper-v5, 100k frames, 5 seeds. Its runs predate eval/return_stochastic: the stochastic policies are scored by
# their training episodes over the last 10k frames.
hopper: $(STAMP)
	$(call compare,hopper,$(SEEDS),100000,results/hopper_100k,0.0333,--metric train/episode_return --final-window 10000)

# Walker2d-v5 (Haarnoja et al.'s reward scale 10: SQL alpha 0.1). What ran here: 8 seeds, 30k frames (1.2-1.7 h
# per S2AC run on an AVX2 EPYC, 32 min on the AMX Xeon, beside another run); WALKER_FRAMES=100000 is the
# paper-style budget.
WALKER_SEEDS ?= 0,1,2,3,4,5,6,7
WALKER_FRAMES ?= 30000
walker2d: $(STAMP)
	$(call compare,walker2d,$(WALKER_SEEDS),$(WALKER_FRAMES),results/walker2d,0.1,--metric eval/return_stochastic)

# HalfCheetah-v5 (Haarnoja et al.'s reward scale 30: SQL alpha 0.0333), the same harness at 30k frames: 5 seeds ran
# here (SAC and SQL 10-15 min per run, S2AC 30 min beside another run on the AMX Xeon, 1.1 h on an AVX2 EPYC).
CHEETAH_SEEDS ?= 0,1,2,3,4
CHEETAH_FRAMES ?= 30000
halfcheetah: $(STAMP)
	$(call compare,halfcheetah,$(CHEETAH_SEEDS),$(CHEETAH_FRAMES),results/halfcheetah,0.0333,--metric eval/return_stochastic)

# Ant-v5 (Haarnoja et al.'s reward scale 300: SQL alpha 0.00333), the same harness at 30k frames.
ANT_SEEDS ?= 0,1,2,3,4
ANT_FRAMES ?= 30000
ant: $(STAMP)
	$(call compare,ant,$(ANT_SEEDS),$(ANT_FRAMES),results/ant,0.00333,--metric eval/return_stochastic)

# Ablations that decide S2AC's MuJoCo defaults: Hopper-v5, 3 seeds, 30k frames, compiled update, one setting
# changed per arm (config/ablation/*.yaml, the budget in config/experiment/hopper_ablation.yaml). One multirun: rerun
# it after an interruption and it skips the finished runs and continues the others from their checkpoints.
# SAC runs in the same harness and budget (+ablation=sac). q0_floor is the remedy for q0's sigma reaching its 0.1
# floor in some states (the default runs' train/init_scale_min).
# default_bf16 (the bf16 score path's learning comparison) needs bf16 matrix units: ARMS=default_bf16 on such a CPU.
# S2AC_SCORE=bfloat16 runs every arm with the bf16 score path into <arm>_bf16/ (1.56x faster on a CPU with AMX;
# its baseline is default_bf16, which ARMS=default then finds finished).
ARMS ?= default,q0_floor,fixed_q0,no_cap,mean_rule,learned_alpha
ABLATION_SCORE := $(if $(filter bfloat16,$(S2AC_SCORE)),s2ac.score_dtype=bfloat16 \
	'hydra.sweep.subdir=$${hydra:runtime.choices.ablation}_bf16/seed$${seed}')
ABLATION_KEYS := s2ac.score_dtype s2ac.max_step_ratio s2ac.kernel_rule s2ac.fixed_alpha s2ac.fixed_init_std \
	s2ac.init_std_min
ablations: $(STAMP)
	$(PY) sota-implementations/s2ac.py -m +experiment=hopper_ablation +ablation=$(ARMS) seed=0,1,2 \
		hydra.launcher.n_jobs=$(JOBS) $(ABLATION_SCORE)
	$(PY) sota-implementations/sac.py -m +experiment=hopper_ablation +ablation=sac seed=0,1,2 hydra.launcher.n_jobs=$(JOBS)
	$(PY) sota-implementations/report.py results/hopper_ablations \
		--by $(ABLATION_KEYS) --out results/hopper_ablations/report \
		--diagnostics train/init_scale_mean train/init_scale_min train/entropy train/svgd_capped_fraction \
		train/svgd_step_ratio train/q_spread

# Both multi-goal layouts, 5 seeds: S2AC (fixed and learned q0), SAC, SQL in the same harness; then the reports
# (goal coverage against frames from report.py, goals/trajectories/entropies from multigoal.py).
multigoal: $(STAMP)
	for algorithm in s2ac sac sql; do \
		$(PY) sota-implementations/$$algorithm.py -m +experiment=multigoal_$$algorithm env.layout=four_goals,three_goals \
			seed=$(SEEDS) hydra.launcher.n_jobs=$(JOBS) resume=auto 'hydra.sweep.subdir=$${env.layout}/seed$${seed}' \
			hydra.sweep.dir=results/multigoal_20k/$$algorithm || exit 1; \
	done
	$(PY) sota-implementations/s2ac.py -m +experiment=multigoal_s2ac s2ac.fixed_init_std=null \
		env.layout=four_goals,three_goals seed=$(SEEDS) hydra.launcher.n_jobs=$(JOBS) resume=auto \
		'hydra.sweep.subdir=$${env.layout}/seed$${seed}' \
		hydra.sweep.dir=results/multigoal_20k/s2ac_learned_q0
	$(PY) sota-implementations/report.py results/multigoal_20k --metric eval/goals_reached --by s2ac.fixed_init_std \
		--final-window 5000 --out results/multigoal_20k
	for layout in four_goals three_goals; do \
		$(PY) sota-implementations/multigoal.py results/multigoal_20k --layout $$layout --out results/multigoal_20k || exit 1; \
	done

# The temperature axis of multi-goal on one layout (LAYOUT: four_goals or three_goals), 3 seeds (TEMPERATURE_SEEDS),
# 10k frames, alpha in ALPHAS for S2AC (fixed q0), SAC and SQL in the same harness (alpha = 0.2 comes from
# make multigoal's runs, read at 10k frames), then the report: goals reached (mean of the evaluations at 8-10k frames)
# against alpha, and the comparisons at each alpha; per alpha, multigoal.py's trajectories and entropies of the final
# policies. Everything lands in results/multigoal_temperature/<layout>/.
ALPHAS ?= 1,3,10
TEMPERATURE_SEEDS ?= 0,1,2
LAYOUT ?= four_goals
TEMPERATURE := results/multigoal_temperature/$(LAYOUT)
COMMA := ,
multigoal_temperature: $(STAMP)
	for algorithm in sac sql s2ac; do \
		$(PY) sota-implementations/$$algorithm.py -m +experiment=multigoal_$$algorithm env.layout=$(LAYOUT) \
			$$algorithm.alpha=$(ALPHAS) seed=$(TEMPERATURE_SEEDS) collector.total_frames=10000 \
			hydra.launcher.n_jobs=$(JOBS) resume=auto "hydra.sweep.subdir=alpha\$${$$algorithm.alpha}/seed\$${seed}" \
			hydra.sweep.dir=$(TEMPERATURE)/$$algorithm || exit 1; \
	done
	$(PY) sota-implementations/report.py $(TEMPERATURE) $(foreach a,s2ac sac sql,results/multigoal_20k/$(a)/$(LAYOUT)) \
		--metric eval/goals_reached --across alpha --by s2ac.fixed_init_std --at-frames 10000 --final-window 3000 \
		--out $(TEMPERATURE)/report
	for alpha in $(subst $(COMMA), ,$(ALPHAS)); do \
		$(PY) sota-implementations/multigoal.py $(TEMPERATURE)/*/alpha$$alpha --layout $(LAYOUT) \
			--out $(TEMPERATURE)/alpha$$alpha || exit 1; \
	done

# The paper-scale campaign: 5 MuJoCo tasks x 5 seeds x 1M frames per algorithm, one multirun per algorithm
# (SQL once per task: its temperature is Haarnoja et al.'s per-task reward scale). On a SLURM cluster add
# hydra/launcher=slurm (config/hydra/launcher/slurm.yaml). Cost estimates: README, "Results".
TASKS := hopper,walker2d,halfcheetah,ant,humanoid
CAMPAIGN := seed=$(SEEDS) collector.total_frames=1000000 $(EVAL) hydra.launcher.n_jobs=$(JOBS) resume=auto \
	'hydra.sweep.subdir=$${env.name}/seed$${seed}'
campaign: $(STAMP)
	$(PY) sota-implementations/s2ac.py -m env=$(TASKS) $(CAMPAIGN) compile.compile=true hydra.sweep.dir=results/campaign/s2ac
	$(PY) sota-implementations/sac.py -m env=$(TASKS) $(CAMPAIGN) hydra.sweep.dir=results/campaign/sac
	for task in hopper:0.0333 halfcheetah:0.0333 walker2d:0.1 ant:0.00333 humanoid:0.01; do \
		$(PY) sota-implementations/sql.py -m env=$${task%%:*} sql.alpha=$${task##*:} +experiment=sql_mujoco_haarnoja \
			$(CAMPAIGN) hydra.sweep.dir=results/campaign/sql/$${task%%:*} || exit 1; \
	done
	$(PY) sota-implementations/report.py results/campaign

clean:
	rm -rf $(VENV) docs/_build outputs
