"""What the node benchmarks share: a reward node process in a private DDS graph, a camera driving it, and
the figures read back (StepReward arrivals, /diagnostics, the node's RSS). Used by bench_node.py and
soak_node.py; not a benchmark itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def export_tiny_bundle(out_dir: Path) -> Path:
    """Export the seed-0 tiny Robometer as a bundle (what the tests use); a few seconds on one core."""
    import torch

    from robometer_ros.model.tiny import tiny_model
    from robometer_ros.training.export.onnx_export import export_bundle

    torch.set_num_threads(1)
    model, tokenizer = tiny_model(seed=0)
    export_bundle(model, tokenizer, out_dir, frame_size=(64, 96), model_id="robometer-tiny-bench",
                  log=lambda *_: None)
    return out_dir


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc); NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentiles(values: list[float]) -> str:
    """'p50 / p90 / p99 / max' of a list, or 'n/a'."""
    if not values:
        return "n/a"
    a = np.asarray(values)
    return " / ".join(f"{np.percentile(a, q):.1f}" for q in (50, 90, 99)) + f" / {a.max():.1f}"


def graph_environment(domain_id: int, work: Path, threads: int) -> dict[str, str]:
    """The private graph: its domain, loopback discovery, the large-frame Fast DDS profile, log dir."""
    return {
        "ROS_DOMAIN_ID": str(domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOG_DIR": str(work / "log"),
        "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_large_frames.xml"),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class CameraRun:
    """What a camera run sent, and the node's RSS samples (seconds since the start, MiB)."""

    sent: int = 0
    elapsed: float = 0.0
    rss: list[tuple[float, float]] = field(default_factory=list)


class NodeRun:
    """One reward node process and a probe node (camera, instruction, StepReward and /diagnostics inboxes).

    Usage::

        run = NodeRun(bundle, {"frame_rate": 5.0}, work=Path("/tmp/x"), domain_id=87)
        try:
            run.start_instruction("open the top drawer")
            camera = run.camera(640, 480, rate=30.0, seconds=60.0)
            run.settle(2.5)
            print(run.diagnostics())
        finally:
            run.close()
    """

    def __init__(self, bundle: Path, params: dict[str, Any], *, work: Path, domain_id: int, backend: str,
                 camera_qos: str = "sensor_data", threads: int = 1, log_name: str = "node.log") -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from robometer_ros.msg import StepReward

        self.work = work
        self.log_path = work / log_name
        env = graph_environment(domain_id, work, threads)
        os.environ.update(env)  # this process joins the same graph
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        cmd = [sys.executable, "-m", "robometer_ros.reward_node", "--ros-args",
               "-p", f"bundle:={bundle}", "-p", f"backend:={backend}", "-p", "image_topic:=/camera/image",
               "-p", "instruction_topic:=/task", "-p", f"camera_qos:={camera_qos}", "-p", "diagnostics_period:=1.0"]
        for name, value in params.items():
            cmd += ["-p", f"{name}:={value}"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO)

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.probe = rclpy.create_node("bench_camera", context=self.context)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.probe)
        self._spinner = threading.Thread(target=self._executor.spin, daemon=True)
        self._spinner.start()

        self.stamp_age_ms: list[float] = []
        self.inference_ms: list[float] = []
        self.reward_times: list[float] = []
        self._diagnostics: list[Any] = []
        self.probe.create_subscription(StepReward, "/reward_node/step_reward", self._on_reward,
                                       QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.probe.create_subscription(DiagnosticArray, "/diagnostics", self._diagnostics.append, 10)
        qos = qos_profile_sensor_data if camera_qos == "sensor_data" else QoSProfile(
            depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self._image_type = Image
        self.camera_pub = self.probe.create_publisher(Image, "/camera/image", qos)
        self._string_type = String
        self.task_pub = self.probe.create_publisher(String, "/task", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    def _on_reward(self, msg: Any) -> None:
        now = self.probe.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.stamp_age_ms.append((now - stamp) / 1e6)
        self.inference_ms.append(msg.inference_time * 1e3)
        self.reward_times.append(time.monotonic())

    def wait_active(self, timeout: float = 120.0) -> None:
        """Until the node subscribes to the camera (it does once active); SystemExit with its log if not."""
        deadline = time.monotonic() + timeout
        while self.camera_pub.get_subscription_count() < 1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"node did not come up; see {self.log_path}:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.05)

    def start_instruction(self, text: str) -> None:
        """Wait for the node, then publish the (latched) instruction."""
        self.wait_active()
        self.task_pub.publish(self._string_type(data=text))

    def camera(self, width: int, height: int, rate: float, seconds: float, rss_every: float = 1.0) -> CameraRun:
        """Publish rgb8 frames stamped with the probe's clock at `rate` Hz for `seconds`; sample RSS."""
        rng = np.random.default_rng(0)
        # A few distinct frames, cycled: publishing cost stays the camera's, not numpy's.
        frames = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8).tobytes() for _ in range(8)]
        period = 1.0 / rate
        result = CameraRun()
        start = next_frame = next_rss = time.monotonic()
        while time.monotonic() - start < seconds:
            msg = self._image_type(height=height, width=width, encoding="rgb8", step=width * 3)
            msg.data = frames[result.sent % len(frames)]
            msg.header.stamp = self.probe.get_clock().now().to_msg()
            msg.header.frame_id = "bench_camera_optical"
            self.camera_pub.publish(msg)
            result.sent += 1
            now = time.monotonic()
            if now >= next_rss:
                result.rss.append((now - start, rss_mib(self.proc.pid)))
                next_rss += rss_every
            next_frame += period
            delay = next_frame - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        result.elapsed = time.monotonic() - start
        result.rss.append((result.elapsed, rss_mib(self.proc.pid)))
        return result

    def settle(self, seconds: float) -> None:
        """Let the last diagnostics message (1 s period) count the last frames."""
        time.sleep(seconds)

    def diagnostics(self) -> dict[str, str]:
        """The key/values of the node's latest /diagnostics status ({} if none arrived)."""
        if not self._diagnostics or not self._diagnostics[-1].status:
            return {}
        return {kv.key: kv.value for kv in self._diagnostics[-1].status[0].values}

    def scoring_rate(self) -> tuple[int, float]:
        """(StepRewards received, their rate in Hz)."""
        steps = len(self.reward_times)
        span = self.reward_times[-1] - self.reward_times[0] if steps > 1 else 0.0
        return steps, (steps - 1) / span if span else 0.0

    def close(self) -> int | None:
        """SIGINT the node (SIGKILL after 20 s), stop the probe; the node's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._executor.shutdown()
        self._spinner.join(5)
        self.probe.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
        self._log.close()
        return self.proc.returncode


def work_dir(prefix: str) -> Path:
    """A fresh temporary directory for one benchmark run (logs, exported bundle)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def dropped_by_reason(values: dict[str, str]) -> dict[str, str]:
    """frames_dropped.<reason> -> count from diagnostics values."""
    return {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("frames_dropped.")}
