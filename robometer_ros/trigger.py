"""The reward node's trigger: a std_srvs/Trigger service (e.g. the arm's stop) called when a failure is raised.

Calls never block scoring (``call_async``); at most one call is in flight, so a service that never answers
is not called again and again: a failure raised while a call is pending is counted (``skipped_in_flight``)
and logged. ``check_timeout`` (run with the diagnostics, on the wall clock) abandons a call that took longer
than the timeout, counts it and logs it; /diagnostics shows a WARN for a while after.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from std_srvs.srv import Trigger

from robometer_ros.health import NodeHealth


class TriggerCaller:
    """Calls one Trigger service for raised failures (see the module docstring).

    Args:
        node: the node that owns the client (and logs).
        service: the service name as given (resolved against the node's namespace).
        health: where calls, answers, refusals and timeouts are counted.
    """

    def __init__(self, node: Any, service: str, health: NodeHealth) -> None:
        self._node = node
        self._health = health
        self._client = node.create_client(Trigger, service)
        self.name = node.resolve_service_name(service)
        self._lock = threading.Lock()
        self._in_flight: tuple[Any, float, str] | None = None  # (future, wall start, reason)

    def call(self, reason: str, episode_id: str) -> None:
        """Ask the service to act on a ``reason`` failure of ``episode_id``; returns at once."""
        log = self._node.get_logger()
        with self._lock:
            if self._in_flight is not None:
                self._health.trigger_event("skipped_in_flight")
                log.warning(f"failure {reason} not forwarded: the previous call to {self.name} has not answered yet")
                return
            if not self._client.service_is_ready():
                self._health.trigger_event("unavailable", self.name)
                log.error(f"failure {reason} not forwarded: trigger service {self.name} is not available")
                return
            self._health.trigger_event("called")
            future = self._client.call_async(Trigger.Request())
            self._in_flight = (future, time.monotonic(), reason)
        future.add_done_callback(lambda fut: self._answered(fut, reason, episode_id))

    def _answered(self, future: Any, reason: str, episode_id: str) -> None:
        with self._lock:
            if self._in_flight is not None and self._in_flight[0] is future:
                self._in_flight = None
        if future.cancelled():
            return
        log = self._node.get_logger()
        try:
            answer = future.result()
        except Exception as err:
            self._health.trigger_event("failed", f"{self.name}: {err}")
            log.error(f"trigger {self.name} for {reason} failed: {err}")
            return
        self._health.trigger_event("succeeded" if answer.success else "refused", f"{self.name}: {answer.message}")
        (log.info if answer.success else log.warning)(
            f"trigger {self.name} for {reason} in episode {episode_id}: success={answer.success} "
            f"message={answer.message!r}")

    def check_timeout(self, timeout_s: float) -> None:
        """Abandon the call in flight if it has waited longer than ``timeout_s`` seconds."""
        with self._lock:
            in_flight = self._in_flight
            if in_flight is None or in_flight[0].done() or time.monotonic() - in_flight[1] < timeout_s:
                return
            self._in_flight = None
        future, _, reason = in_flight
        if hasattr(self._client, "remove_pending_request"):  # not in every distribution's rclpy
            self._client.remove_pending_request(future)
        future.cancel()
        self._health.trigger_event("timeout",
                                   f"{self.name} did not answer the call for {reason} within {timeout_s:g} s")
        self._node.get_logger().warning(f"trigger {self.name} did not answer the call for {reason} within "
                                        f"{timeout_s:g} s (trigger_timeout_s); the call is abandoned")

    def destroy(self) -> None:
        """Destroy the client."""
        self._node.destroy_client(self._client)
