# robometer_ros — the two commands of the quick start, and the rest.
#   make demo   set up, then run the reward node with the embedded default model on the demo episodes
#   make test   set up, then run lint and the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Every ROS process started from here stays on loopback.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST

.PHONY: setup test lint unit integration demo bench clean

setup:
	@bash scripts/setup_venv.sh

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest test
	-@$(VENV)/bin/fastdds shm clean >/dev/null 2>&1

unit: setup
	$(PY) -m pytest test/unit

integration: setup
	$(PY) -m pytest test/integration

demo: setup
	$(PY) -m robometer_ros.demo

bench: setup
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf build install log demo_out

# ---- the embedded default model (issue 6): data -> train -> eval -> export, from scratch (~1 h on 2 cores)
.PHONY: default-model demo-bags
MW_DATA ?= data/metaworld
MW_RUN ?= runs/default
MW_TRAIN_TASKS := door-open-v3 door-close-v3 drawer-open-v3 drawer-close-v3 button-press-topdown-v3 \
	coffee-button-v3 lever-pull-v3 plate-slide-v3 handle-pull-v3 window-open-v3
MW_HELDOUT_TASKS := button-press-v3 plate-slide-back-v3 window-close-v3
MW_GEN := MUJOCO_GL=egl $(VENV)/bin/robometer-dataset from-metaworld --size 96 --frames 32 --codec png --workers 2

default-model: setup
	rm -rf $(MW_DATA) $(MW_RUN)
	$(MW_GEN) --tasks $(MW_TRAIN_TASKS) --episodes-per-task 30 --seed 0 --out $(MW_DATA)/train
	$(MW_GEN) --tasks $(MW_TRAIN_TASKS) --episodes-per-task 6 --seed 1 --out $(MW_DATA)/eval_seeds
	$(MW_GEN) --tasks $(MW_HELDOUT_TASKS) --episodes-per-task 10 --seed 1 --out $(MW_DATA)/eval_tasks
	$(PY) -m robometer_ros.training.metaworld init-model $(MW_RUN)/init
	OMP_NUM_THREADS=1 $(VENV)/bin/robometer-train training/default_model.yaml output_dir=$(MW_RUN)/train \
		model.init_checkpoint=$(MW_RUN)/init data.dataset=$(MW_DATA)
	# second cosine cycle: resumes the run above at step 3000 and trains on to step 6000 with the official
	# absolute_first_frame progress targets (a segment's first frame is 0) reaching 1 at 90% of an episode
	# (the episodes end 10 steps after the first success: their last ~10% show the task done)
	OMP_NUM_THREADS=1 $(VENV)/bin/robometer-train training/default_model.yaml output_dir=$(MW_RUN)/train \
		model.init_checkpoint=$(MW_RUN)/init data.dataset=$(MW_DATA) optim.max_steps=6000 \
		data.use_known_progress=false "data.success_cutoffs={metaworld: 0.9}"
	$(VENV)/bin/robometer-export $(MW_RUN)/train/final bundles/default --frame-size 64x64 \
		--model-id robometer-metaworld-demo --model-version 1 --overwrite
	$(VENV)/bin/robometer-eval bundles/default --dataset $(MW_DATA) --split eval_seeds --out $(MW_RUN)/eval_seeds \
		--success-cutoff metaworld=0.9
	$(VENV)/bin/robometer-eval bundles/default --dataset $(MW_DATA) --split eval_tasks --out $(MW_RUN)/eval_tasks \
		--success-cutoff metaworld=0.9

demo-bags: setup
	rm -rf demo_bags
	MUJOCO_GL=egl $(PY) -m robometer_ros.demo make-bags --out demo_bags
