"""Soak the reward node: a camera at 30 Hz 640x480 and at 60 Hz 1920x1080, each for a given time, and what
the node's memory, admission, image callback and scoring do over it.

    .venv/bin/python benchmarks/soak_node.py --seconds 600                    # both profiles, 10 min each
    .venv/bin/python benchmarks/soak_node.py --seconds 20 --profiles 640x480@30
    .venv/bin/python benchmarks/soak_node.py --bundle /path/to/bundle --backend tensorrt --seconds 600

Each profile gets a fresh node process (the tiny bundle, exported on the fly, unless --bundle) in a private
DDS domain with the large-frame Fast DDS profile, recording off unless --record DIR. Printed per profile:
the node's RSS at the start, the end and its maximum (sampled every second; a growing end-start is a leak),
frames sent / received / admitted / dropped by reason, the image callback's cost (median / p99, from the
node's /diagnostics keys image_callback_ms.median and .p99; "n/a" where the node does not report them),
the scoring rate and the stamp age (camera stamp to StepReward arrival here, and the node's own figure).
The camera's achieved rate is printed too: a Python publisher may not keep 60 Hz of 6 MB frames.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from node_driver import NodeRun, dropped_by_reason, export_tiny_bundle, percentiles, work_dir

from robometer_ros.ros_graph import DomainLease

DEFAULT_PROFILES = ("640x480@30", "1920x1080@60")


def parse_profile(text: str) -> tuple[int, int, float]:
    """'640x480@30' -> (640, 480, 30.0)."""
    size, _, rate = text.partition("@")
    width, _, height = size.partition("x")
    try:
        return int(width), int(height), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"profile {text!r} is not WIDTHxHEIGHT@HZ") from None


def soak(profile: str, args: argparse.Namespace, bundle: Path, work: Path, domain_id: int) -> None:
    """Run one camera profile against a fresh node and print its figures."""
    width, height, rate = parse_profile(profile)
    params: dict[str, object] = {"frame_rate": args.frame_rate, "max_frames_per_episode": args.max_frames}
    if args.record:
        params.update({"record": "true", "record_dir": str(Path(args.record) / profile.replace("@", "_"))})
    run = NodeRun(bundle, params, work=work, domain_id=domain_id, backend=args.backend, camera_qos=args.camera_qos,
                  threads=args.threads, log_name=f"node_{profile.replace('@', '_')}.log")
    try:
        run.start_instruction("open the top drawer")
        camera = run.camera(width, height, rate, args.seconds, rss_every=1.0)
        run.settle(2.5)
        values = run.diagnostics()
    finally:
        code = run.close()
    rss = [m for _, m in camera.rss if not math.isnan(m)]
    steps, scoring_rate = run.scoring_rate()
    received = int(values.get("frames_received", 0) or 0)
    print(f"== {width}x{height} rgb8 at {rate:g} Hz for {camera.elapsed:.0f} s "
          f"(achieved {camera.sent / camera.elapsed:.1f} Hz), admission {args.frame_rate:g} Hz, "
          f"{values.get('model_id', '?')} on {values.get('backend', '?')}, camera QoS {args.camera_qos}")
    if rss:
        print(f"node RSS MiB: start {rss[0]:.0f}, end {rss[-1]:.0f}, max {max(rss):.0f} "
              f"(end - start {rss[-1] - rss[0]:+.0f})")
        # the curve, not only its ends: a store filling up to max_frames_per_episode levels off early, a leak
        # keeps climbing
        points = [camera.rss[round(i * (len(camera.rss) - 1) / 10)] for i in range(11)]
        print("node RSS MiB over time: " + ", ".join(f"{t:.0f} s {m:.0f}" for t, m in points if not math.isnan(m)))
    print(f"frames sent {camera.sent}, received {received} (lost in transport {camera.sent - received}), "
          f"admitted {values.get('frames_admitted', '?')}, dropped {values.get('frames_dropped', '?')} "
          f"{dropped_by_reason(values)}, bad images {values.get('bad_images', '?')}")
    print(f"image callback ms: median {values.get('image_callback_ms.median', 'n/a')}, "
          f"p99 {values.get('image_callback_ms.p99', 'n/a')}")
    print(f"scoring: {steps} steps, {scoring_rate:.2f} Hz here (node says {values.get('scoring_rate_hz', 'n/a')} Hz)")
    print(f"stamp age at StepReward arrival ms p50/p90/p99/max: {percentiles(run.stamp_age_ms)}; node-side "
          f"p50 {values.get('stamp_age_ms.median', 'n/a')}, p95 {values.get('stamp_age_ms.p95', 'n/a')}")
    print(f"inference ms p50/p90/p99/max: {percentiles(run.inference_ms)}")
    print(f"node exit code {code}; log {run.log_path}")


def main() -> None:
    """Run every profile and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="camera time per profile (default 600)")
    parser.add_argument("--profiles", nargs="+", default=list(DEFAULT_PROFILES), type=str,
                        help=f"WIDTHxHEIGHT@HZ camera profiles (default {' '.join(DEFAULT_PROFILES)})")
    parser.add_argument("--bundle", default="", help="bundle directory; default: export the tiny test bundle")
    parser.add_argument("--backend", default="onnxruntime", help="node backend (default onnxruntime)")
    parser.add_argument("--frame-rate", type=float, default=5.0, help="node admission rate in Hz (default 5)")
    parser.add_argument("--max-frames", type=int, default=128, help="node max_frames_per_episode (default 128)")
    parser.add_argument("--camera-qos", default="sensor_data", choices=("sensor_data", "reliable"))
    parser.add_argument("--record", default="", help="record episodes into this directory (default: off)")
    parser.add_argument("--domain-id", type=int, default=0,
                        help="ROS_DOMAIN_ID of the private graph (default: lease a free one, as the tests do)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/ORT threads in the node (default 1)")
    args = parser.parse_args()
    for profile in args.profiles:
        parse_profile(profile)  # fail on a typo before anything starts
    work = work_dir("soak_node_")
    bundle = Path(args.bundle) if args.bundle else export_tiny_bundle(work / "bundle")
    # A leased domain id: a test run or another benchmark on this machine never shares the soak's graph
    # (a stray publisher on /camera/image would count as the soak's frames).
    lease = None if args.domain_id else DomainLease()
    domain_id = args.domain_id or lease.domain_id
    print(f"soak_node: {args.seconds:g} s per profile, bundle {bundle}, work dir {work}, ROS_DOMAIN_ID {domain_id}")
    try:
        for profile in args.profiles:
            soak(profile, args, bundle, work, domain_id)
    finally:
        if lease is not None:
            lease.release()


if __name__ == "__main__":
    main()
