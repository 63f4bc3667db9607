"""Shared pytest fixtures: isolated ROS graphs (domain id, log dir, LOCALHOST discovery) and markers."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from robometer_ros.ros_graph import REPO, DomainLease, NodeProcess, ros_environment
from ros_harness import Probe, RosEnv

# Any rclpy use in this process (and its children) logs to a temporary directory and discovers
# only on loopback, even in tests that do not ask for a ROS graph explicitly.
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="robometer_ros_log_"))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `launch` tests without launch_pytest and `gpu` tests without CUDA, saying why."""
    has_launch = importlib.util.find_spec("launch_pytest") is not None
    has_cuda: bool | None = None
    for item in items:
        if "launch" in item.keywords and not has_launch:
            item.add_marker(pytest.mark.skip(reason="launch_pytest is not installed (not on PyPI)"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                has_cuda = _cuda_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="no CUDA GPU"))


@pytest.fixture
def ros_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RosEnv]:
    """A private ROS graph for one test: its own ROS_DOMAIN_ID, log dir and the large-frame DDS profile.

    The variables are also set in the test process, so a Probe created here joins the same graph.
    """
    lease = DomainLease()
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    env = ros_environment(lease.domain_id, log_dir)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        yield RosEnv(domain_id=lease.domain_id, log_dir=log_dir, env=env)
    finally:
        lease.release()


@pytest.fixture
def probe(ros_env: RosEnv) -> Iterator[Probe]:
    """An rclpy probe node in the test's ROS graph."""
    node = Probe(ros_env.domain_id)
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def start_node(ros_env: RosEnv, tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: start `python -m MODULE --ros-args ...` in the test's graph; stopped after the test.

    On teardown every process still running gets SIGINT; its output is printed if the test failed,
    so a failing CI log shows what the node said.
    """
    started: list[NodeProcess] = []

    # test/ on the path so test-only modules (support.*) can be started as nodes too.
    pythonpath = os.pathsep.join(p for p in (str(REPO / "test"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**ros_env.env, "PYTHONPATH": pythonpath}

    def start(module: str, ros_args: list[str] | tuple[str, ...] = (), **kwargs) -> NodeProcess:
        log_path = tmp_path / f"{module.rsplit('.', 1)[-1]}_{len(started)}.log"
        proc = NodeProcess(module, ros_args, env=env, log_path=log_path, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        code = proc.stop()
        print(f"--- {proc.module} (exit {code}) ---\n{proc.output()[-4000:]}")
