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

# ---- the embedded default model (issue 10): data -> train -> export -> calibrate -> evaluate, from scratch
# (74 min on an idle 2-core box). The task split and the wordings are robometer_ros/training/data/metaworld_tasks.yaml.
.PHONY: default-model demo-bags
MW_DATA ?= data/metaworld
MW_RUN ?= runs/default
MW_TASKS = $(shell $(PY) -m robometer_ros.training.data.metaworld tasks $(1))
MW_GEN := MUJOCO_GL=egl $(VENV)/bin/robometer-dataset from-metaworld --size 96 --frames 32 --codec png --workers 2
MW_EVAL := $(VENV)/bin/robometer-eval bundles/default --dataset $(MW_DATA) --success-cutoff metaworld=0.9 \
	--params-file config/reward_node.yaml --params-file $(MW_RUN)/calibration.yaml

# Each split and the initial model are made once (a stamp marks them complete; an interrupted one is redone) and
# the training stages resume from their last checkpoint, so an interrupted `make default-model` goes on where it
# stopped. Start over with `rm -rf $(MW_DATA) $(MW_RUN)`.
# scenes: seed 0 trains, seed 3 calibrates the monitor (and is the in-training evaluation), seed 1 evaluates
MW_SPLIT_train = --tasks $(call MW_TASKS,trained) --episodes-per-task 24 --seed 0
MW_SPLIT_calibration = --tasks $(call MW_TASKS,trained) --episodes-per-task 2 --seed 3
MW_SPLIT_eval_seeds = --tasks $(call MW_TASKS,trained) --episodes-per-task 3 --seed 1
MW_SPLIT_eval_tasks = --tasks $(call MW_TASKS,heldout) --episodes-per-task 6 --seed 1

$(MW_DATA)/%/.complete: | setup
	rm -rf $(MW_DATA)/$*
	$(MW_GEN) $(MW_SPLIT_$*) --out $(MW_DATA)/$*
	touch $@

$(MW_RUN)/init/.complete: | setup
	rm -rf $(MW_RUN)/init
	$(PY) -m robometer_ros.training.data.metaworld init-model $(MW_RUN)/init
	touch $@

default-model: setup $(foreach split,train calibration eval_seeds eval_tasks,$(MW_DATA)/$(split)/.complete) \
		$(MW_RUN)/init/.complete
	OMP_NUM_THREADS=2 $(VENV)/bin/robometer-train training/default_model.yaml output_dir=$(MW_RUN)/train \
		model.init_checkpoint=$(MW_RUN)/init data.dataset=$(MW_DATA)
	# second cosine cycle: resumes the run above at step 4000 and trains on to step 8000 with the official
	# absolute_first_frame progress targets (a segment's first frame is 0) reaching 1 at 90% of an episode
	# (the episodes end 10 steps after the first success: their last ~10% show the task done)
	OMP_NUM_THREADS=2 $(VENV)/bin/robometer-train training/default_model.yaml output_dir=$(MW_RUN)/train \
		model.init_checkpoint=$(MW_RUN)/init data.dataset=$(MW_DATA) optim.max_steps=8000 \
		data.use_known_progress=false "data.success_cutoffs={metaworld: 0.9}"
	$(VENV)/bin/robometer-export $(MW_RUN)/train/final bundles/default --frame-size 64x64 \
		--model-id robometer-metaworld-demo --model-version 2 --external-data --overwrite
	# the monitor's thresholds, on other scenes of the trained tasks with their training wordings
	$(VENV)/bin/robometer-calibrate bundles/default --dataset $(MW_DATA) --split calibration \
		--out $(MW_RUN)/calibration.yaml
	# the README's rows: (a) held-out seeds, training wordings; (b) the same episodes, held-out wordings;
	# (c) unseen tasks, held-out wordings; (d) row (b) as JPEG CompressedImage at the camera's size
	$(MW_EVAL) --split eval_seeds --wording train --out $(MW_RUN)/eval_a
	$(MW_EVAL) --split eval_seeds --wording heldout --out $(MW_RUN)/eval_b
	$(MW_EVAL) --split eval_tasks --wording heldout --out $(MW_RUN)/eval_c
	$(MW_EVAL) --split eval_seeds --wording heldout --transport jpeg --out $(MW_RUN)/eval_d

demo-bags: setup
	rm -rf demo_bags
	MUJOCO_GL=egl $(PY) -m robometer_ros.demo make-bags --out demo_bags
