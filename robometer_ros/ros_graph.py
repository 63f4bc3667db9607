"""A private, loopback-only ROS graph for tools that start nodes as processes (make demo, the tests).

Pure Python (no rclpy): an exclusive ROS_DOMAIN_ID held with a lock file, the environment every process of
the graph shares, and a node started as `python -m MODULE --ros-args ...` with its output captured.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASTDDS_PROFILE = REPO / "config" / "fastdds_large_frames.xml"
DOMAIN_IDS = range(1, 102)  # the range the ROS docs call safe on every platform
_LOCK_DIR = Path("/tmp/robometer_ros_domains")


class DomainLease:
    """An exclusive ROS_DOMAIN_ID for as long as the lease is held (a flock'ed file per id), so parallel
    test runs and demos on one machine never share a graph."""

    def __init__(self, lock_dir: Path = _LOCK_DIR) -> None:
        lock_dir.mkdir(parents=True, exist_ok=True)
        start = (os.getpid() * 7 + int(time.monotonic() * 1000)) % len(DOMAIN_IDS)
        for i in range(len(DOMAIN_IDS)):
            domain_id = DOMAIN_IDS[(start + i) % len(DOMAIN_IDS)]
            handle = open(lock_dir / f"{domain_id}.lock", "w")  # noqa: SIM115 (held for the lease)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self.domain_id = domain_id
            self._handle = handle
            return
        raise RuntimeError(f"no free ROS_DOMAIN_ID in {DOMAIN_IDS.start}..{DOMAIN_IDS.stop - 1}")

    def release(self) -> None:
        """Give the domain id back."""
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def ros_environment(domain_id: int, log_dir: Path) -> dict[str, str]:
    """Environment variables for every process of the graph (set them in this process too to join it)."""
    env = {
        "ROS_DOMAIN_ID": str(domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOG_DIR": str(log_dir),
        "PYTHONUNBUFFERED": "1",
        "RCUTILS_COLORIZED_OUTPUT": "0",
    }
    if FASTDDS_PROFILE.is_file():  # camera-sized frames with best-effort QoS need the larger SHM segment
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(FASTDDS_PROFILE)
    return env


def parameter_args(params: dict[str, object]) -> list[str]:
    """`-p name:=value` arguments for `--ros-args` (booleans as true/false)."""
    args: list[str] = []
    for name, value in params.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        args += ["-p", f"{name}:={text}"]
    return args


class NodeProcess:
    """A node started as `python -m MODULE ARGS --ros-args ROS_ARGS`, stdout and stderr (where rclpy logs)
    captured to a file that can be read while it runs."""

    def __init__(self, module: str, ros_args: Sequence[str] = (), *, env: dict[str, str], log_path: Path,
                 args: Sequence[str] = ()) -> None:
        self.module = module
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        cmd = [sys.executable, "-m", module, *args]
        if ros_args:
            cmd += ["--ros-args", *ros_args]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO)

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc.poll() is None

    def wait_for_output(self, needle: str | Callable[[str], bool], timeout: float = 20.0) -> str:
        """Wait until the output contains `needle` (or satisfies it); return the output."""
        check = needle if callable(needle) else (lambda text: needle in text)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if check(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.module} exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.module} did not print {needle!r} within {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT (what Ctrl-C and `ros2 launch` send), then SIGKILL after `timeout`; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)
