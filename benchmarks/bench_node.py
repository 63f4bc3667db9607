"""Drive the reward node with a 30 Hz 640x480 camera and print what it keeps up with.

    .venv/bin/python benchmarks/bench_node.py --seconds 60            # the tiny bundle, exported on the fly
    .venv/bin/python benchmarks/bench_node.py --bundle /path/to/bundle --backend tensorrt --seconds 300

The node runs as its own process (`python -m robometer_ros.reward_node`) in a private DDS domain on
loopback with the large-frame Fast DDS profile; this process publishes the camera and the instruction and
listens to StepReward and /diagnostics. Printed: frames sent / received / admitted / dropped (by reason),
scoring rate, latency percentiles (stamp age when the StepReward arrives here, and the node's inference
time), and the node's RSS over time (bounded memory shows as a flat line after the first episode minute).
(benchmarks/soak_node.py runs the same node for longer at two camera profiles.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node_driver import NodeRun, dropped_by_reason, export_tiny_bundle, percentiles, work_dir


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

    work = work_dir("bench_node_")
    bundle = Path(args.bundle) if args.bundle else export_tiny_bundle(work / "bundle")
    run = NodeRun(bundle, {"frame_rate": args.frame_rate, "max_frames_per_episode": args.max_frames}, work=work,
                  domain_id=args.domain_id, backend=args.backend, camera_qos=args.camera_qos, threads=args.threads)
    try:
        run.start_instruction("open the top drawer")
        camera = run.camera(args.width, args.height, args.rate, args.seconds, rss_every=max(args.seconds / 12, 1.0))
        run.settle(2.5)
        values = run.diagnostics()
    finally:
        run.close()

    steps, rate = run.scoring_rate()
    print(f"bench_node: {args.width}x{args.height} rgb8 at {args.rate:g} Hz for {camera.elapsed:.1f} s, "
          f"bundle {bundle} ({values.get('model_id', '?')}, backend {values.get('backend', '?')}), "
          f"admission {args.frame_rate:g} Hz, camera QoS {args.camera_qos}")
    print(f"frames sent {camera.sent}, received by node {values.get('frames_received', '?')}, "
          f"admitted {values.get('frames_admitted', '?')}, dropped {values.get('frames_dropped', '?')} "
          + str(dropped_by_reason(values)))
    print(f"  (sent - received = lost in transport: {camera.sent - int(values.get('frames_received', camera.sent))}; "
          f"frames waiting for encoding at the end: {values.get('frames_waiting_for_encoding', '?')})")
    print(f"scoring steps {steps}, rate {rate:.2f} Hz")
    print(f"stamp age at StepReward arrival ms p50/p90/p99/max: {percentiles(run.stamp_age_ms)}")
    print(f"inference time ms p50/p90/p99/max:                 {percentiles(run.inference_ms)}")
    print(f"node-side stamp age at publish ms (last 200 steps) p50 {values.get('stamp_age_ms.median', '?')}, "
          f"p95 {values.get('stamp_age_ms.p95', '?')}")
    print("node RSS MiB over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in camera.rss))
    print(f"node log: {run.log_path}")


if __name__ == "__main__":
    main()
