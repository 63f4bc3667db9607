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
