"""The Robometer reward node: camera + instruction in; StepReward, latched FailureFlag and episodes out.

ROS I/O only. Everything about an episode (frames, scheduling, engine calls, reward, monitor) is the
ScoringSession's (robometer_ros/session.py), the same code the offline tools score with; the parameter
table is node_parameters.py and the /diagnostics rules are health.py.

A managed (lifecycle) node:

* configure: validate the parameters, open the bundle and load the engine, create the session, the
  publishers, the trigger client and the episode recorder. A bad bundle fails the transition with a log
  line naming the problem; the node stays up, unconfigured, and /diagnostics says ERROR with the reason.
* activate: subscribe to the camera and the instruction, offer the episode services, publish the latched
  EpisodeStatus and FailureFlag (so ``ros2 topic echo --once`` gets a state at once), start the worker.
* deactivate: pause (no admission, no scoring; engine and episode kept). cleanup / shutdown: release all.
* ``autostart`` (default true) walks the node to active on its own.

Threads: the executor runs the callbacks, which only convert an image and offer it to the session. One
worker thread asks the session for work and publishes each StepResult. Every callback is guarded: an
exception is counted, logged (throttled) and shown in /diagnostics, and the next message is handled. The
diagnostics timer runs on the wall clock, so it ticks whatever /clock does.
"""

from __future__ import annotations

import functools
import gc
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble's name for it
    from rclpy.qos_event import SubscriptionEventCallbacks

from robometer_ros import node_messages
from robometer_ros.engine.threads import ThreadLimits, parse_cpu_list, run_with_limits
from robometer_ros.health import CameraGraph, HealthInputs, NodeHealth
from robometer_ros.images import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from robometer_ros.monitor import Event, EventKind, Outcome, Severity
from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward
from robometer_ros.node_parameters import PARAMETERS, SESSION_PARAMETERS, SPECS, check_change, check_configuration
from robometer_ros.session import EpisodeChange, EpisodeSnapshot, ScoringSession, SessionConfig, StepResult
from robometer_ros.srv import EndEpisode
from robometer_ros.trigger import TriggerCaller

NODE_NAME = "reward_node"
TRIGGER_SEVERITIES = {"warn": Severity.WARN, "error": Severity.ERROR}

# An engine factory turns (bundle path, backend, verify_checksums=bool) into an object with the RewardEngine
# interface (add_frame, score, forget, backend_name, model_id, num_frames): the node's one seam for other
# engines (tests install a scripted double through it).
EngineFactory = Callable[..., Any]


def open_reward_engine(bundle_path: str, backend: str, verify_checksums: bool = True, **options: Any) -> Any:
    """The production engine factory: ``Bundle.open(bundle_path)`` then ``RewardEngine(bundle, backend,
    **options)`` (runtime options such as ``intra_op_threads``)."""
    from robometer_ros.engine.bundle import Bundle
    from robometer_ros.engine.reward_engine import RewardEngine

    bundle = Bundle.open(bundle_path, verify_checksums=verify_checksums)  # first: a bad bundle is named as such
    return RewardEngine(bundle, backend=backend, **options)


class ConfigurationError(Exception):
    """A parameter value or bundle that makes configure fail; the message names the problem."""


def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Keep a callback's exception from reaching the executor: count it, log it (throttled), answer a
    service request with a failure, and carry on with the next message."""
    name = method.__name__.lstrip("_")

    @functools.wraps(method)
    def wrapper(self: RewardNode, *args: Any) -> Any:
        try:
            return method(self, *args)
        except Exception as err:
            count = self._health.callback_error(name, f"{type(err).__name__}: {err}")
            self.get_logger().error(f"{name} failed ({count} so far): {type(err).__name__}: {err}",
                                    throttle_duration_sec=5.0)
            if len(args) == 2 and hasattr(args[1], "success"):  # a service: (request, response)
                args[1].success, args[1].message = False, f"internal error: {type(err).__name__}: {err}"
                return args[1]
            return None

    return wrapper


class RewardNode(LifecycleNode):
    """The Robometer reward node (see the module docstring for states and threads)."""

    def __init__(self, node_name: str = NODE_NAME, engine_factory: EngineFactory = open_reward_engine,
                 **kwargs: Any) -> None:
        """Declare the parameters and start /diagnostics; everything else happens in the transitions."""
        super().__init__(node_name, **kwargs)
        self._engine_factory = engine_factory
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())
        self.add_on_set_parameters_callback(self._validate_parameter_change)
        self._apply_on_check = not hasattr(self, "add_post_set_parameters_callback")  # Humble has none
        if not self._apply_on_check:
            self.add_post_set_parameters_callback(self._apply_parameter_change)
        self._state = "unconfigured"
        self._configure_error = ""
        self._engine: Any = None
        self._session: ScoringSession | None = None
        self._health = NodeHealth()
        self._publish_lock = threading.RLock()  # one step or episode change published at a time, in order
        self._recorder: Any = None
        self._pub_reward = self._pub_flag = self._pub_episode = None
        self._trigger: TriggerCaller | None = None
        self._inputs: list[Any] = []
        self._camera_subscription: Any = None
        self._incompatible_qos = 0
        self._worker: threading.Thread | None = None
        self._flag_failed = False
        self._last_ros_time: int | None = None
        self._limits = ThreadLimits()
        self._warned: dict[str, float] = {}  # last warning time per kind (executor thread)
        self._trim, self._trimmed_at = _glibc_trim(), time.monotonic()
        self._pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diagnostics_timer = self.create_timer(float(self._param("diagnostics_period")),
                                                    self._publish_diagnostics,
                                                    clock=Clock(clock_type=ClockType.STEADY_TIME))

    # ------------------------------------------------------------------------------------ parameters
    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _values(self, names: Iterable[str]) -> dict[str, Any]:
        return {name: self._param(name) for name in names}

    def _session_config(self, overrides: dict[str, Any] | None = None) -> SessionConfig:
        return SessionConfig.from_parameters({**self._values(SESSION_PARAMETERS), **(overrides or {})})

    def _validate_parameter_change(self, params: list[Parameter]) -> SetParametersResult:
        """Refuse a change that is invalid, or that needs an unconfigured node, saying why (the rules are
        node_parameters.check_change)."""
        try:
            reason = check_change({p.name: p.value for p in params}, self._state, self._values(SESSION_PARAMETERS))
            if not reason and self._apply_on_check:
                self._apply_parameter_change(params)  # it reads the new values from ``params``
            return SetParametersResult(successful=not reason, reason=reason)
        except Exception as err:  # a refused change, never a dead node
            return SetParametersResult(successful=False, reason=f"{type(err).__name__}: {err}")

    @guarded
    def _apply_parameter_change(self, params: list[Parameter]) -> None:
        """Live changes: session settings at once (admission from the next episode), a new instruction."""
        values = {p.name: p.value for p in params}
        if self._session is not None and values.keys() & SESSION_PARAMETERS:
            config = self._session_config(values)
            self._session.configure(config)
            self.get_logger().info(f"session settings now {config}")
        if values.get("instruction") and self._state == "active":
            self._set_instruction(str(values["instruction"]), "parameter instruction")

    # ------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Validate parameters, load the engine and session, create publishers; FAILURE (stays unconfigured)."""
        try:
            try:
                config = check_configuration(self._values(SPECS))
            except ValueError as err:
                raise ConfigurationError(str(err)) from err
            self._load_engine(config)
            self._open_recorder()
        except Exception as err:  # whatever it is, the node stays up, unconfigured, and says why
            reason = str(err) if isinstance(err, ConfigurationError) else f"{type(err).__name__}: {err}"
            self._configure_error = reason
            self.get_logger().error(f"configure failed: {reason}")
            self._release_engine()
            self._publish_diagnostics()
            return TransitionCallbackReturn.FAILURE
        self._configure_error = ""
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._pub_reward = self.create_lifecycle_publisher(
            StepReward, "~/step_reward", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self._pub_flag = self.create_lifecycle_publisher(FailureFlag, "~/failure_flag", latched)
        self._pub_episode = self.create_lifecycle_publisher(EpisodeStatus, "~/episode", latched)
        trigger = str(self._param("trigger_service")).strip()
        self._trigger = TriggerCaller(self, trigger, self._health) if trigger else None
        self._state = "inactive"
        self.get_logger().info(f"configured: model {self._engine.model_id} on {self._engine.backend_name} "
                               f"({config.num_frames} frames), bundle {self._param('bundle')}")
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Subscribe, offer the services, publish the latched state, start the worker."""
        result = super().on_activate(state)  # enables the lifecycle publishers
        self._state = "active"
        self._create_inputs()
        self._inputs += [self.create_service(Trigger, "~/reset_episode", self._on_reset_episode),
                         self.create_service(EndEpisode, "~/end_episode", self._on_end_episode)]
        assert self._session is not None
        self._session.reopen()
        with self._publish_lock:
            episode = self._session.episode
            self._publish_status(episode)
            self._publish_flag(node_messages.failure_flag(episode, None, bool(episode and episode.failure), Header()))
        self._worker = threading.Thread(target=self._work, name="robometer_scoring", daemon=True)
        self._worker.start()
        fixed = str(self._param("instruction"))
        if fixed and episode is None:
            self._set_instruction(fixed, "parameter instruction")
        self.get_logger().info(f"active: scoring {self._camera_subscription.topic_name} "
                               f"({self._param('image_transport')}, {self._param('camera_qos')} QoS)")
        return result

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Pause: stop the worker, drop subscriptions and services; keep engine and episode."""
        self._stop_worker()
        for entity in self._inputs:
            (self.destroy_service if hasattr(entity, "srv_type") else self.destroy_subscription)(entity)
        self._inputs, self._camera_subscription = [], None
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
        self.release()
        self._state = "finalized"
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """Recover to unconfigured after an exception in a transition."""
        self.get_logger().error(f"error during a transition from {state.label}; releasing the engine")
        self.release()
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def autostart(self) -> None:
        """Configure and activate if the ``autostart`` parameter says so (failures are logged, not raised)."""
        if not self._param("autostart"):
            self.get_logger().info("autostart is false: waiting for a lifecycle manager (configure, activate)")
            return
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error(f"autostart: configure failed; the node stays unconfigured (fix the parameters "
                                    f"and run `ros2 lifecycle set {self.get_fully_qualified_name()} configure`)")
            return
        if self.context.ok():  # not when Ctrl-C came while the engine was loading
            self.trigger_activate()

    def release(self) -> None:
        """Stop the worker and free the engine and recorder (process exit, from any state)."""
        self._stop_worker()
        self._teardown()

    def _load_engine(self, config: SessionConfig) -> None:
        bundle, backend = str(self._param("bundle")), str(self._param("backend"))
        try:
            limits = ThreadLimits.from_parameters(int(self._param("scoring.intra_op_threads")),
                                                  parse_cpu_list(self._param("scoring.cpu_affinity")),
                                                  int(self._param("scoring.nice")))
        except ValueError as err:
            raise ConfigurationError(str(err)) from err
        self._limits = limits
        self.get_logger().info(f"opening bundle {bundle} (backend {backend}; scoring threads: {limits.describe()})")
        try:  # created in a thread with the limits: the runtime's own threads inherit them
            engine = run_with_limits(limits, self._engine_factory, bundle, backend,
                                     verify_checksums=bool(self._param("verify_checksums")), **limits.runtime_options())
        except Exception as err:  # a bundle or backend problem must not kill the node
            raise ConfigurationError(f"cannot load bundle {bundle!r}: {type(err).__name__}: {err}") from err
        for attempt in getattr(engine, "backend_attempts", ()):
            self.get_logger().info(f"backend {attempt.describe()}")
        self._engine = engine
        if int(engine.num_frames) != config.num_frames:
            raise ConfigurationError(
                f"bundle {bundle!r} scores {engine.num_frames} frames per step but parameter num_frames is "
                f"{config.num_frames}: set num_frames to {engine.num_frames} or use a bundle exported for it")
        self._session = ScoringSession(engine, config)

    def _open_recorder(self) -> None:
        if not self._param("record"):
            return
        from robometer_ros.recorder import EpisodeRecorder, RecordTopics

        topics = RecordTopics(
            image=self.resolve_topic_name(self._image_topic()),
            instruction=self.resolve_topic_name(str(self._param("instruction_topic")).strip() or "~/instruction"),
            step_reward=self.resolve_topic_name("~/step_reward"),
            failure_flag=self.resolve_topic_name("~/failure_flag"),
            episode_status=self.resolve_topic_name("~/episode"),
        )
        try:  # never touches the disk here: an unwritable directory shows up in status() (diagnostics)
            self._recorder = EpisodeRecorder(
                str(self._param("record_dir")), storage=str(self._param("record_storage")), topics=topics,
                flush_s=float(self._param("record_flush_s")), min_free_mb=float(self._param("record_min_free_mb")),
                on_error=lambda text: self.get_logger().error(f"recording: {text}", throttle_duration_sec=5.0))
        except Exception as err:
            raise ConfigurationError(f"cannot record to {self._param('record_dir')!r}: {err}") from err
        self.get_logger().info(f"recording episodes to {self._recorder.directory} ({self._recorder.storage})")

    def _teardown(self) -> None:
        session = self._session
        if session is not None:
            with self._publish_lock:
                change = session.clear()
                if change is not None and change.ended is not None:
                    self._record(lambda rec: rec.end_episode(outcome=int(change.ended.outcome), note="node cleanup",
                                                             verdict=change.verdict))
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
        if self._trigger is not None:
            self._trigger.destroy()
            self._trigger = None
        self._flag_failed = False
        self._release_engine()

    def _release_engine(self) -> None:
        engine, self._engine, self._session = self._engine, None, None
        if engine is not None:
            close = getattr(engine, "close", None)
            if callable(close):
                close()
            del engine
            gc.collect()  # drop the last references to GPU buffers now, not at some later collection

    # ------------------------------------------------------------------------------------ inputs
    def _image_topic(self) -> str:
        topic = str(self._param("image_topic"))
        return f"{topic.rstrip('/')}/compressed" if self._param("image_transport") == "compressed" else topic

    def _create_inputs(self) -> None:
        depth = int(self._param("camera_qos_depth"))
        reliable = self._param("camera_qos") == "reliable"
        camera_qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE,
                                reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)
        compressed = self._param("image_transport") == "compressed"
        self._camera_subscription = self.create_subscription(
            CompressedImage if compressed else Image, self._image_topic(),
            self._on_compressed_image if compressed else self._on_image, camera_qos,
            event_callbacks=SubscriptionEventCallbacks(incompatible_qos=self._on_camera_incompatible_qos))
        self._inputs = [self._camera_subscription]
        instruction_topic = str(self._param("instruction_topic")).strip()
        if instruction_topic:
            latched = self._param("instruction_qos") == "latched"
            qos = QoSProfile(depth=1 if latched else 10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            subscription = self.create_subscription(
                String, instruction_topic, self._on_instruction, qos,
                event_callbacks=SubscriptionEventCallbacks(incompatible_qos=self._on_instruction_incompatible_qos))
            self._inputs.append(subscription)

    @guarded
    def _on_camera_incompatible_qos(self, info: Any) -> None:
        self._incompatible_qos += 1
        self.get_logger().warning(
            f"a publisher on {self._camera_subscription.topic_name} has an incompatible QoS (policy "
            f"{info.last_policy_kind}): a reliable subscriber does not match a best-effort camera; use "
            "camera_qos sensor_data", throttle_duration_sec=10.0)

    @guarded
    def _on_instruction_incompatible_qos(self, info: Any) -> None:
        self.get_logger().warning(
            f"a publisher on {self.resolve_topic_name(str(self._param('instruction_topic')))} has an incompatible "
            f"QoS (policy {info.last_policy_kind}): instruction_qos latched needs a reliable transient-local "
            "publisher; publish latched or set instruction_qos volatile", throttle_duration_sec=10.0)

    @guarded
    def _on_image(self, msg: Image) -> None:
        self._offer(msg, image_msg_to_rgb)

    @guarded
    def _on_compressed_image(self, msg: CompressedImage) -> None:
        self._offer(msg, compressed_msg_to_rgb)

    def _offer(self, msg: Any, convert: Callable[..., Any]) -> None:
        """Offer one camera message to the session; it is decoded only if the session admits it."""
        started = time.perf_counter()
        try:
            session = self._session
            if session is None:
                return
            try:
                offer = session.offer(node_messages.stamp_to_ns(msg.header.stamp), msg.header.frame_id,
                                      functools.partial(convert, msg, max_pixels=int(self._param("max_image_pixels"))),
                                      keep=msg)
            except ImageConversionError as err:
                count = self._health.bad_image(err.reason, str(err))
                self._warn_throttled(f"bad_image.{err.reason}", f"bad image on {self._camera_subscription.topic_name}: "
                                     f"{err} ({count} so far)")
                return
            if offer.change is not None:
                with self._publish_lock:
                    self._publish_change(offer.change)
            for kept in offer.kept:
                self._record(lambda rec, m=kept: rec.record_image(m))
        finally:
            self._health.frame_arrived(time.perf_counter() - started)

    @guarded
    def _on_instruction(self, msg: String) -> None:
        self._set_instruction(msg.data, f"topic {self.resolve_topic_name(str(self._param('instruction_topic')))}")

    def _set_instruction(self, text: str, source: str) -> None:
        """A different instruction ends the current episode and starts a new one; one the bundle cannot
        score is refused on arrival and the current episode goes on."""
        session = self._session
        if session is None:
            return
        current = session.episode
        if current is not None and current.instruction == text:
            return
        try:
            with self._publish_lock:
                change = session.start(text, reason=f"new instruction from {source}")
                self._publish_change(change)
        except ValueError as err:
            shown = text if len(text) <= 60 else f"{text[:57]}... ({len(text)} characters)"
            self._health.instruction_rejected(f"{shown!r} from {source}: {err}")
            self._warn_throttled("instruction", f"instruction from {source} refused, the episode goes on: {err} "
                                 f"(instruction {shown!r})", period_s=1.0)

    @guarded
    def _on_reset_episode(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            with self._publish_lock:
                change = self._session.reset()
                self._publish_change(change)
        except LookupError as err:
            response.success, response.message = False, f"no episode to reset: {err}"
            return response
        response.success = True
        ended = change.ended.episode_id if change.ended else ""
        response.message = f"ended {ended}, started {change.started.episode_id if change.started else ''}"
        return response

    @guarded
    def _on_end_episode(self, request: EndEpisode.Request, response: EndEpisode.Response) -> EndEpisode.Response:
        if request.outcome not in tuple(Outcome):
            response.success = False
            response.message = f"outcome must be 0 (unknown), 1 (success) or 2 (failure), got {request.outcome}"
            return response
        try:
            with self._publish_lock:
                change = self._session.end(Outcome(request.outcome))
                self._publish_change(change, note=request.note)
        except LookupError as err:
            response.success, response.message = False, f"no episode to end: {err}"
            return response
        response.success = True
        response.ended_episode_id = change.ended.episode_id if change.ended else ""
        response.new_episode_id = change.started.episode_id if change.started else ""
        response.message = f"ended {response.ended_episode_id} as {Outcome(request.outcome).name.lower()}: " \
                           f"{change.ended.verdict if change.ended else ''}"
        return response

    # ------------------------------------------------------------------------------------ worker
    def _stop_worker(self) -> None:
        if self._session is not None:
            self._session.close()
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=30.0)
            if worker.is_alive():
                self.get_logger().error("the scoring worker did not stop within 30 s (engine call hung?)")

    def _work(self) -> None:
        """The worker: run the session's jobs and publish each step, in order; survives anything."""
        session = self._session
        if not self._limits.is_default:
            self.get_logger().info(f"scoring worker {self._limits.apply_to_current_thread().describe()}")
        while session is not None:
            job = session.next_job(timeout=None)
            if job is None:  # the session was closed
                return
            try:
                with self._publish_lock:
                    result = session.run(job)
                    if result is not None:
                        self._publish_step(result)
            except Exception as err:
                self._health.callback_error("scoring_worker", f"{type(err).__name__}: {err}")
                self.get_logger().error(f"scoring worker: {type(err).__name__}: {err}", throttle_duration_sec=5.0)

    # ------------------------------------------------------------------------------------ outputs
    def _publish_step(self, result: StepResult) -> None:
        """A StepResult -> StepReward (when it has scores), its events, the status (publish lock held)."""
        if result.ok:
            msg = node_messages.step_reward(result, str(self._engine.model_id), str(self._engine.backend_name))
            self._pub_reward.publish(msg)
            self._record(lambda rec: rec.record_step_reward(msg))
            self._health.step(result.inference_time, (self.get_clock().now().nanoseconds - result.stamp_ns) / 1e6)
        else:
            self._health.model_error(result.error)
            self.get_logger().error(f"model error: {result.error}", throttle_duration_sec=5.0)
        header = node_messages.camera_header(result.stamp_ns, result.camera_frame_id)
        for event in result.events:
            self._publish_event(result.status, event, header, call_trigger=True)
        if result.status_changed or result.events:
            self._publish_status(result.status)

    def _publish_change(self, change: EpisodeChange, note: str = "") -> None:
        """An episode boundary: the final steps and verdict of the old episode, its end, the new one."""
        for kept in change.kept:  # the last frame, admitted at the end to be scored
            self._record(lambda rec, m=kept: rec.record_image(m))
        for step in change.final_steps:
            self._publish_step(step)
        ended, started = change.ended, change.started
        if ended is not None:
            header = node_messages.camera_header(ended.stamp_ns, ended.camera_frame_id)
            for event in change.end_events:  # ~/end_episode's verdict: on record, never a trigger call
                self._publish_event(ended, event, header, call_trigger=False)
            status = self._publish_status(ended, record=False)
            self._record(lambda rec: rec.end_episode(outcome=int(ended.outcome), note=note or change.reason,
                                                     verdict=ended.verdict, status_msg=status))
        if started is not None:
            self._record(lambda rec: rec.start_episode(started.episode_id, started.instruction))
            self._publish_status(started)
            if self._flag_failed:  # the latched flag still says the old episode failed: not this one
                self._publish_flag(node_messages.failure_flag(started, None, False, Header(), "new episode"))
            ended_text = f"ended episode {ended.episode_id} ({ended.steps} steps, {ended.verdict}); " if ended else ""
            self.get_logger().info(f"{change.reason}: {ended_text}started episode {started.episode_id}: "
                                   f"{started.instruction!r}")

    def _publish_event(self, episode: EpisodeSnapshot, event: Event, header: Header, call_trigger: bool) -> None:
        if event.kind is EventKind.SUCCEEDED:
            self.get_logger().info(f"episode {episode.episode_id} succeeded: {event.detail}")
            return
        failed = event.kind is EventKind.FAILURE_RAISED
        self._publish_flag(node_messages.failure_flag(episode, event, failed, header))
        if not failed:
            self.get_logger().info(f"episode {episode.episode_id}: {event.detail}")
            return
        self.get_logger().warning(f"episode {episode.episode_id} failure {event.reason.name}: {event.detail}")
        threshold = TRIGGER_SEVERITIES[str(self._param("trigger_severity"))]
        if call_trigger and self._trigger is not None and event.severity >= threshold:
            self._trigger.call(event.reason.name, episode.episode_id)

    def _publish_flag(self, msg: FailureFlag) -> None:
        self._flag_failed = msg.failed
        if self._pub_flag is not None:
            self._pub_flag.publish(msg)
        self._record(lambda rec: rec.record_failure_flag(msg))

    def _publish_status(self, episode: EpisodeSnapshot | None, record: bool = True) -> EpisodeStatus:
        msg = node_messages.episode_status(episode)
        if self._pub_episode is not None:
            self._pub_episode.publish(msg)
        if record and episode is not None:
            self._record(lambda rec: rec.record_episode_status(msg))
        return msg

    def _warn_throttled(self, key: str, text: str, period_s: float = 5.0) -> None:
        """A warning at most every ``period_s`` per key, so one kind of bad input cannot hide another."""
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) >= period_s:
            self._warned[key] = now
            self.get_logger().warning(text)

    # ------------------------------------------------------------------------------------ recording
    def _record(self, write: Callable[[Any], Any]) -> None:
        """Hand one item to the recorder (it writes in the background); its errors reach diagnostics."""
        recorder = self._recorder
        if recorder is not None:
            try:
                write(recorder)
            except Exception as err:
                self.get_logger().error(f"recording failed: {err}", throttle_duration_sec=5.0)

    # ------------------------------------------------------------------------------------ diagnostics
    @guarded
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        if self._trim is not None and now - self._trimmed_at >= 10.0:
            # Freed camera-frame buffers (6 MB at 1080p) otherwise stay in glibc's heap and the RSS creeps up
            # a frame at a time over a long run (benchmarks/soak_node.py); giving them back costs ~1 ms / 10 s.
            self._trimmed_at = now
            self._trim()
        if self._trigger is not None:
            self._trigger.check_timeout(float(self._param("trigger_timeout_s")))
        status = DiagnosticStatus(name=f"robometer_ros: {self.get_fully_qualified_name()}",
                                  hardware_id=str(getattr(self._engine, "model_id", "")))
        level, message, values = self._health.report(self._health_inputs())
        status.level, status.message = level, message
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = Clock().now().to_msg()  # wall time: diagnostics go on when sim time stops
        self._pub_diagnostics.publish(array)

    def _health_inputs(self) -> HealthInputs:
        session = self._session
        episode = session.episode if session is not None else None
        inputs = HealthInputs(
            lifecycle_state=self._state, configure_error=self._configure_error,
            values={"bundle": self._param("bundle"), "backend": str(getattr(self._engine, "backend_name", "")),
                    "model_id": str(getattr(self._engine, "model_id", "")),
                    "image_topic": self.resolve_topic_name(self._image_topic()),
                    "episode_id": episode.episode_id if episode else "",
                    "instruction": episode.instruction if episode else "",
                    "episode_state": episode.state.name.lower() if episode else "",
                    "episode_steps": episode.steps if episode else 0},
            session_counters=session.counters() if session is not None else {},
            has_episode=episode is not None, no_frame_warning_s=float(self._param("no_frame_warning_s")),
            waiting_for_clock=self._sim_time_stuck(),
        )
        if self._camera_subscription is not None:
            topic = self._camera_subscription.topic_name
            publishers = self.get_publishers_info_by_topic(topic)
            inputs.camera = CameraGraph(
                topic=topic, publishers=len(publishers),
                best_effort_publishers=sum(p.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
                                           for p in publishers),
                subscriber_reliable=self._param("camera_qos") == "reliable",
                incompatible_qos_events=self._incompatible_qos)
        if self._recorder is not None:
            rec = self._recorder.status()
            inputs.recorder_values = {"recorder": rec.message, "recorder.bags_closed": rec.episodes_closed,
                                      "recorder.messages_written": rec.messages_written,
                                      "recorder.dropped": rec.dropped}
            if rec.last_closed_bag:
                inputs.recorder_values["recorder.last_bag"] = rec.last_closed_bag
            if not rec.ok:
                inputs.recorder_error = rec.last_error or rec.message
        return inputs

    def _sim_time_stuck(self) -> bool:
        """use_sim_time is on and the ROS clock did not move since the previous report (no /clock)."""
        if not self.get_parameter("use_sim_time").value:
            return False
        now = self.get_clock().now().nanoseconds
        stuck = now == 0 or now == self._last_ros_time
        self._last_ros_time = now
        return stuck


def _glibc_trim() -> Callable[[], Any] | None:
    """glibc's malloc_trim(0), or None where this is not glibc."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def main(args: list[str] | None = None, engine_factory: EngineFactory | None = None) -> None:
    """Run the node until Ctrl-C / SIGINT (``python -m robometer_ros.reward_node --ros-args ...``)."""
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
