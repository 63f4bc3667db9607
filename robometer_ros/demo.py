"""``make demo``: the real reward node with the embedded default model, on recorded Meta-World episodes.

    python -m robometer_ros.demo [--bundle bundles/default] [--bags demo_bags] [--out demo_out]
    python -m robometer_ros.demo make-bags [--out demo_bags]     # regenerate the demo bags (needs metaworld)

What it does:

1. starts ``python -m robometer_ros.reward_node`` as a subprocess with the bundle, on a private ROS graph
   (its own ROS_DOMAIN_ID, LOCALHOST discovery, a temporary ROS_LOG_DIR);
2. waits until its topics and services match, then replays each demo bag onto them in real time (the
   instruction first, latched; then the camera images with fresh header stamps at the bag's frame spacing),
   waits for the step that scored the last frame and closes the episode with ``~/end_episode``;
3. collects every StepReward, FailureFlag and EpisodeStatus, prints a compact per-step table and a summary
   per episode (final progress, success, failure flags raised and why, the node's verdict and whether the
   simulator agrees);
4. writes ``demo_out/``: a PNG per episode (reward curves, failure flags, a few scored frames), ``steps.csv``,
   ``summary.json`` and ``outputs_bag/`` (rosbag2 MCAP of the node's outputs).

The demo bags (``demo_bags/*``) hold Meta-World episodes of scenes the default model never trained on (MT1
seed 2; training used seed 0, calibration seed 3, evaluation seed 1), of trained and of held-out tasks, each
with an instruction from its task's held-out wordings (never used in training): camera images
(sensor_msgs/Image rgb8 stamped with the simulator's time, as the evaluation scores them) and the instruction
(std_msgs/String), with the episode's ground truth in the bag's custom metadata. The node runs with its
default parameters (the monitor thresholds calibrated for the default bundle); only the topics differ.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.ros_graph import REPO, DomainLease, NodeProcess, parameter_args, ros_environment

DEFAULT_BUNDLE = REPO / "bundles" / "default"
DEFAULT_BAGS = REPO / "demo_bags"
DEFAULT_OUT = Path("demo_out")
IMAGE_TOPIC = "/demo/camera/image_raw"
INSTRUCTION_TOPIC = "/demo/instruction"
NODE_NAME = "reward_node"
CAMERA_FRAME_ID = "corner4_camera"
NS_PER_S = 1_000_000_000

# Demo bags: Meta-World scenes never used in training (seed 2), of tasks the default model trained on and of
# held-out tasks (robometer_ros/training/data/metaworld_tasks.yaml), successes and failures. Each entry: (task,
# behaviour, label it must have, a held-out wording of the task); the first such episode of the task's first 5
# slots is taken (chosen by the simulator's outcome, never by the model).
DEMO_SEED = 2
DEMO_FRAMES = 40
DEMO_SIZE = 96
DEMO_EPISODES: tuple[tuple[str, str, str, str], ...] = (
    ("door-open-v3", "expert", "successful", "open the door"),
    ("door-open-v3", "stall", "failure", "could you open the door please"),
    ("drawer-open-v3", "wrong_policy", "failure", "could you open the drawer"),
    ("window-close-v3", "expert", "successful", "could you close the window"),
    ("window-close-v3", "stall", "failure", "the window is open, shut it"),
)
# Bag metadata keys holding the episode's ground truth.
TRUTH_PREFIX = "robometer_demo."

# The reward node's parameters for the demo: its topics, and a reliable camera subscription (the replay is
# a reliable publisher: no frame of a short episode may be lost). Everything else is the node's default.
NODE_PARAMETERS: dict[str, Any] = {
    "image_topic": IMAGE_TOPIC,
    "instruction_topic": INSTRUCTION_TOPIC,
    "camera_qos": "reliable",
}


# ---------------------------------------------------------------------------------------------- demo bags
@dataclass
class DemoEpisode:
    """One demo bag: the instruction, the camera frames with their stamps, and its ground truth."""

    name: str
    instruction: str
    stamps_ns: list[int]
    frames: list[np.ndarray]
    truth: dict[str, str] = field(default_factory=dict)


def write_demo_bag(path: Path, trajectory: Any) -> None:
    """Write one Trajectory as a rosbag2 MCAP bag: the instruction, then rgb8 images at its frame stamps."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from robometer_ros.recorder import make_typestore

    typestore = make_typestore()
    image_type, string_type = "sensor_msgs/msg/Image", "std_msgs/msg/String"
    Image, String = typestore.types[image_type], typestore.types[string_type]
    Header, Time = typestore.types["std_msgs/msg/Header"], typestore.types["builtin_interfaces/msg/Time"]
    start_ns = 1_700_000_000 * NS_PER_S  # a fixed camera epoch: the bags are byte-reproducible
    offsets_ns = np.round((np.asarray(trajectory.frame_stamps) - trajectory.frame_stamps[0]) * NS_PER_S)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        instruction = writer.add_connection(INSTRUCTION_TOPIC, string_type, typestore=typestore)
        camera = writer.add_connection(IMAGE_TOPIC, image_type, typestore=typestore)
        writer.write(instruction, start_ns - NS_PER_S // 10,
                     typestore.serialize_cdr(String(data=trajectory.instruction), string_type))
        for offset, frame in zip(offsets_ns, trajectory.frames):
            stamp = start_ns + int(offset)
            height, width, _ = frame.shape
            message = Image(
                header=Header(stamp=Time(sec=stamp // NS_PER_S, nanosec=stamp % NS_PER_S),
                              frame_id=CAMERA_FRAME_ID),
                height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3,
                data=np.ascontiguousarray(frame, dtype=np.uint8).reshape(-1),
            )
            writer.write(camera, stamp, typestore.serialize_cdr(message, image_type))
        meta = trajectory.metadata
        truth = {
            "task": meta["task"], "seed": str(meta["seed"]), "slot": str(meta["slot"]), "kind": meta["kind"],
            "behaviour": meta["behaviour"], "quality_label": trajectory.quality_label,
            "first_success_step": str(meta["first_success_step"]), "episode_id": trajectory.episode_id,
        }
        for key, value in truth.items():
            writer.set_custom_data(TRUTH_PREFIX + key, value)


def read_demo_bag(path: Path) -> DemoEpisode:
    """Read a demo bag back (any bag with one rgb8/bgr8 Image topic and one String topic works)."""
    from rosbags.rosbag2 import Reader

    from robometer_ros.images import image_msg_to_rgb
    from robometer_ros.recorder import make_typestore, read_episode_label

    typestore = make_typestore()
    instruction = ""
    stamps, frames = [], []
    with Reader(path) as reader:
        for connection, _, raw in reader.messages():
            if connection.msgtype == "std_msgs/msg/String":
                instruction = typestore.deserialize_cdr(raw, connection.msgtype).data
            elif connection.msgtype == "sensor_msgs/msg/Image":
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                stamps.append(msg.header.stamp.sec * NS_PER_S + msg.header.stamp.nanosec)
                frames.append(image_msg_to_rgb(msg))
    if not instruction or not frames:
        raise ValueError(f"demo bag {path} needs a std_msgs/String instruction and sensor_msgs/Image frames")
    labels = read_episode_label(path)
    truth = {k[len(TRUTH_PREFIX):]: v for k, v in labels.items() if k.startswith(TRUTH_PREFIX)}
    return DemoEpisode(path.name, instruction, stamps, frames, truth)


def make_bags(out: Path) -> int:
    """Generate the demo episodes (``DEMO_EPISODES``) and write them as bags under ``out``."""
    from robometer_ros.training.data import metaworld

    settings = metaworld.RenderSettings(frames=DEMO_FRAMES, size=DEMO_SIZE)
    out.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[Any]] = {}
    for number, (task, behaviour, label, wording) in enumerate(DEMO_EPISODES, start=1):
        if task not in by_task:
            by_task[task] = list(metaworld.generate([task], 5, DEMO_SEED, settings, progress_bar=False))
        matches = [t for t in by_task[task] if t.metadata["behaviour"] == behaviour and t.quality_label == label]
        if not matches:
            raise RuntimeError(f"no {behaviour} episode of {task} labelled {label} in the first 5 slots of "
                               f"seed {DEMO_SEED}")
        trajectory = dataclasses.replace(matches[0], instruction=wording)
        path = out / f"{number:02d}_{task.removesuffix('-v3')}_{label}"
        if path.exists():
            raise FileExistsError(f"{path} exists; remove the old demo bags first")
        write_demo_bag(path, trajectory)
        print(f"wrote {path} ({len(trajectory)} frames, {trajectory.episode_id}, "
              f"behaviour {trajectory.metadata['behaviour']}, label {label}, '{wording}')")
    return 0


class DemoClient:
    """An rclpy node in this process: publishes the camera and instruction, collects the node's outputs."""

    def __init__(self, domain_id: int) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward
        from robometer_ros.srv import EndEpisode

        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("robometer_demo", context=self.context)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        latched_in = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.node.create_publisher(Image, IMAGE_TOPIC, QoSProfile(
            depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.instruction_pub = self.node.create_publisher(String, INSTRUCTION_TOPIC, latched)
        self._lock = threading.Condition()
        self.rewards: list[Any] = []
        self.flags: list[Any] = []
        self.statuses: list[Any] = []
        self.received: list[tuple[str, int, Any]] = []  # (topic, receive time ns, message) for the bag
        base = f"/{NODE_NAME}"
        self.subs = [
            self.node.create_subscription(StepReward, f"{base}/step_reward",
                                          lambda m: self._push(self.rewards, "step_reward", m), reliable),
            self.node.create_subscription(FailureFlag, f"{base}/failure_flag",
                                          lambda m: self._push(self.flags, "failure_flag", m), latched_in),
            self.node.create_subscription(EpisodeStatus, f"{base}/episode",
                                          lambda m: self._push(self.statuses, "episode", m), latched_in),
        ]
        self.end_client = self.node.create_client(EndEpisode, f"{base}/end_episode")
        self._types = {"Image": Image, "String": String, "EndEpisode": EndEpisode}
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException):
            self._executor.spin()

    def _push(self, store: list[Any], topic: str, msg: Any) -> None:
        with self._lock:
            store.append(msg)
            self.received.append((topic, time.time_ns(), msg))
            self._lock.notify_all()

    def wait_until(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` (evaluated under the lock) holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def matched(self) -> bool:
        """Every topic and the end_episode service are connected to the node."""
        return (self.image_pub.get_subscription_count() >= 1
                and self.instruction_pub.get_subscription_count() >= 1
                and all(sub.get_publisher_count() >= 1 for sub in self.subs)
                and self.end_client.service_is_ready())

    def publish_instruction(self, text: str) -> None:
        self.instruction_pub.publish(self._types["String"](data=text))

    def publish_image(self, frame: np.ndarray, stamp_ns: int) -> None:
        msg = self._types["Image"]()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, NS_PER_S)
        msg.header.frame_id = CAMERA_FRAME_ID
        msg.height, msg.width = int(frame.shape[0]), int(frame.shape[1])
        msg.encoding, msg.is_bigendian, msg.step = "rgb8", 0, int(frame.shape[1]) * 3
        msg.data = np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
        self.image_pub.publish(msg)

    def end_episode(self, note: str, timeout: float = 10.0) -> Any:
        """Call ~/end_episode with outcome UNKNOWN (the verdict is the model's); returns the response."""
        request = self._types["EndEpisode"].Request(outcome=0, note=note)
        future = self.end_client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError("~/end_episode did not answer")
            time.sleep(0.02)
        return future.result()

    def close(self) -> None:
        self._executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


# ---------------------------------------------------------------------------------------------- results
REASONS = {0: "none", 1: "stalled", 2: "regressed", 3: "low success at end", 4: "timeout", 5: "model error"}
STATES = {0: "waiting", 1: "running", 2: "succeeded", 3: "failed", 4: "ended"}


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


@dataclass
class EpisodeResult:
    """What the node said about one replayed demo episode."""

    bag: DemoEpisode
    episode_id: str
    start_ns: int
    rewards: list[Any] = field(default_factory=list)
    flags: list[Any] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Final progress, success, flags raised and why, and the ground truth."""
        last = self.rewards[-1] if self.rewards else None
        succeeded = any(s.state == 2 for s in self.statuses)
        raised = [
            {"reason": REASONS.get(f.reason, str(f.reason)), "severity": int(f.severity),
             "at_s": round((_stamp_ns(f.header.stamp) - self.start_ns) / NS_PER_S, 2)
             if _stamp_ns(f.header.stamp) else None,
             "confidence": round(float(f.confidence), 3), "detail": f.detail}
            for f in self.flags if f.failed
        ]
        progress = [float(r.progress) for r in self.rewards]
        truth = self.bag.truth.get("quality_label", "unknown")
        # the node's verdict: a failure flag raised during the episode or at its end (any reason), else success
        verdict = "failure" if raised else "success"
        expected = "failure" if truth == "failure" else "success"
        return {
            "bag": self.bag.name,
            "instruction": self.bag.instruction,
            "truth": truth,
            "task": self.bag.truth.get("task", ""),
            "behaviour": self.bag.truth.get("behaviour", ""),
            "episode_id": self.episode_id,
            "frames": len(self.bag.frames),
            "steps": len(self.rewards),
            "final_progress": round(progress[-1], 3) if progress else None,
            "max_progress": round(max(progress), 3) if progress else None,
            "final_success_probability": round(float(last.success_probability), 3) if last else None,
            "succeeded": succeeded,
            "failure_flags": raised,
            "verdict": verdict,
            "verdict_right": None if truth == "unknown" else verdict == expected,
            "model_id": last.model_id if last else "",
            "backend": last.backend if last else "",
            "median_inference_ms": round(1e3 * float(np.median([r.inference_time for r in self.rewards])), 2)
            if self.rewards else None,
        }


def print_steps(result: EpisodeResult) -> None:
    """A compact per-step table of one episode."""
    flags_at = {}
    for flag in result.flags:
        if flag.failed:
            flags_at.setdefault(_stamp_ns(flag.header.stamp), []).append(REASONS.get(flag.reason, "?"))
    print(f"\n== {result.bag.name}: '{result.bag.instruction}' (truth: "
          f"{result.bag.truth.get('quality_label', '?')}, {result.bag.truth.get('behaviour', '?')})")
    print(f"{'step':>4} {'t[s]':>5} {'frames':>6} {'progress':>8} {'success':>7} {'ms':>6}  flag")
    for reward in result.rewards:
        stamp = _stamp_ns(reward.header.stamp)
        flag = ",".join(flags_at.get(stamp, []))
        print(f"{reward.step:>4} {(stamp - result.start_ns) / NS_PER_S:>5.1f} {reward.frames_in_episode:>6} "
              f"{reward.progress:>8.3f} {reward.success_probability:>7.3f} {1e3 * reward.inference_time:>6.1f}  "
              f"{flag}")


def plot_episode(result: EpisodeResult, path: Path) -> None:
    """Reward curves, failure flags and four scored frames of one episode as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    times = [(_stamp_ns(r.header.stamp) - result.start_ns) / NS_PER_S for r in result.rewards]
    figure = plt.figure(figsize=(9, 5.2))
    grid = figure.add_gridspec(2, 4, height_ratios=[2.2, 1.3])
    axis = figure.add_subplot(grid[0, :])
    axis.plot(times, [r.progress for r in result.rewards], "-o", ms=3, label="progress")
    axis.plot(times, [r.success_probability for r in result.rewards], "-s", ms=3, label="success probability")
    for flag in result.flags:
        stamp = _stamp_ns(flag.header.stamp)
        if flag.failed and stamp:
            at = (stamp - result.start_ns) / NS_PER_S
            axis.axvline(at, color="red", linestyle="--")
            axis.text(at, 1.02, REASONS.get(flag.reason, "?"), color="red", fontsize=8, ha="right")
    axis.set_ylim(-0.02, 1.1)
    axis.set_xlabel("camera time [s]")
    axis.legend(loc="upper left", fontsize=8)
    summary = result.summary()
    axis.set_title(f"{result.bag.name}: '{result.bag.instruction}'\ntruth {summary['truth']}, final progress "
                   f"{summary['final_progress']}, succeeded {summary['succeeded']}", fontsize=9)
    frame_times = [(s - result.bag.stamps_ns[0]) / NS_PER_S for s in result.bag.stamps_ns]
    picks = np.rint(np.linspace(0, len(result.rewards) - 1, 4)).astype(int) if result.rewards else []
    for column, pick in enumerate(picks):
        reward = result.rewards[int(pick)]
        at = (_stamp_ns(reward.header.stamp) - result.start_ns) / NS_PER_S
        frame_index = int(np.argmin([abs(t - at) for t in frame_times]))
        image_axis = figure.add_subplot(grid[1, column])
        image_axis.imshow(result.bag.frames[frame_index])
        image_axis.set_axis_off()
        image_axis.set_title(f"t={at:.1f}s p={reward.progress:.2f} s={reward.success_probability:.2f}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_outputs_bag(path: Path, client: DemoClient) -> int:
    """The node's outputs as received (StepReward, FailureFlag, EpisodeStatus) in one rosbag2 MCAP bag."""
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer

    from robometer_ros.recorder import make_typestore

    typestore = make_typestore()
    types = {"step_reward": "robometer_ros/msg/StepReward", "failure_flag": "robometer_ros/msg/FailureFlag",
             "episode": "robometer_ros/msg/EpisodeStatus"}
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {
            topic: writer.add_connection(f"/{NODE_NAME}/{topic}", msgtype, typestore=typestore)
            for topic, msgtype in types.items()
        }
        for topic, received_ns, msg in sorted(client.received, key=lambda item: item[1]):
            writer.write(connections[topic], received_ns, serialize_message(msg))
    return len(client.received)


# ---------------------------------------------------------------------------------------------- the demo
def replay(client: DemoClient, bag: DemoEpisode, used_ids: set[str], speed: float) -> EpisodeResult:
    """Replay one bag onto the node's topics and close the episode; returns what the node published."""
    client.publish_instruction(bag.instruction)

    def new_episode() -> Any:
        for status in reversed(client.statuses):
            if status.instruction == bag.instruction and status.state == 0 and status.episode_id not in used_ids:
                return status
        return None

    if not client.wait_until(lambda: new_episode() is not None, 15.0):
        raise TimeoutError(f"the node started no episode for the instruction of {bag.name}")
    episode_id = new_episode().episode_id
    used_ids.add(episode_id)
    start_ns = time.time_ns()
    spacing = [s - bag.stamps_ns[0] for s in bag.stamps_ns]
    wall_start = time.monotonic()
    for frame, offset in zip(bag.frames, spacing):
        if speed > 0:  # the bag's own frame spacing, played `speed` times as fast
            time.sleep(max(0.0, wall_start + offset / NS_PER_S / speed - time.monotonic()))
        client.publish_image(frame, start_ns + offset)
    last_ns = start_ns + spacing[-1]

    def scored_last() -> bool:
        return any(r.episode_id == episode_id and _stamp_ns(r.header.stamp) == last_ns for r in client.rewards)

    if not client.wait_until(scored_last, 30.0):
        print(f"warning: no step scored the last frame of {bag.name} within 30 s", file=sys.stderr)
    client.end_episode(note=f"demo bag {bag.name}")
    # the end verdict (LOW_SUCCESS_AT_END) and the ENDED status follow the service answer
    client.wait_until(lambda: any(s.episode_id == episode_id and s.state == 4 for s in client.statuses), 5.0)
    with client._lock:
        return EpisodeResult(
            bag=bag, episode_id=episode_id, start_ns=start_ns,
            rewards=sorted((r for r in client.rewards if r.episode_id == episode_id), key=lambda r: r.step),
            flags=[f for f in client.flags if f.episode_id == episode_id],
            statuses=[s for s in client.statuses if s.episode_id == episode_id],
        )


def run_demo(bundle: Path, bags_dir: Path, out: Path, backend: str = "auto",
             speed: float = 1.0, startup_timeout: float = 120.0) -> int:
    """Start the node, replay every bag, write ``out``; 0 when every episode was scored."""
    bag_paths = sorted(p for p in bags_dir.iterdir() if (p / "metadata.yaml").is_file()) if bags_dir.is_dir() else []
    if not bag_paths:
        print(f"error: no rosbag2 bags in {bags_dir}", file=sys.stderr)
        return 2
    if not (bundle / "manifest.json").is_file():
        print(f"error: {bundle} is not a bundle (no manifest.json); run `make default-model`", file=sys.stderr)
        return 2
    bags = [read_demo_bag(p) for p in bag_paths]
    out.mkdir(parents=True, exist_ok=True)
    lease = DomainLease()
    log_dir = Path(tempfile.mkdtemp(prefix="robometer_demo_log_"))
    env = ros_environment(lease.domain_id, log_dir)
    os.environ.update(env)  # this process joins the same private graph
    print(f"robometer demo: bundle {bundle}, {len(bags)} bags, ROS_DOMAIN_ID {lease.domain_id} (LOCALHOST)")
    node = NodeProcess("robometer_ros.reward_node",
                       parameter_args({"bundle": str(bundle), "backend": backend, **NODE_PARAMETERS}),
                       env=env, log_path=out / "reward_node.log")
    client: DemoClient | None = None
    results: list[EpisodeResult] = []
    try:
        client = DemoClient(lease.domain_id)
        deadline = time.monotonic() + startup_timeout
        while not client.matched():
            if not node.running():
                print(f"error: the reward node exited:\n{node.output()}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"error: the reward node's topics did not match in {startup_timeout:.0f} s:\n"
                      f"{node.output()}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        used_ids: set[str] = set()
        for bag in bags:
            result = replay(client, bag, used_ids, speed)
            results.append(result)
            print_steps(result)
    finally:
        code = node.stop()
        if client is not None:
            bag_messages = write_outputs_bag(out / "outputs_bag", client) if results else 0
            client.close()
        lease.release()
    summaries = [r.summary() for r in results]
    for result in results:
        plot_episode(result, out / f"{result.bag.name}.png")
    with open(out / "steps.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["bag", "episode_id", "step", "t_s", "frames", "progress", "success_probability",
                         "reward", "inference_ms"])
        for result in results:
            for r in result.rewards:
                writer.writerow([result.bag.name, r.episode_id, r.step,
                                 round((_stamp_ns(r.header.stamp) - result.start_ns) / NS_PER_S, 3),
                                 r.frames_in_episode, round(r.progress, 4), round(r.success_probability, 4),
                                 round(r.reward, 4), round(1e3 * r.inference_time, 2)])
    (out / "summary.json").write_text(json.dumps({"bundle": str(bundle), "episodes": summaries}, indent=2) + "\n")
    print("\n== summary")
    print(f"{'bag':<32} {'truth':<10} {'steps':>5} {'final p':>7} {'max p':>6} {'verdict':>7} {'right':>5}  "
          "flags raised")
    for s in summaries:
        flags = "; ".join(f"{f['reason']} ({f['detail']})" for f in s["failure_flags"]) or "none"
        right = {True: "yes", False: "NO", None: "?"}[s["verdict_right"]]
        print(f"{s['bag']:<32} {s['truth']:<10} {s['steps']:>5} {s['final_progress']!s:>7} "
              f"{s['max_progress']!s:>6} {s['verdict']:>7} {right:>5}  {flags}")
    judged = [s for s in summaries if s["verdict_right"] is not None]
    print(f"\nthe node's verdict was right on {sum(s['verdict_right'] for s in judged)} of {len(judged)} episodes "
          "(verdict: failure = a failure flag raised during the episode or at ~/end_episode; truth: the "
          "simulator's success signal)")
    print(f"\nwrote {out}/: {len(results)} PNGs, steps.csv, summary.json, outputs_bag/ ({bag_messages} messages); "
          f"node log reward_node.log (node exit code {code})")
    return 0 if all(r.rewards for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m robometer_ros.demo [make-bags]``."""
    parser = argparse.ArgumentParser(prog="python -m robometer_ros.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "make-bags"), default="run")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle directory")
    parser.add_argument("--bags", type=Path, default=DEFAULT_BAGS, help="folder of demo bags")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (run: demo_out; make-bags: the --bags folder)")
    parser.add_argument("--backend", default="auto", help="reward node backend (auto/onnxruntime/torch/tensorrt)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="replay speed (1 = the bags' own camera time; 0 = as fast as possible)")
    args = parser.parse_args(argv)
    if args.command == "make-bags":
        return make_bags(args.out or args.bags)
    return run_demo(args.bundle, args.bags, args.out or DEFAULT_OUT, args.backend, args.speed)


if __name__ == "__main__":
    raise SystemExit(main())
