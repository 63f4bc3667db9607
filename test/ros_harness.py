"""Multi-process ROS 2 test harness: isolated DDS domains, nodes as subprocesses, and a probe node.

The domain lease, the graph environment and NodeProcess are robometer_ros.ros_graph's (make demo uses them
too); this module adds the probe side.

Every test that touches DDS gets its own ROS_DOMAIN_ID (allocated with a lock file, so parallel pytest
runs on one machine never share one), LOCALHOST-only discovery, its own ROS_LOG_DIR and the Fast DDS
large-frame profile. Nodes under test run as real processes (`python -m module --ros-args ...`); the
test talks to them through a `Probe`, an rclpy node in the test process with its own context.
Waiting is always for an event (matching, a message, a service) with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RosEnv:
    """The environment of one test's ROS graph."""

    domain_id: int
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)


class Inbox:
    """Messages received on one subscription, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._cond = threading.Condition()

    def _push(self, msg: Any) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(
        self, count: int = 1, timeout: float = 20.0, predicate: Callable[[Any], bool] | None = None
    ) -> list[Any]:
        """Wait until `count` messages (satisfying `predicate`, if given) arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = [m for m in self.messages if predicate is None or predicate(m)]
                if len(matching) >= count:
                    return matching
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"got {len(matching)} of {count} expected messages within {timeout} s "
                        f"({len(self.messages)} received in all)"
                    )
                self._cond.wait(left)


class Probe:
    """An rclpy node in the test process, on its own context and executor thread."""

    def __init__(self, domain_id: int, name: str = "test_probe") -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException):
            self._executor.spin()

    def subscribe(self, topic: str, msg_type: Any, qos: Any = 10) -> Inbox:
        """Subscribe and collect every message into an Inbox."""
        inbox = Inbox()
        self.node.create_subscription(msg_type, topic, inbox._push, qos)
        return inbox

    def publisher(self, topic: str, msg_type: Any, qos: Any = 10, wait_for_subscribers: int = 1,
                  timeout: float = 20.0) -> Any:
        """A publisher, returned once `wait_for_subscribers` subscriptions have matched it."""
        pub = self.node.create_publisher(msg_type, topic, qos)
        wait_until(lambda: pub.get_subscription_count() >= wait_for_subscribers, timeout,
                   f"{wait_for_subscribers} subscriber(s) on {topic}")
        return pub

    def wait_for_publishers(self, topic: str, count: int = 1, timeout: float = 20.0) -> None:
        """Wait until `count` publishers exist on `topic`."""
        wait_until(lambda: self.node.count_publishers(topic) >= count, timeout, f"{count} publisher(s) on {topic}")

    def call(self, srv_type: Any, name: str, request: Any, timeout: float = 20.0) -> Any:
        """Call a service once it is available; return the response."""
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available within {timeout} s")
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())
            if not done.wait(timeout):
                raise TimeoutError(f"service {name} did not answer within {timeout} s")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        """Stop spinning and shut the context down (executor first: see the reference's pitfalls)."""
        self._executor.shutdown()
        self._thread.join(5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true; raise TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
