"""The reward node's parameters: one table with each default, range, description and when it takes effect.

The session's settings (admission, scheduling, reward, monitor thresholds) take their defaults from
``SessionConfig`` and ``MonitorConfig``, so the node, config/reward_node.yaml and the offline tools share one
set of defaults; ``load_parameters`` reads a ROS 2 parameters YAML (the node's, or robometer-calibrate's) into
the same flat names for tools that do not run a node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robometer_ros.monitor import MonitorConfig
from robometer_ros.session import REWARD_MODES, SessionConfig

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
IMAGE_TRANSPORTS = ("raw", "compressed")
CAMERA_QOS = ("sensor_data", "reliable")
INSTRUCTION_QOS = ("latched", "volatile")
RECORD_STORAGES = ("mcap", "sqlite3")
TRIGGER_SEVERITIES = ("warn", "error")

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
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    dynamic: bool = False  # accepts more than one type (e.g. a CPU list as "2-3", 2 or [2, 3])

    def descriptor(self) -> Any:
        """The rcl_interfaces ParameterDescriptor (description, range, choices, read_only)."""
        from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

        constraints = [f"one of: {', '.join(self.choices)}"] if self.choices else []
        constraints += {AT_STARTUP: ["read-only: restart the node to change it"],
                        AT_CONFIGURE: ["applied at configure: change it while unconfigured"], LIVE: []}[self.when]
        desc = ParameterDescriptor(description=self.description, additional_constraints="; ".join(constraints),
                                   read_only=self.when == AT_STARTUP, dynamic_typing=self.dynamic)
        if self.low is not None and isinstance(self.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=self.low, to_value=self.high, step=0.0)]
        elif self.low is not None and isinstance(self.default, int) and not isinstance(self.default, bool):
            desc.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
        return desc


_MONITOR = {
    "success_threshold": ("success probability at or above which a step counts as successful", 0.0, 1.0),
    "success_steps": ("consecutive successful steps before the episode is judged SUCCEEDED", 1, 1000),
    "success_release_threshold": ("success probability below which a step counts towards losing a success "
                                  "(at most success_threshold)", 0.0, 1.0),
    "success_lost_steps": ("consecutive steps below success_release_threshold before SUCCESS_LOST", 1, 1000),
    "end_window_steps": ("last steps whose mean success probability decides the end-of-episode verdict",
                         1, 1000),
    "end_success_threshold": ("end-window mean success probability at or above which an episode ends as a "
                              "success (else LOW_SUCCESS_AT_END)", 0.0, 1.0),
    "stall_timeout_s": ("seconds (camera time) without progress before STALLED; 0 = off", 0.0, 86400.0),
    "stall_grace_s": ("seconds (camera time) from the episode start that do not count towards a stall",
                      0.0, 86400.0),
    "stall_epsilon": ("smallest progress rise that counts as progress", 0.0, 1.0),
    "regression_margin": ("fall below the running progress maximum that counts as a rewind (REGRESSED; "
                          "SUCCESS_LOST after a success)", 0.0, 1.0),
    "regression_steps": ("consecutive steps below the margin before REGRESSED", 1, 1000),
    "clear_steps": ("consecutive steps with the condition gone before a failure is cleared", 1, 1000),
    "episode_timeout_s": ("seconds (camera time) from the episode start before TIMEOUT; 0 = off", 0.0, 86400.0),
}
_SESSION = SessionConfig()
_MONITOR_DEFAULTS = MonitorConfig()

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("autostart", True, "walk the node to active on its own (configure, then activate)", AT_STARTUP),
    ParamSpec("bundle", "", "path of the exported model bundle directory (manifest.json, onnx/, engines/)"),
    ParamSpec("backend", "auto", "inference runtime; auto tries tensorrt (current plans for this GPU), "
              "onnxruntime with the TensorRT EP, with the CUDA EP, on the CPU, then torch, and logs why each was "
              "not taken", choices=BACKENDS),
    ParamSpec("verify_checksums", True, "hash every bundle file against its manifest sha256 at configure "
              "(~10-30 s for a 4B bundle); false still checks that every file exists with its size"),
    ParamSpec("scoring.intra_op_threads", 0, "threads one model call may use (ONNX Runtime intra-op threads, "
              "torch threads); 0 = the runtime's default (one per allowed CPU when scoring.cpu_affinity is set)",
              low=0, high=1024),
    ParamSpec("scoring.cpu_affinity", "", "CPUs the scoring threads may run on: a CPU number, a list, or the "
              "cpulist format of taskset -c ('2-3,5'); empty = any CPU. Keep the control loop's CPU out of it",
              dynamic=True),
    ParamSpec("scoring.nice", 0, "niceness of the scoring threads (0-19; 10 lets a control loop on the same CPUs "
              "go first: see the README's control-loop benchmark)", low=0, high=19),
    ParamSpec("num_frames", _SESSION.num_frames, "frames scored per step; must equal the bundle's frame count",
              low=1, high=64),
    ParamSpec("image_topic", "~/image", "camera topic (the base topic: /compressed is appended for "
              "image_transport compressed)"),
    ParamSpec("image_transport", "raw", "raw = sensor_msgs/Image, compressed = sensor_msgs/CompressedImage "
              "on <image_topic>/compressed", choices=IMAGE_TRANSPORTS),
    ParamSpec("camera_qos", "sensor_data", "camera subscription QoS: sensor_data (best effort, matches every "
              "camera) or reliable (matches only reliable cameras)", choices=CAMERA_QOS),
    ParamSpec("camera_qos_depth", 5, "camera subscription queue depth", low=1, high=100),
    ParamSpec("max_image_pixels", 4096 * 2160, "largest camera image (width x height, from the header or the "
              "compressed image's declared size) decoded; larger ones are refused before any allocation", LIVE,
              low=1, high=1 << 31),
    ParamSpec("instruction_topic", "~/instruction", "std_msgs/String topic with the task instruction; "
              "empty = only the instruction parameter"),
    ParamSpec("instruction_qos", "latched", "latched = reliable + transient-local (gets the last instruction "
              "published before the node started; needs a transient-local publisher), volatile = reliable "
              "volatile (matches every publisher)", choices=INSTRUCTION_QOS),
    ParamSpec("instruction", "", "fixed task instruction; setting it starts a new episode (empty = use "
              "instruction_topic)", LIVE),
    ParamSpec("frame_rate", _SESSION.frame_rate, "frames admitted per second of camera time (0 = every "
              "frame); from the next episode", LIVE, low=0.0, high=1000.0),
    ParamSpec("max_frames_per_episode", _SESSION.max_frames_per_episode, "frames kept per episode; longer "
              "episodes are thinned evenly; from the next episode", LIVE, low=16, high=100000),
    ParamSpec("scoring_rate", _SESSION.scoring_rate, "scoring steps per second at most (0 = as fast as the "
              "engine allows)", LIVE, low=0.0, high=1000.0),
    ParamSpec("reward_mode", _SESSION.reward_mode, "StepReward.reward: progress, progress_delta (change since "
              "the previous step) or success (success probability)", LIVE, choices=REWARD_MODES),
    ParamSpec("max_stamp_jump_s", _SESSION.max_stamp_jump_s, "a frame stamped more than this many seconds "
              "after the newest one is a camera time jump: held back until jump_confirm_frames frames agree, "
              "then a new episode starts", LIVE, low=0.001, high=86400.0),
    ParamSpec("stamp_reset_s", _SESSION.stamp_reset_s, "a frame stamped more than this many seconds before the "
              "newest one is a camera time jump back (bag loop, simulator reset), handled the same way", LIVE,
              low=0.001, high=86400.0),
    ParamSpec("jump_confirm_frames", _SESSION.jump_confirm_frames, "consecutive frames on a new camera time "
              "line that confirm a time jump (a single stray stamp is dropped and counted)", LIVE, low=1,
              high=100),
    *(
        ParamSpec(f"monitor.{name}", getattr(_MONITOR_DEFAULTS, name), text, LIVE, low=low, high=high)
        for name, (text, low, high) in _MONITOR.items()
    ),
    ParamSpec("trigger_service", "", "std_srvs/Trigger service called when a failure is raised (e.g. the "
              "arm's stop); empty = off"),
    ParamSpec("trigger_severity", "warn", "lowest failure severity that calls trigger_service: warn (every "
              "failure) or error (timeouts and model errors only)", LIVE, choices=TRIGGER_SEVERITIES),
    ParamSpec("trigger_timeout_s", 5.0, "seconds to wait for the trigger service's answer; a call that takes "
              "longer is abandoned, counted and shown as a WARN (at most one call is in flight)", LIVE,
              low=0.01, high=3600.0),
    ParamSpec("record", False, "write every episode as a rosbag2 bag (frames, instruction, rewards, flags, "
              "label)"),
    ParamSpec("record_dir", "~/robometer_episodes", "directory the episode bags are written to"),
    ParamSpec("record_storage", "mcap", "bag storage format", choices=RECORD_STORAGES),
    ParamSpec("record_flush_s", 1.0, "seconds of an open episode's recording held in memory at most: the bag is "
              "flushed and synced to disk this often, so a crash loses at most this much", low=0.05, high=60.0),
    ParamSpec("record_min_free_mb", 200.0, "free disk space (MB) below which recording stops cleanly (checked "
              "before and during an episode); 0 = no check", low=0.0, high=1.0e7),
    ParamSpec("diagnostics_period", 1.0, "seconds (wall clock, whatever the ROS clock does) between "
              "/diagnostics messages", AT_STARTUP, low=0.05, high=60.0),
    ParamSpec("no_frame_warning_s", 2.0, "seconds without a camera frame before diagnostics warn", LIVE,
              low=0.1, high=3600.0),
)
SPECS = {spec.name: spec for spec in PARAMETERS}
SESSION_PARAMETERS = frozenset(SessionConfig.parameter_names())
assert SESSION_PARAMETERS.issubset(SPECS), "every session setting is a node parameter"
UNCONFIGURED = "unconfigured"  # the lifecycle state in which AT_CONFIGURE parameters may change


def check_change(changes: Mapping[str, Any], lifecycle_state: str, current: Mapping[str, Any]) -> str:
    """Why the node refuses a parameter change, or "" when it takes it.

    Args:
        changes: the new values by parameter name (names the table does not know are not judged here).
        lifecycle_state: the node's state ("unconfigured", "inactive", "active", ...).
        current: the node's current values of (at least) the session parameters; the session settings the
            change would give are built from these with ``changes`` on top, so a change that is only invalid
            together with another setting (a release threshold above the success threshold) is refused too.
    """
    session_values: dict[str, Any] = {}
    for name, value in changes.items():
        spec = SPECS.get(name)
        if spec is None:
            continue
        if spec.when == AT_CONFIGURE and lifecycle_state != UNCONFIGURED:
            return (f"{name} is applied at configure; the node is {lifecycle_state}: deactivate and clean it up, "
                    f"set {name}, then configure again")
        if spec.choices and value not in spec.choices:
            return f"{name} must be one of {', '.join(spec.choices)}, got {value!r}"
        if name in SESSION_PARAMETERS:
            session_values[name] = value
    if session_values:
        try:
            SessionConfig.from_parameters({**current, **session_values})
        except (ValueError, TypeError) as err:
            return str(err)
    return ""


def check_configuration(values: Mapping[str, Any]) -> SessionConfig:
    """The session settings a node configures with these parameter values (missing names take the table's
    defaults), after the checks configure makes: choices, a bundle and a camera topic set.

    Raises:
        ValueError: naming the first wrong parameter.
    """
    for spec in PARAMETERS:
        value = values.get(spec.name, spec.default)
        if spec.choices and value not in spec.choices:
            raise ValueError(f"parameter {spec.name} must be one of {', '.join(spec.choices)}, got {value!r}")
    for name, what in (("bundle", "the exported bundle directory"), ("image_topic", "the camera topic")):
        if not str(values.get(name, SPECS[name].default)).strip():
            raise ValueError(f"parameter {name} is empty: set it to {what}")
    try:
        return SessionConfig.from_parameters(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"session parameters: {err}") from err


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings -> ROS 2 dotted parameter names (``monitor: {a: 1}`` -> ``monitor.a``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_parameters(paths: Iterable[str | Path], node_name: str = "reward_node") -> dict[str, Any]:
    """The parameter values ROS 2 would give a node named ``node_name`` from these parameter files, in
    order (later files win): the ``/**`` section and the node's own section (``reward_node`` or
    ``/reward_node``) of each, flattened to dotted names.

    Raises:
        ValueError: a file is not a ROS 2 parameters YAML (no ``ros__parameters`` section).
    """
    import yaml

    values: dict[str, Any] = {}
    for path in paths:
        document = yaml.safe_load(Path(path).read_text()) or {}
        sections = [v for k, v in document.items()
                    if k in ("/**", node_name, f"/{node_name}") and isinstance(v, Mapping)]
        found = [s["ros__parameters"] for s in sections if isinstance(s.get("ros__parameters"), Mapping)]
        if not found:
            raise ValueError(f"{path} has no '/**: ros__parameters:' (or '{node_name}:') section")
        for parameters in found:
            values.update(flatten(parameters))
    return values


def default_parameters_file() -> Path:
    """The package's config/reward_node.yaml (the source tree's, or the installed share directory's)."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "config" / "reward_node.yaml"]  # a source checkout
    if len(here.parents) > 3:  # <prefix>/lib/pythonX.Y/site-packages/robometer_ros: a colcon install
        candidates.append(here.parents[3] / "share" / "robometer_ros" / "config" / "reward_node.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("config/reward_node.yaml not found beside the robometer_ros package")


def session_config_from_files(paths: Iterable[str | Path] = (), num_frames: int | None = None) -> SessionConfig:
    """The SessionConfig a node started with these parameter files would use (no files: the package's
    config/reward_node.yaml), optionally for a bundle's frame count."""
    paths = list(paths) or [default_parameters_file()]
    values = load_parameters(paths)
    if num_frames is not None:
        values["num_frames"] = int(num_frames)
    return SessionConfig.from_parameters(values)
