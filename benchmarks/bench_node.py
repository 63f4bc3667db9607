"""Drive the reward node with a 30 Hz 640x480 camera and print what it keeps up with.

    .venv/bin/python benchmarks/bench_node.py --seconds 60            # the tiny bundle, exported on the fly
    .venv/bin/python benchmarks/bench_node.py --bundle /path/to/bundle --backend tensorrt --seconds 300

The node runs as its own process (`python -m robometer_ros.reward_node`) in a private DDS domain on
loopback with the large-frame Fast DDS profile; this process publishes the camera and the instruction and
listens to StepReward and /diagnostics. Printed: frames sent / received / admitted / dropped (by reason),
scoring rate, latency percentiles (stamp age when the StepReward arrives here, and the node's inference
time), and the node's RSS over time (bounded memory shows as a flat line after the first episode minute).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def export_tiny_bundle(out_dir: Path) -> Path:
    """Export the seed-0 tiny Robometer as a bundle (what the tests use); a few seconds on one core."""
    import torch

    from robometer_ros.model.tiny import tiny_model
    from robometer_ros.training.export import export_bundle

    torch.set_num_threads(1)
    model, tokenizer = tiny_model(seed=0)
    export_bundle(model, tokenizer, out_dir, frame_size=(64, 96), model_id="robometer-tiny-bench",
                  log=lambda *_: None)
    return out_dir


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> str:
    """'p50 / p90 / p99 / max' of a list, or 'n/a'."""
    if not values:
        return "n/a"
    a = np.asarray(values)
    return " / ".join(f"{np.percentile(a, q):.1f}" for q in (50, 90, 99)) + f" / {a.max():.1f}"


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the camera runs (default 60)")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz (default 30)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--bundle", default="", help="bundle directory; default: export the tiny test bundle")
    parser.add_argument("--backend", default="onnxruntime", help="node backend (default onnxruntime)")
    parser.add_argument("--frame-rate", type=float, default=5.0, help="node admission rate in Hz (default 5)")
    parser.add_argument("--max-frames", type=int, default=128, help="node max_frames_per_episode (default 128)")
    parser.add_argument("--camera-qos", default="sensor_data", choices=("sensor_data", "reliable"))
    parser.add_argument("--domain-id", type=int, default=87, help="ROS_DOMAIN_ID of the private graph")
    parser.add_argument("--threads", type=int, default=1, help="OMP/ORT threads in the node (default 1)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_node_"))
    env = {
        "ROS_DOMAIN_ID": str(args.domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOG_DIR": str(work / "log"),
        "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_large_frames.xml"),
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)  # this process joins the same graph
    bundle = Path(args.bundle) if args.bundle else export_tiny_bundle(work / "bundle")

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from robometer_ros.msg import StepReward

    node_log = open(work / "node.log", "wb")  # noqa: SIM115 (closed at the end)
    cmd = [sys.executable, "-m", "robometer_ros.reward_node", "--ros-args",
           "-p", f"bundle:={bundle}", "-p", f"backend:={args.backend}", "-p", "image_topic:=/camera/image",
           "-p", "instruction_topic:=/task", "-p", f"frame_rate:={args.frame_rate}",
           "-p", f"max_frames_per_episode:={args.max_frames}", "-p", f"camera_qos:={args.camera_qos}",
           "-p", "diagnostics_period:=1.0"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=node_log, stderr=subprocess.STDOUT, cwd=REPO)

    rclpy.init()
    probe = rclpy.create_node("bench_camera")
    executor = SingleThreadedExecutor()
    executor.add_node(probe)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    stamp_age_ms: list[float] = []
    inference_ms: list[float] = []
    reward_times: list[float] = []
    last_diag: list[DiagnosticArray] = []

    def on_reward(msg: StepReward) -> None:
        now = probe.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        stamp_age_ms.append((now - stamp) / 1e6)
        inference_ms.append(msg.inference_time * 1e3)
        reward_times.append(time.monotonic())

    probe.create_subscription(StepReward, "/reward_node/step_reward", on_reward,
                              QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    probe.create_subscription(DiagnosticArray, "/diagnostics", last_diag.append, 10)
    camera_qos = qos_profile_sensor_data if args.camera_qos == "sensor_data" else QoSProfile(
        depth=5, reliability=ReliabilityPolicy.RELIABLE)
    camera = probe.create_publisher(Image, "/camera/image", camera_qos)
    task = probe.create_publisher(String, "/task", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                                              durability=DurabilityPolicy.TRANSIENT_LOCAL))
    try:
        deadline = time.monotonic() + 120
        while camera.get_subscription_count() < 1:  # the node subscribes once it is active
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"node did not come up; see {work / 'node.log'}:\n"
                                 + (work / "node.log").read_text()[-3000:])
            time.sleep(0.05)
        task.publish(String(data="open the top drawer"))

        rng = np.random.default_rng(0)
        # A few distinct frames, cycled: publishing cost stays the camera's, not numpy's.
        frames = [rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8).tobytes()
                  for _ in range(8)]
        period = 1.0 / args.rate
        sent = 0
        rss: list[tuple[float, float]] = []
        start = next_frame = time.monotonic()
        next_rss = start
        while time.monotonic() - start < args.seconds:
            msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3)
            msg.data = frames[sent % len(frames)]
            msg.header.stamp = probe.get_clock().now().to_msg()
            msg.header.frame_id = "bench_camera_optical"
            camera.publish(msg)
            sent += 1
            now = time.monotonic()
            if now >= next_rss:
                rss.append((now - start, rss_mib(proc.pid)))
                next_rss += max(args.seconds / 12, 1.0)
            next_frame += period
            delay = next_frame - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        elapsed = time.monotonic() - start
        rss.append((elapsed, rss_mib(proc.pid)))
        # Let the last diagnostics message (1 s period) count the last frames.
        settle = time.monotonic() + 2.5
        while time.monotonic() < settle:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        executor.shutdown()
        spinner.join(5)
        probe.destroy_node()
        rclpy.try_shutdown()
        node_log.close()

    values = {kv.key: kv.value for kv in last_diag[-1].status[0].values} if last_diag else {}
    steps = len(reward_times)
    span = reward_times[-1] - reward_times[0] if steps > 1 else 0.0
    print(f"bench_node: {args.width}x{args.height} rgb8 at {args.rate:g} Hz for {elapsed:.1f} s, "
          f"bundle {bundle} ({values.get('model_id', '?')}, backend {values.get('backend', '?')}), "
          f"admission {args.frame_rate:g} Hz, camera QoS {args.camera_qos}")
    print(f"frames sent {sent}, received by node {values.get('frames_received', '?')}, "
          f"admitted {values.get('frames_admitted', '?')}, dropped {values.get('frames_dropped', '?')} "
          + str({k.split('.', 1)[1]: v for k, v in values.items() if k.startswith('frames_dropped.')}))
    print(f"  (sent - received = lost in transport: {sent - int(values.get('frames_received', sent))}; "
          f"frames waiting for encoding at the end: {values.get('frames_waiting_for_encoding', '?')})")
    print(f"scoring steps {steps}, rate {(steps - 1) / span if span else 0.0:.2f} Hz")
    print(f"stamp age at StepReward arrival ms p50/p90/p99/max: {percentiles(stamp_age_ms)}")
    print(f"inference time ms p50/p90/p99/max:                 {percentiles(inference_ms)}")
    print(f"node-side stamp age at publish ms (last 200 steps) p50 {values.get('stamp_age_ms.median', '?')}, "
          f"p95 {values.get('stamp_age_ms.p95', '?')}")
    print("node RSS MiB over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss))
    print(f"node log: {work / 'node.log'}")


if __name__ == "__main__":
    main()
