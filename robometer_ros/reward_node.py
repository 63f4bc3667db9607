"""The Robometer reward node: camera + instruction in; StepReward, latched FailureFlag and episodes out.

A managed (lifecycle) node, as robot stacks with lifecycle managers expect:

* configure: validate the parameters, open the bundle and load the RewardEngine, create the publishers
  (and the trigger client and episode recorder when asked). A missing or mismatched bundle fails the
  transition with a log line naming the problem; the node stays up, unconfigured, and /diagnostics says
  ERROR with the reason, so the bundle can be fixed and configure retried.
* activate: subscribe to the camera and the instruction, offer the episode services, start the worker.
* deactivate: pause (no admission, no scoring); the engine and the episode are kept.
* cleanup / shutdown: release the engine (GPU memory) and close the recording.
* ``autostart`` (default true) walks the node to active on its own.

Threads: the executor thread runs the subscriptions, services and timers; it only converts an image to
RGB and admits it to the episode's FrameStore. One worker thread does all model work: it encodes admitted
frames (the engine caches each frame's features) and scores the newest state of the episode, keep-latest,
so stale work is skipped rather than queued. Everything the two threads share is guarded by one lock.

Time: every output carries the header (stamp and frame_id) of the newest frame it scored, and the
EpisodeMonitor runs on camera stamps; the node's clock is used only for the stamp age in diagnostics.
"""

from __future__ import annotations

import collections
import datetime as dt
import gc
import math
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger

from robometer_ros.episode import AdmissionStatus, FrameStore
from robometer_ros.images import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from robometer_ros.monitor import EpisodeMonitor, Event, EventKind, FailureReason, MonitorConfig, Outcome
from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward
from robometer_ros.srv import EndEpisode

NODE_NAME = "reward_node"
NS_PER_S = 1_000_000_000

# An engine factory turns (bundle path, backend, verify_checksums=bool) into an object with the RewardEngine
# interface (add_frame, score, forget, backend_name, model_id, num_frames). The node's only seam for other
# engines (tests install a scripted double through it).
EngineFactory = Callable[..., Any]


def open_reward_engine(bundle_path: str, backend: str, verify_checksums: bool = True) -> Any:
    """The production engine factory: ``Bundle.open(bundle_path)`` then ``RewardEngine(bundle, backend)``.

    Raises whatever they raise (``BundleError`` naming the bad file or field, or a backend error).
    """
    from robometer_ros.engine.bundle import Bundle

    bundle = Bundle.open(bundle_path, verify_checksums=verify_checksums)  # first: a bad bundle is named as such
    from robometer_ros.engine.reward_engine import RewardEngine

    return RewardEngine(bundle, backend=backend)


# ---------------------------------------------------------------------------------------------- parameters
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
IMAGE_TRANSPORTS = ("raw", "compressed")
CAMERA_QOS = ("sensor_data", "reliable")
INSTRUCTION_QOS = ("latched", "volatile")
REWARD_MODES = {
    "progress": StepReward.REWARD_MODE_PROGRESS,
    "progress_delta": StepReward.REWARD_MODE_PROGRESS_DELTA,
    "success": StepReward.REWARD_MODE_SUCCESS,
}
RECORD_STORAGES = ("mcap", "sqlite3")
TRIGGER_SEVERITIES = {"warn": FailureFlag.SEVERITY_WARN, "error": FailureFlag.SEVERITY_ERROR}

# When a parameter takes effect.
AT_STARTUP = "startup"  # read-only: needs a restart
AT_CONFIGURE = "configure"  # read at configure: change it while unconfigured, then configure
LIVE = "live"  # applied at once (or, where noted, at the next episode)


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: default, description and when a change takes effect."""

    name: str
    default: Any
    description: str
    when: str = AT_CONFIGURE
    constraints: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def descriptor(self) -> ParameterDescriptor:
        """The ParameterDescriptor (description, range, read_only) for ``declare_parameter``."""
        constraints = self.constraints
        if self.choices:
            constraints = f"one of: {', '.join(self.choices)}" + (f"; {constraints}" if constraints else "")
        when = {
            AT_STARTUP: "read-only: restart the node to change it",
            AT_CONFIGURE: "applied at configure: change it while unconfigured",
            LIVE: "",
        }[self.when]
        constraints = "; ".join(c for c in (constraints, when) if c)
        desc = ParameterDescriptor(
            description=self.description, additional_constraints=constraints, read_only=self.when == AT_STARTUP
        )
        if self.low is not None and isinstance(self.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=self.low, to_value=self.high, step=0.0)]
        elif self.low is not None and isinstance(self.default, int) and not isinstance(self.default, bool):
            desc.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
        return desc


_MONITOR_DESCRIPTIONS = {
    "success_threshold": ("success probability at or above which a step counts as successful", 0.0, 1.0),
    "success_steps": ("consecutive successful steps before the episode is judged SUCCEEDED", 1, 1000),
    "stall_timeout_s": ("seconds (camera time) without progress before STALLED; 0 = off", 0.0, 86400.0),
    "stall_epsilon": ("smallest progress rise that counts as progress", 0.0, 1.0),
    "regression_margin": ("drop below the running progress maximum that counts as a rewind", 0.0, 1.0),
    "regression_steps": ("consecutive steps below the margin before REGRESSED", 1, 1000),
    "clear_steps": ("consecutive steps with the condition gone before a failure is cleared", 1, 1000),
    "episode_timeout_s": ("seconds (camera time) from the episode start before TIMEOUT; 0 = off", 0.0, 86400.0),
}

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("autostart", True, "walk the node to active on its own (configure, then activate)", AT_STARTUP),
    ParamSpec("bundle", "", "path of the exported model bundle directory (manifest.json, onnx/, engines/)"),
    ParamSpec("backend", "auto", "inference runtime; auto = tensorrt when the bundle has a plan for this GPU, "
              "else onnxruntime, else torch", choices=BACKENDS),
    ParamSpec("verify_checksums", True, "hash every bundle file against its manifest sha256 at configure "
              "(~10-30 s for a 4B bundle); false still checks that every file exists with its size"),
    ParamSpec("num_frames", 8, "frames scored per step; must equal the bundle's frame count", low=1, high=64),
    ParamSpec("image_topic", "~/image", "camera topic (the base topic: /compressed is appended for "
              "image_transport compressed)"),
    ParamSpec("image_transport", "raw", "raw = sensor_msgs/Image, compressed = sensor_msgs/CompressedImage "
              "on <image_topic>/compressed", choices=IMAGE_TRANSPORTS),
    ParamSpec("camera_qos", "sensor_data", "camera subscription QoS: sensor_data (best effort, matches every "
              "camera) or reliable (matches only reliable cameras)", choices=CAMERA_QOS),
    ParamSpec("camera_qos_depth", 5, "camera subscription queue depth", low=1, high=100),
    ParamSpec("instruction_topic", "~/instruction", "std_msgs/String topic with the task instruction; "
              "empty = only the instruction parameter"),
    ParamSpec("instruction_qos", "latched", "latched = reliable + transient-local (gets the last instruction "
              "published before the node started; needs a transient-local publisher), volatile = reliable "
              "volatile (matches every publisher)", choices=INSTRUCTION_QOS),
    ParamSpec("instruction", "", "fixed task instruction; setting it starts a new episode (empty = use "
              "instruction_topic)", LIVE),
    ParamSpec("frame_rate", 5.0, "frames admitted per second of camera time (0 = every frame); from the "
              "next episode", LIVE, low=0.0, high=1000.0),
    ParamSpec("max_frames_per_episode", 128, "frames kept per episode; longer episodes are thinned evenly; "
              "from the next episode", LIVE, low=16, high=100000),
    ParamSpec("scoring_rate", 0.0, "scoring steps per second at most (0 = as fast as the engine allows)",
              LIVE, low=0.0, high=1000.0),
    ParamSpec("reward_mode", "progress", "StepReward.reward: progress, progress_delta (change since the "
              "previous step) or success (success probability)", LIVE, choices=tuple(REWARD_MODES)),
    *(
        ParamSpec(f"monitor.{name}", getattr(MonitorConfig(), name), text, LIVE, low=low, high=high)
        for name, (text, low, high) in _MONITOR_DESCRIPTIONS.items()
    ),
    ParamSpec("trigger_service", "", "std_srvs/Trigger service called when a failure is raised (e.g. the "
              "arm's stop); empty = off"),
    ParamSpec("trigger_severity", "warn", "lowest failure severity that calls trigger_service: warn (every "
              "failure) or error (timeouts and model errors only)", LIVE, choices=tuple(TRIGGER_SEVERITIES)),
    ParamSpec("record", False, "write every episode as a rosbag2 bag (frames, instruction, rewards, flags, "
              "label)"),
    ParamSpec("record_dir", "~/robometer_episodes", "directory the episode bags are written to"),
    ParamSpec("record_storage", "mcap", "bag storage format", choices=RECORD_STORAGES),
    ParamSpec("diagnostics_period", 1.0, "seconds between /diagnostics messages", AT_STARTUP,
              low=0.05, high=60.0),
    ParamSpec("no_frame_warning_s", 2.0, "seconds without a camera frame before diagnostics warn", LIVE,
              low=0.1, high=3600.0),
)
_SPECS = {spec.name: spec for spec in PARAMETERS}


class ConfigurationError(Exception):
    """A parameter value or bundle that makes configure fail; the message names the problem."""


# ---------------------------------------------------------------------------------------------- episodes
@dataclass
class Episode:
    """One episode: its frames, its monitor and what has been published about it (guarded by the lock)."""

    episode_id: str
    instruction: str
    store: FrameStore
    monitor: EpisodeMonitor
    state: int = EpisodeStatus.STATE_WAITING
    outcome: int = EpisodeStatus.OUTCOME_UNKNOWN
    steps: int = 0
    start_stamp_ns: int | None = None
    # camera header.frame_id of each kept frame, by the node's frame id
    camera_frame_ids: dict[Hashable, str] = field(default_factory=dict)
    last_scored: Hashable | None = None
    last_scored_stamp_ns: int = 0
    last_scored_frame_id: str = ""
    previous_progress: float | None = None
    progress: float = 0.0
    success_probability: float = 0.0


def new_episode_id() -> str:
    """A sortable, unique episode id: UTC start time plus a short random suffix."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def to_time_msg(stamp_ns: int) -> TimeMsg:
    """Nanoseconds -> builtin_interfaces/Time."""
    return TimeMsg(sec=int(stamp_ns // NS_PER_S), nanosec=int(stamp_ns % NS_PER_S))


def stamp_to_ns(stamp: TimeMsg) -> int:
    """builtin_interfaces/Time -> nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


# A frame stamped this much before the newest admitted one means camera time was reset.
_TIME_RESET_NS = 1_000_000_000

_ADMISSION_DROP_REASON = {
    AdmissionStatus.DROPPED_RATE: "rate",
    AdmissionStatus.DROPPED_DUPLICATE: "duplicate_stamp",
    AdmissionStatus.DROPPED_OUT_OF_ORDER: "out_of_order",
}


@dataclass
class _ScoreJob:
    """A snapshot the worker scores outside the lock."""

    episode: Episode
    instruction: str
    selection: list[tuple[int, Hashable]]
    to_encode: dict[Hashable, np.ndarray]


# ---------------------------------------------------------------------------------------------- the node
class RewardNode(LifecycleNode):
    """The Robometer reward node (see the module docstring for states, threads and time)."""

    def __init__(self, node_name: str = NODE_NAME, engine_factory: EngineFactory = open_reward_engine,
                 **kwargs: Any) -> None:
        """Declare the parameters and start /diagnostics; everything else happens in the transitions.

        Args:
            node_name: default node name (``--ros-args -r __node:=`` overrides it).
            engine_factory: (bundle path, backend) -> engine; the production one opens a bundle.
            kwargs: passed to rclpy's lifecycle Node (e.g. ``parameter_overrides``).
        """
        super().__init__(node_name, **kwargs)
        self._engine_factory = engine_factory
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())
        self.add_on_set_parameters_callback(self._validate_parameter_change)
        self.add_post_set_parameters_callback(self._apply_parameter_change)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._state = "unconfigured"
        self._configure_error = ""
        self._engine: Any = None
        self._engine_info: dict[str, str] = {}
        self._num_frames = 8
        self._recorder: Any = None
        self._trigger_client: Any = None
        self._pub_reward: Any = None
        self._pub_flag: Any = None
        self._pub_episode: Any = None
        self._subscriptions_active: list[Any] = []
        self._services_active: list[Any] = []
        self._worker: threading.Thread | None = None
        self._stop_worker = False

        self._episode: Episode | None = None
        self._images: dict[Hashable, np.ndarray] = {}  # admitted, not yet encoded
        self._encoded: set[Hashable] = set()  # in the engine's feature cache (worker-owned)
        self._encode_failed: set[Hashable] = set()  # add_frame raised; retried only when a step needs it
        self._next_frame_id = 0
        self._next_step_due = 0.0
        self._flag_failed = False  # what the latched failure_flag says now
        self._flag_reason = FailureFlag.REASON_NONE

        # Counters and figures for /diagnostics.
        self._received = 0
        self._admitted = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._bad_images: collections.Counter[str] = collections.Counter()
        self._last_bad_image = ""
        self._instructions_rejected = 0
        self._last_frame_monotonic: float | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=200)
        self._inference_ms: collections.deque[float] = collections.deque(maxlen=200)
        self._stamp_age_ms: collections.deque[float] = collections.deque(maxlen=200)
        self._model_errors = 0
        self._last_model_error = ""
        self._last_model_error_monotonic: float | None = None
        self._trigger_calls: collections.Counter[str] = collections.Counter()
        self._recorder_error = ""
        self._bad_images_seen = 0
        self._stamp_drops_seen = 0
        self._admitted_seen = 0
        self._bad_image_logged: dict[str, float] = {}

        self._pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diagnostics_timer = self.create_timer(
            float(self.get_parameter("diagnostics_period").value), self._publish_diagnostics
        )

    # ------------------------------------------------------------------------------------ parameters
    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _monitor_config(self, overrides: dict[str, Any] | None = None) -> MonitorConfig:
        values = {f.name: self._param(f"monitor.{f.name}") for f in fields(MonitorConfig)}
        values.update(overrides or {})
        return MonitorConfig(**values)

    def _validate_parameter_change(self, params: list[Parameter]) -> SetParametersResult:
        """Reject a change that is invalid, or that needs a restart / an unconfigured node, saying why."""
        monitor_overrides: dict[str, Any] = {}
        for param in params:
            spec = _SPECS.get(param.name)
            if spec is None:
                continue
            if spec.when == AT_CONFIGURE and self._state != "unconfigured":
                return SetParametersResult(
                    successful=False,
                    reason=f"{param.name} is applied at configure; the node is {self._state}: deactivate "
                    f"and clean it up, set {param.name}, then configure again",
                )
            if spec.choices and param.value not in spec.choices:
                return SetParametersResult(
                    successful=False,
                    reason=f"{param.name} must be one of {', '.join(spec.choices)}, got {param.value!r}",
                )
            if param.name.startswith("monitor."):
                monitor_overrides[param.name.split(".", 1)[1]] = param.value
        if monitor_overrides:
            try:
                self._monitor_config(monitor_overrides)
            except (ValueError, TypeError) as err:
                return SetParametersResult(successful=False, reason=str(err))
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, params: list[Parameter]) -> None:
        """Apply live changes: monitor thresholds to the running episode, a new instruction parameter."""
        names = {p.name for p in params}
        if any(n.startswith("monitor.") for n in names):
            config = self._monitor_config()
            with self._lock:
                if self._episode is not None:
                    self._episode.monitor.config = config
            self.get_logger().info(f"monitor thresholds now {config}")
        if "instruction" in names:
            text = str(self._param("instruction"))
            if text and self._state == "active":
                self._set_instruction(text, source="parameter")

    def _check_configuration(self) -> None:
        """Validate the parameters read at configure; raise ConfigurationError naming the first bad one."""
        for spec in PARAMETERS:
            value = self._param(spec.name)
            if spec.choices and value not in spec.choices:
                raise ConfigurationError(
                    f"parameter {spec.name} must be one of {', '.join(spec.choices)}, got {value!r}"
                )
        if not str(self._param("bundle")).strip():
            raise ConfigurationError("parameter bundle is empty: set it to the exported bundle directory")
        if not str(self._param("image_topic")).strip():
            raise ConfigurationError("parameter image_topic is empty: set it to the camera topic")
        try:
            self._monitor_config()
        except (ValueError, TypeError) as err:
            raise ConfigurationError(f"monitor parameters: {err}") from err

    # ------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Validate parameters, load the engine, create publishers; FAILURE (staying unconfigured) if not."""
        try:
            self._check_configuration()
            self._load_engine()
            self._open_recorder()
        except Exception as err:  # whatever it is, the node stays up, unconfigured, and says why
            reason = str(err) if isinstance(err, ConfigurationError) else f"{type(err).__name__}: {err}"
            self._configure_error = reason
            self.get_logger().error(f"configure failed: {reason}")
            self._release_engine()
            self._publish_diagnostics()
            return TransitionCallbackReturn.FAILURE
        self._configure_error = ""

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self._pub_reward = self.create_lifecycle_publisher(StepReward, "~/step_reward", reliable)
        self._pub_flag = self.create_lifecycle_publisher(FailureFlag, "~/failure_flag", latched)
        self._pub_episode = self.create_lifecycle_publisher(EpisodeStatus, "~/episode", latched)
        trigger = str(self._param("trigger_service")).strip()
        self._trigger_client = self.create_client(Trigger, trigger) if trigger else None
        self._state = "inactive"
        self.get_logger().info(
            f"configured: model {self._engine_info['model_id']} on {self._engine_info['backend']} "
            f"({self._num_frames} frames), bundle {self._param('bundle')}"
        )
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Subscribe to camera and instruction, offer the services, start the worker."""
        result = super().on_activate(state)  # enables the lifecycle publishers
        self._state = "active"
        self._create_inputs()
        self._services_active = [
            self.create_service(Trigger, "~/reset_episode", self._on_reset_episode),
            self.create_service(EndEpisode, "~/end_episode", self._on_end_episode),
        ]
        self._start_worker()
        fixed = str(self._param("instruction"))
        with self._lock:
            need_episode = self._episode is None
        if fixed and need_episode:
            self._set_instruction(fixed, source="parameter")
        self.get_logger().info(f"active: scoring {self._image_topic_name()} ({self._param('image_transport')}, "
                               f"{self._param('camera_qos')} QoS)")
        return result

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Pause: stop the worker, drop subscriptions and services; keep engine and episode."""
        self._stop_worker_thread()
        for entity in self._subscriptions_active:
            self.destroy_subscription(entity)
        for entity in self._services_active:
            self.destroy_service(entity)
        self._subscriptions_active, self._services_active = [], []
        self._state = "inactive"
        self.get_logger().info("inactive: paused (engine kept)")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Release the engine (GPU memory), close the recording, destroy publishers."""
        self._teardown()
        self._state = "unconfigured"
        self.get_logger().info("cleaned up: engine released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Release everything from whatever state the node is in."""
        self._stop_worker_thread()
        self._teardown()
        self._state = "finalized"
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """Recover to unconfigured after an exception in a transition."""
        self.get_logger().error(f"error during a transition from {state.label}; releasing the engine")
        self._stop_worker_thread()
        self._teardown()
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def autostart(self) -> None:
        """Configure and activate if the ``autostart`` parameter says so (failures are logged, not raised)."""
        if not self._param("autostart"):
            self.get_logger().info("autostart is false: waiting for a lifecycle manager (configure, activate)")
            return
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error(
                "autostart: configure failed; the node stays unconfigured (fix the parameters and run "
                f"`ros2 lifecycle set {self.get_fully_qualified_name()} configure`)"
            )
            return
        if not self.context.ok():  # Ctrl-C while the engine was loading: do not activate on the way out
            return
        self.trigger_activate()

    def release(self) -> None:
        """Stop the worker and free the engine and recorder (for process exit, from any state)."""
        self._stop_worker_thread()
        self._teardown()

    def _load_engine(self) -> None:
        bundle = str(self._param("bundle"))
        backend = str(self._param("backend"))
        self.get_logger().info(f"opening bundle {bundle} (backend {backend})")
        try:
            engine = self._engine_factory(bundle, backend, verify_checksums=bool(self._param("verify_checksums")))
        except Exception as err:  # a bundle or backend problem must not kill the node
            raise ConfigurationError(f"cannot load bundle {bundle!r}: {type(err).__name__}: {err}") from err
        num_frames = int(self._param("num_frames"))
        if int(engine.num_frames) != num_frames:
            _close(engine)
            raise ConfigurationError(
                f"bundle {bundle!r} scores {engine.num_frames} frames per step but parameter num_frames is "
                f"{num_frames}: set num_frames to {engine.num_frames} or use a bundle exported for {num_frames}"
            )
        self._engine = engine
        self._num_frames = num_frames
        self._engine_info = {"model_id": str(engine.model_id), "backend": str(engine.backend_name)}

    def _open_recorder(self) -> None:
        if not self._param("record"):
            return
        try:
            from robometer_ros.recorder import EpisodeRecorder, RecordTopics
        except ImportError as err:
            raise ConfigurationError(f"record is true but the recorder is unavailable: {err}") from err
        instruction_topic = str(self._param("instruction_topic")).strip() or "~/instruction"
        topics = RecordTopics(
            image=self.resolve_topic_name(self._image_topic_name()),
            instruction=self.resolve_topic_name(instruction_topic),
            step_reward=self.resolve_topic_name("~/step_reward"),
            failure_flag=self.resolve_topic_name("~/failure_flag"),
            episode_status=self.resolve_topic_name("~/episode"),
        )
        try:
            # Never touches the disk here: an unwritable directory shows up in status() (diagnostics).
            self._recorder = EpisodeRecorder(
                str(self._param("record_dir")), storage=str(self._param("record_storage")), topics=topics
            )
        except Exception as err:
            raise ConfigurationError(f"cannot record to {self._param('record_dir')!r}: {err}") from err
        self.get_logger().info(f"recording episodes to {self._recorder.directory} ({self._recorder.storage})")

    def _teardown(self) -> None:
        with self._lock:
            episode, self._episode = self._episode, None
            self._images.clear()
        if episode is not None:
            verdict = _verdict(episode)
            self._record(lambda rec: rec.end_episode(outcome=episode.outcome, note="node cleanup", verdict=verdict))
        if self._recorder is not None:
            try:
                self._recorder.close()
            except Exception as err:
                self.get_logger().error(f"closing the recorder failed: {err}")
            self._recorder = None
        for pub in (self._pub_reward, self._pub_flag, self._pub_episode):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._pub_reward = self._pub_flag = self._pub_episode = None
        if self._trigger_client is not None:
            self.destroy_client(self._trigger_client)
            self._trigger_client = None
        self._flag_failed = False
        self._release_engine()

    def _release_engine(self) -> None:
        engine, self._engine = self._engine, None
        self._encoded.clear()
        if engine is not None:
            _close(engine)
            del engine
            gc.collect()  # drop the last references to GPU buffers now, not at some later collection

    # ------------------------------------------------------------------------------------ inputs
    def _image_topic_name(self) -> str:
        topic = str(self._param("image_topic"))
        return f"{topic.rstrip('/')}/compressed" if self._param("image_transport") == "compressed" else topic

    def _create_inputs(self) -> None:
        depth = int(self._param("camera_qos_depth"))
        if self._param("camera_qos") == "reliable":
            camera_qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
        else:
            camera_qos = QoSProfile(
                depth=depth,
                reliability=ReliabilityPolicy.BEST_EFFORT,
                history=HistoryPolicy.KEEP_LAST,
                durability=DurabilityPolicy.VOLATILE,
            )
        compressed = self._param("image_transport") == "compressed"
        topic = self._image_topic_name()
        camera_events = SubscriptionEventCallbacks(
            incompatible_qos=lambda info: self.get_logger().warning(
                f"a publisher on {topic} has an incompatible QoS (policy {info.last_policy_kind}): "
                "a reliable subscriber does not match a best-effort camera; use camera_qos sensor_data",
                throttle_duration_sec=10.0,
            )
        )
        self._subscriptions_active = [
            self.create_subscription(
                CompressedImage if compressed else Image,
                topic,
                self._on_compressed_image if compressed else self._on_image,
                camera_qos,
                event_callbacks=camera_events,
            )
        ]
        instruction_topic = str(self._param("instruction_topic")).strip()
        if instruction_topic:
            latched = self._param("instruction_qos") == "latched"
            qos = QoSProfile(
                depth=1 if latched else 10,
                reliability=ReliabilityPolicy.RELIABLE,
                durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
            )
            events = SubscriptionEventCallbacks(
                incompatible_qos=lambda info: self.get_logger().warning(
                    f"a publisher on {instruction_topic} has an incompatible QoS (policy "
                    f"{info.last_policy_kind}): instruction_qos latched needs a reliable transient-local "
                    "publisher; publish latched or set instruction_qos volatile",
                    throttle_duration_sec=10.0,
                )
            )
            self._subscriptions_active.append(
                self.create_subscription(String, instruction_topic, self._on_instruction, qos,
                                         event_callbacks=events)
            )

    def _on_image(self, msg: Image) -> None:
        self._admit(msg, image_msg_to_rgb)

    def _on_compressed_image(self, msg: CompressedImage) -> None:
        self._admit(msg, compressed_msg_to_rgb)

    def _admit(self, msg: Any, convert: Callable[[Any], np.ndarray]) -> None:
        """Convert and admit one camera frame (executor thread; the model work is left to the worker)."""
        self._last_frame_monotonic = time.monotonic()
        stamp_ns = stamp_to_ns(msg.header.stamp)
        restarted = None
        with self._lock:
            episode = self._episode
            newest = episode.store.newest_stamp_ns if episode is not None else None
            if newest is not None and newest - stamp_ns > _TIME_RESET_NS:
                # Camera time went back by more than any transport reorders frames: a simulator reset or a
                # looping bag. The old episode's frames cannot be compared with these, so start anew.
                restarted = self._start_episode_locked(episode.instruction)
                episode = self._episode
            elif episode is not None and episode.store.would_admit(stamp_ns) is not AdmissionStatus.ADMITTED:
                # Count the drop without decoding an image that nobody would look at.
                self._received += 1
                self._dropped[_ADMISSION_DROP_REASON[episode.store.add(stamp_ns, None).status]] += 1
                return
        if restarted is not None:
            self._log_episode_change(*restarted, "camera time jumped back")
        try:
            rgb = convert(msg)
        except ImageConversionError as err:
            with self._lock:
                self._received += 1
                self._bad_images[err.reason] += 1
                self._dropped["bad_image"] += 1
                self._last_bad_image = str(err)
            # Throttled per reason, so one kind of bad frame at 30 Hz cannot hide another.
            now = time.monotonic()
            if now - self._bad_image_logged.get(err.reason, -1e9) >= 5.0:
                self._bad_image_logged[err.reason] = now
                self.get_logger().warning(f"bad image on {self._image_topic_name()}: {err} "
                                          f"({self._bad_images[err.reason]} so far)")
            return
        with self._lock:
            self._received += 1
            episode = self._episode
            if episode is None:
                self._dropped["no_instruction"] += 1
                return
            frame_id = self._next_frame_id
            self._next_frame_id += 1
            admission = episode.store.add(stamp_ns, frame_id)
            for gone in admission.evicted:
                self._images.pop(gone, None)
                episode.camera_frame_ids.pop(gone, None)
            if not admission.admitted:
                self._dropped[_ADMISSION_DROP_REASON[admission.status]] += 1
                return
            self._admitted += 1
            self._images[frame_id] = rgb
            episode.camera_frame_ids[frame_id] = msg.header.frame_id
            if episode.start_stamp_ns is None:
                episode.start_stamp_ns = stamp_ns
            self._wake.notify_all()
        self._record(lambda rec: rec.record_image(msg))

    def _on_instruction(self, msg: String) -> None:
        self._set_instruction(msg.data, source=f"topic {self._param('instruction_topic')}")

    def _set_instruction(self, text: str, source: str) -> None:
        """A new instruction (different text) ends the current episode and starts a new one."""
        if not text.strip():
            with self._lock:
                self._instructions_rejected += 1
            self.get_logger().warning(f"empty instruction from {source} rejected (the episode is unchanged)")
            return
        with self._lock:
            if self._episode is not None and self._episode.instruction == text:
                return
            old, new = self._start_episode_locked(text)
        self._log_episode_change(old, new, f"new instruction from {source}")

    # ------------------------------------------------------------------------------------ episodes
    def _start_episode_locked(
        self, instruction: str, outcome: int = EpisodeStatus.OUTCOME_UNKNOWN, note: str = "",
        report_end_verdict: bool = False,
    ) -> tuple[Episode | None, Episode]:
        """End the current episode (if any) and start a new one; publishes both statuses. Lock held."""
        old = self._episode
        if old is not None:
            self._end_episode_locked(old, outcome, note, report_end_verdict)
        episode = Episode(
            episode_id=new_episode_id(),
            instruction=instruction,
            store=FrameStore(float(self._param("frame_rate")), int(self._param("max_frames_per_episode"))),
            monitor=EpisodeMonitor(self._monitor_config()),
        )
        self._episode = episode
        self._images.clear()  # unencoded frames of the old episode; the worker forgets its encoded ones
        self._record(lambda rec: rec.start_episode(episode.episode_id, instruction))
        self._publish_status(episode)
        if self._flag_failed:
            # The latched flag still says the old episode failed; a late subscriber must not read that as
            # a verdict on this one.
            self._publish_flag(episode, failed=False, reason=FailureFlag.REASON_NONE,
                               severity=FailureFlag.SEVERITY_INFO, confidence=1.0,
                               detail="new episode", header=Header())
        self._wake.notify_all()
        return old, episode

    def _end_episode_locked(self, episode: Episode, outcome: int, note: str, report_verdict: bool) -> None:
        newest = episode.store.newest_stamp_ns or 0
        verdict = _verdict(episode)
        events = episode.monitor.end(max(newest / NS_PER_S, episode.last_scored_stamp_ns / NS_PER_S),
                                     Outcome(outcome))
        if report_verdict:
            # Only ~/end_episode reports LOW_SUCCESS_AT_END: the robot stack closed the episode with its own
            # verdict and wants ours on record. A reset or a new instruction is not a failure signal.
            header = Header(stamp=to_time_msg(newest), frame_id=episode.last_scored_frame_id)
            for event in events:
                self._publish_event(episode, event, header, call_trigger=False)
        episode.state = EpisodeStatus.STATE_ENDED
        episode.outcome = outcome
        final = self._publish_status(episode, record=False)
        self._record(lambda rec: rec.end_episode(outcome=outcome, note=note, verdict=verdict, status_msg=final))

    def _log_episode_change(self, old: Episode | None, new: Episode, why: str) -> None:
        ended = f"ended episode {old.episode_id} ({old.steps} steps); " if old is not None else ""
        self.get_logger().info(f"{why}: {ended}started episode {new.episode_id}: {new.instruction!r}")

    def _on_reset_episode(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            if self._episode is None:
                response.success = False
                response.message = "no episode to reset: no instruction received yet"
                return response
            old, new = self._start_episode_locked(self._episode.instruction, note="reset")
        self._log_episode_change(old, new, "reset_episode")
        response.success = True
        response.message = f"ended {old.episode_id if old else ''}, started {new.episode_id}"
        return response

    def _on_end_episode(self, request: EndEpisode.Request, response: EndEpisode.Response) -> EndEpisode.Response:
        if request.outcome not in (o.value for o in Outcome):
            response.success = False
            response.message = f"outcome must be 0 (unknown), 1 (success) or 2 (failure), got {request.outcome}"
            return response
        with self._lock:
            if self._episode is None:
                response.success = False
                response.message = "no episode to end: no instruction received yet"
                return response
            old, new = self._start_episode_locked(
                self._episode.instruction, outcome=request.outcome, note=request.note, report_end_verdict=True
            )
        self._log_episode_change(old, new, f"end_episode (outcome {Outcome(request.outcome).name})")
        response.success = True
        response.ended_episode_id = old.episode_id if old else ""
        response.new_episode_id = new.episode_id
        response.message = f"ended {response.ended_episode_id} as {Outcome(request.outcome).name.lower()}"
        return response

    # ------------------------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        self._stop_worker = False
        self._next_step_due = 0.0
        self._worker = threading.Thread(target=self._work, name="robometer_scoring", daemon=True)
        self._worker.start()

    def _stop_worker_thread(self) -> None:
        with self._lock:
            self._stop_worker = True
            self._wake.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("the scoring worker did not stop within 30 s (engine call hung?)")
        self._worker = None

    def _work(self) -> None:
        """Worker loop: score the newest state when due; encode admitted frames while waiting."""
        while True:
            with self._wake:
                job: Any = None
                while job is None:
                    if self._stop_worker:
                        return
                    job, wait_s = self._next_job_locked()
                    if job is None:
                        self._wake.wait(wait_s)
            try:
                if isinstance(job, _ScoreJob):
                    self._run_score_job(job)
                else:
                    self._run_encode_job(*job)
            except Exception as err:  # the worker must survive anything the engine does
                self.get_logger().error(f"scoring worker: {type(err).__name__}: {err}")

    def _next_job_locked(self) -> tuple[Any, float | None]:
        """The next piece of work: forget stale features, a score job, an encode job, or a wait time."""
        episode = self._episode
        engine = self._engine
        if engine is None:
            return None, 1.0
        live = {f.frame_id for f in episode.store.frames()} if episode is not None else set()
        stale = self._encoded - live
        if stale:
            # Thinned-out frames and frames of ended episodes: free their cached features.
            engine.forget(list(stale))
            self._encoded -= stale
        if episode is None or not live:
            return None, None
        newest = episode.store.newest
        wait_s: float | None = None
        if newest is not None and newest.frame_id != episode.last_scored:
            now = time.monotonic()
            if now >= self._next_step_due:
                selection = episode.store.select(self._num_frames)
                to_encode = {
                    fid: self._images[fid] for _, fid in selection if fid not in self._encoded and fid in self._images
                }
                return _ScoreJob(episode, episode.instruction, selection, to_encode), None
            wait_s = self._next_step_due - now
        # Nothing to score yet: encode an admitted frame ahead of time (newest first: most likely needed next).
        self._encode_failed &= live
        pending = [fid for fid in self._images
                   if fid in live and fid not in self._encoded and fid not in self._encode_failed]
        if pending:
            fid = max(pending)
            return (fid, self._images[fid]), None
        return None, wait_s

    def _run_encode_job(self, frame_id: Hashable, image: np.ndarray) -> None:
        try:
            self._engine.add_frame(frame_id, image)
        except Exception as err:
            # Keep the image: the score job that needs this frame retries it (a persistent failure becomes a
            # model error there, once per step); it is no longer encoded ahead of time, so no hot loop.
            with self._lock:
                self._encode_failed.add(frame_id)
            self._note_model_error(f"add_frame: {type(err).__name__}: {err}")
            return
        with self._lock:
            self._encoded.add(frame_id)
            self._images.pop(frame_id, None)
            self._encode_failed.discard(frame_id)

    def _run_score_job(self, job: _ScoreJob) -> None:
        episode = job.episode
        newest_stamp_ns, newest_id = job.selection[-1]
        scoring_rate = float(self._param("scoring_rate"))
        started = time.monotonic()
        self._next_step_due = started + (1.0 / scoring_rate if scoring_rate > 0 else 0.0)
        frame_ids = [fid for _, fid in job.selection]
        try:
            for fid, image in job.to_encode.items():
                self._engine.add_frame(fid, image)
                with self._lock:
                    self._encoded.add(fid)
                    self._images.pop(fid, None)
                    self._encode_failed.discard(fid)
            missing = [fid for fid in frame_ids if fid not in self._encoded]
            if missing:
                raise RuntimeError(f"frames {missing} have no features (their images were dropped before encoding)")
            scores = self._engine.score(job.instruction, frame_ids)
            progress = np.asarray(scores.progress, dtype=np.float64)
            success = np.asarray(scores.success_probability, dtype=np.float64)
            if progress.shape != (len(frame_ids),) or success.shape != (len(frame_ids),):
                raise RuntimeError(
                    f"engine returned {progress.shape} progress / {success.shape} success values for "
                    f"{len(frame_ids)} frames"
                )
        except Exception as err:
            detail = f"{type(err).__name__}: {err}"
            self._note_model_error(detail)
            with self._lock:
                if self._episode is not episode:
                    return
                episode.last_scored = newest_id  # do not retry the same state: wait for a new frame
                header = Header(stamp=to_time_msg(newest_stamp_ns),
                                frame_id=episode.camera_frame_ids.get(newest_id, episode.last_scored_frame_id))
                for event in episode.monitor.model_error(newest_stamp_ns / NS_PER_S, detail):
                    self._publish_event(episode, event, header, call_trigger=True)
            return
        # The whole step: encoding the frames it needed that were not cached yet, plus the scoring call.
        inference_time = time.monotonic() - started
        with self._lock:
            if self._episode is not episode:
                return  # the episode ended while we scored: its result is stale
            camera_frame_id = episode.camera_frame_ids.get(newest_id, episode.last_scored_frame_id)
            header = Header(stamp=to_time_msg(newest_stamp_ns), frame_id=camera_frame_id)
            episode.last_scored = newest_id
            episode.last_scored_stamp_ns = newest_stamp_ns
            episode.last_scored_frame_id = camera_frame_id
            reward_msg = self._step_reward_locked(episode, header, job, progress, success, inference_time)
            self._pub_reward.publish(reward_msg)
            first_step = episode.state == EpisodeStatus.STATE_WAITING
            if first_step:
                episode.state = EpisodeStatus.STATE_RUNNING
            events = episode.monitor.update(newest_stamp_ns / NS_PER_S, reward_msg.progress,
                                            reward_msg.success_probability)
            for event in events:
                self._publish_event(episode, event, header, call_trigger=True)
            if first_step and not events:
                self._publish_status(episode, header)
            self._step_times.append(time.monotonic())
            self._inference_ms.append(inference_time * 1e3)
            age_ns = self.get_clock().now().nanoseconds - newest_stamp_ns
            self._stamp_age_ms.append(age_ns / 1e6)
        self._record(lambda rec: rec.record_step_reward(reward_msg))

    def _step_reward_locked(
        self, episode: Episode, header: Header, job: _ScoreJob, progress: np.ndarray, success: np.ndarray,
        inference_time: float,
    ) -> StepReward:
        msg = StepReward()
        msg.header = header
        msg.episode_id = episode.episode_id
        msg.step = episode.steps
        msg.instruction = job.instruction
        msg.progress = float(np.clip(progress[-1], 0.0, 1.0)) if math.isfinite(progress[-1]) else float("nan")
        msg.success_probability = (
            float(np.clip(success[-1], 0.0, 1.0)) if math.isfinite(success[-1]) else float("nan")
        )
        mode = str(self._param("reward_mode"))
        msg.reward_mode = REWARD_MODES[mode]
        if mode == "progress":
            msg.reward = msg.progress
        elif mode == "success":
            msg.reward = msg.success_probability
        else:
            previous = episode.previous_progress
            msg.reward = 0.0 if previous is None else msg.progress - previous
        msg.frame_stamps = [to_time_msg(stamp) for stamp, _ in job.selection]
        msg.frame_progress = [float(v) for v in progress]
        msg.frame_success_probability = [float(v) for v in success]
        msg.frames_in_episode = episode.store.counters.admitted
        msg.model_id = self._engine_info.get("model_id", "")
        msg.backend = self._engine_info.get("backend", "")
        msg.inference_time = inference_time
        episode.steps += 1
        episode.previous_progress = msg.progress
        episode.progress, episode.success_probability = msg.progress, msg.success_probability
        return msg

    def _note_model_error(self, detail: str) -> None:
        with self._lock:
            self._model_errors += 1
            self._last_model_error = detail
            self._last_model_error_monotonic = time.monotonic()
        self.get_logger().error(f"model error: {detail}", throttle_duration_sec=5.0)

    # ------------------------------------------------------------------------------------ outputs
    def _publish_event(self, episode: Episode, event: Event, header: Header, call_trigger: bool) -> None:
        """Turn a monitor event into FailureFlag / EpisodeStatus messages (and the trigger). Lock held."""
        if event.kind is EventKind.SUCCEEDED:
            episode.state = EpisodeStatus.STATE_SUCCEEDED
            self.get_logger().info(f"episode {episode.episode_id} succeeded: {event.detail}")
        elif event.kind is EventKind.FAILURE_RAISED:
            episode.state = EpisodeStatus.STATE_FAILED
            self._publish_flag(episode, failed=True, reason=int(event.reason), severity=int(event.severity),
                               confidence=event.confidence, detail=event.detail, header=header,
                               progress=event.progress, max_progress=event.max_progress)
            self.get_logger().warning(
                f"episode {episode.episode_id} failure {FailureReason(event.reason).name}: {event.detail}"
            )
            threshold = TRIGGER_SEVERITIES[str(self._param("trigger_severity"))]
            if call_trigger and int(event.severity) >= threshold:
                self._call_trigger(episode, event)
        elif event.kind is EventKind.FAILURE_CLEARED:
            episode.state = (
                EpisodeStatus.STATE_SUCCEEDED if episode.monitor.succeeded else EpisodeStatus.STATE_RUNNING
            )
            self._publish_flag(episode, failed=False, reason=FailureFlag.REASON_NONE,
                               severity=FailureFlag.SEVERITY_INFO, confidence=event.confidence,
                               detail=event.detail, header=header, progress=event.progress,
                               max_progress=event.max_progress)
            self.get_logger().info(f"episode {episode.episode_id}: {event.detail}")
        if episode.state != EpisodeStatus.STATE_ENDED:
            self._publish_status(episode, header)

    def _publish_flag(self, episode: Episode, *, failed: bool, reason: int, severity: int, confidence: float,
                      detail: str, header: Header, progress: float | None = None,
                      max_progress: float | None = None) -> None:
        msg = FailureFlag()
        msg.header = header
        msg.episode_id = episode.episode_id
        msg.failed = failed
        msg.reason = reason
        msg.confidence = float(confidence)
        msg.severity = severity
        progress = episode.progress if progress is None or not math.isfinite(progress) else progress
        msg.progress = float(progress)
        msg.max_progress = float(episode.monitor.max_progress if max_progress is None else max_progress)
        msg.detail = detail
        self._flag_failed, self._flag_reason = failed, reason
        if self._pub_flag is not None:
            self._pub_flag.publish(msg)
        self._record(lambda rec: rec.record_failure_flag(msg))

    def _publish_status(self, episode: Episode, header: Header | None = None, record: bool = True) -> EpisodeStatus:
        msg = EpisodeStatus()
        if header is not None:
            msg.header = header
        elif episode.store.newest is not None:
            msg.header = Header(stamp=to_time_msg(episode.store.newest.stamp_ns),
                                frame_id=episode.last_scored_frame_id)
        msg.episode_id = episode.episode_id
        msg.instruction = episode.instruction
        if episode.start_stamp_ns is not None:
            msg.start_stamp = to_time_msg(episode.start_stamp_ns)
        msg.state = episode.state
        msg.outcome = episode.outcome
        msg.steps = episode.steps
        msg.frames = episode.store.counters.admitted
        msg.progress = float(episode.progress)
        msg.success_probability = float(episode.success_probability)
        if self._pub_episode is not None:
            self._pub_episode.publish(msg)
        if record:
            self._record(lambda rec: rec.record_episode_status(msg))
        return msg

    def _call_trigger(self, episode: Episode, event: Event) -> None:
        """Call trigger_service without waiting (the worker must not block); log the answer when it comes."""
        client = self._trigger_client
        if client is None:
            return
        name = client.srv_name
        if not client.service_is_ready():
            self._trigger_calls["unavailable"] += 1
            self.get_logger().error(f"failure not forwarded: trigger service {name} is not available")
            return
        self._trigger_calls["called"] += 1
        future = client.call_async(Trigger.Request())
        reason = FailureReason(event.reason).name

        def done(fut: Any) -> None:
            try:
                result = fut.result()
            except Exception as err:
                self._trigger_calls["failed"] += 1
                self.get_logger().error(f"trigger {name} for {reason} failed: {err}")
                return
            if result is None:
                self._trigger_calls["failed"] += 1
                self.get_logger().error(f"trigger {name} for {reason}: no response")
                return
            self._trigger_calls["succeeded" if result.success else "refused"] += 1
            log = self.get_logger().info if result.success else self.get_logger().warning
            log(f"trigger {name} for {reason} in episode {episode.episode_id}: success={result.success} "
                f"message={result.message!r}")

        future.add_done_callback(done)

    # ------------------------------------------------------------------------------------ recording
    def _record(self, write: Callable[[Any], Any]) -> None:
        """Hand one item to the recorder (it writes in the background); a failure goes to diagnostics."""
        recorder = self._recorder
        if recorder is None:
            return
        try:
            write(recorder)
        except Exception as err:
            if not self._recorder_error:
                self.get_logger().error(f"recording failed: {err}")
            self._recorder_error = str(err)

    # ------------------------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus()
        status.name = f"robometer_ros: {self.get_fully_qualified_name()}"
        status.hardware_id = self._engine_info.get("model_id", "")
        level, message, values = self._diagnostic_summary()
        status.level, status.message = level, message
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [status]
        self._pub_diagnostics.publish(array)

    def _diagnostic_summary(self) -> tuple[bytes, str, dict[str, Any]]:
        """(level, message, key/values) of the node's health now."""
        now = time.monotonic()
        with self._lock:
            episode = self._episode
            values: dict[str, Any] = {
                "state": self._state,
                "bundle": self._param("bundle"),
                "backend": self._engine_info.get("backend", ""),
                "model_id": self._engine_info.get("model_id", ""),
                "image_topic": self._image_topic_name(),
                "episode_id": episode.episode_id if episode else "",
                "instruction": episode.instruction if episode else "",
                "episode_steps": episode.steps if episode else 0,
                "episode_frames_kept": len(episode.store) if episode else 0,
                "frames_received": self._received,
                "frames_admitted": self._admitted,
                "frames_dropped": sum(self._dropped.values()),
                **{f"frames_dropped.{k}": v for k, v in sorted(self._dropped.items())},
                "bad_images": sum(self._bad_images.values()),
                **{f"bad_images.{k}": v for k, v in sorted(self._bad_images.items())},
                "instructions_rejected": self._instructions_rejected,
                "frames_waiting_for_encoding": len(self._images),
                "model_errors": self._model_errors,
                **{f"trigger.{k}": v for k, v in sorted(self._trigger_calls.items())},
            }
            recent = [t for t in self._step_times if now - t <= 10.0]
            inference = list(self._inference_ms)
            ages = list(self._stamp_age_ms)
        window = min(10.0, max(now - recent[0], 1e-3)) if len(recent) > 1 else 10.0
        values["scoring_rate_hz"] = f"{(len(recent) - 1) / window:.2f}" if len(recent) > 1 else "0.00"
        if inference:
            values["inference_ms.median"] = f"{np.median(inference):.1f}"
            values["inference_ms.p95"] = f"{np.percentile(inference, 95):.1f}"
        if ages:
            values["stamp_age_ms.median"] = f"{np.median(ages):.1f}"
            values["stamp_age_ms.p95"] = f"{np.percentile(ages, 95):.1f}"
        since = None if self._last_frame_monotonic is None else now - self._last_frame_monotonic
        values["seconds_since_last_frame"] = "never" if since is None else f"{since:.2f}"
        if self._last_bad_image:
            values["last_bad_image"] = self._last_bad_image
        if self._last_model_error:
            values["last_model_error"] = self._last_model_error
        recorder_problem = self._recorder_error
        if self._recorder is not None:
            rec = self._recorder.status()
            values["recorder"] = rec.message
            values["recorder.bags_closed"] = rec.episodes_closed
            values["recorder.messages_written"] = rec.messages_written
            values["recorder.dropped"] = rec.dropped
            if rec.last_closed_bag:
                values["recorder.last_bag"] = rec.last_closed_bag
            if not rec.ok:
                recorder_problem = rec.last_error or rec.message
        elif recorder_problem:
            values["recorder"] = f"error: {recorder_problem}"

        if self._configure_error:
            return DiagnosticStatus.ERROR, f"configure failed: {self._configure_error}", values
        if self._state != "active":
            return DiagnosticStatus.OK, f"{self._state}", values
        problems_error: list[str] = []
        problems_warn: list[str] = []
        if self._last_model_error_monotonic is not None and now - self._last_model_error_monotonic < 10.0:
            problems_error.append(f"model error: {self._last_model_error}")
        if recorder_problem:
            problems_error.append(f"recording failed: {recorder_problem}")
        no_frames_after = float(self._param("no_frame_warning_s"))
        if since is None or since > no_frames_after:
            problems_warn.append(
                "no frames: check image_topic and camera_qos — a reliable subscriber does not match a "
                "best-effort camera"
            )
        if episode is None:
            problems_warn.append("no instruction: publish one on instruction_topic or set the instruction "
                                 "parameter")
        if self._last_bad_image and self._bad_images_recent():
            problems_warn.append(f"bad images: {self._last_bad_image}")
        if self._stamps_stuck(values):
            problems_warn.append(
                "frames not admitted: camera stamps repeat or go back (header.stamp); check the camera driver, "
                "or call reset_episode after a clock jump (bag loop, simulator reset)"
            )
        if problems_error:
            return DiagnosticStatus.ERROR, "; ".join(problems_error + problems_warn), values
        if problems_warn:
            return DiagnosticStatus.WARN, "; ".join(problems_warn), values
        return DiagnosticStatus.OK, f"scoring at {values['scoring_rate_hz']} Hz", values

    def _stamps_stuck(self, values: dict[str, Any]) -> bool:
        """True when frames arrived since the previous diagnostics but none was admitted, for stamp reasons."""
        stamp_drops = int(values.get("frames_dropped.duplicate_stamp", 0)) + int(
            values.get("frames_dropped.out_of_order", 0)
        )
        admitted = int(values["frames_admitted"])
        stuck = stamp_drops > self._stamp_drops_seen and admitted == self._admitted_seen
        self._stamp_drops_seen, self._admitted_seen = stamp_drops, admitted
        return stuck

    def _bad_images_recent(self) -> bool:
        """True when a bad image arrived since the previous diagnostics message."""
        total = sum(self._bad_images.values())
        recent = total != self._bad_images_seen
        self._bad_images_seen = total
        return recent


def _verdict(episode: Episode) -> str:
    """The monitor's verdict on an episode for its recording label (taken before ``end``)."""
    if episode.monitor.succeeded:
        return "succeeded"
    if episode.monitor.failed:
        return f"failed:{episode.monitor.failure.name}"
    return "not_succeeded" if episode.steps else "not_scored"


def _close(engine: Any) -> None:
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def main(args: list[str] | None = None, engine_factory: EngineFactory | None = None) -> None:
    """Run the node until Ctrl-C / SIGINT (``python -m robometer_ros.reward_node --ros-args ...``).

    Args:
        args: command line (None = sys.argv).
        engine_factory: (bundle path, backend) -> engine; None = ``open_reward_engine`` (a real bundle).
    """
    rclpy.init(args=args)
    node: RewardNode | None = None
    executor = SingleThreadedExecutor()
    try:
        node = RewardNode(engine_factory=engine_factory or open_reward_engine)
        executor.add_node(node)
        node.autostart()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ParameterException as err:
        # A parameter outside its declared range or of the wrong type: rclpy refuses it at declaration.
        rclpy.logging.get_logger(NODE_NAME).fatal(f"bad parameter: {err}")
        raise SystemExit(2) from err
    finally:
        if node is not None:
            node.release()
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
