"""A best-effort camera in its own process, for the large-frame test: `python -m support.large_frame_camera
TOPIC WIDTH HEIGHT COUNT`.

Its own process because Fast DDS reads FASTDDS_DEFAULT_PROFILES_FILE once per process: a camera publisher
made inside the test process, after other probes were created with the large-frame profile, would use the
large segment whatever its environment says. Waits for a subscriber, publishes COUNT rgb8 frames of
WIDTH x HEIGHT (sensor-data QoS, 0.3 s apart, increasing stamps), prints "published COUNT", then stays up
(a publisher that still matches) until SIGINT.
"""

from __future__ import annotations

import sys
import time

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

T0 = 1_700_000_000 * 10**9


def main() -> None:
    """Publish the frames, then keep the publisher matched until interrupted."""
    topic, width, height, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rclpy.init()
    node = rclpy.create_node("large_frame_camera")
    publisher = node.create_publisher(Image, topic, qos_profile_sensor_data)
    try:
        while publisher.get_subscription_count() < 1:
            rclpy.spin_once(node, timeout_sec=0.05)
        time.sleep(0.5)  # let the match settle on both sides before the first frame
        data = bytes(width * height * 3)
        for i in range(count):
            msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3)
            msg.data = data
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(T0 + i * 33_000_000, 10**9)
            msg.header.frame_id = "large_frame_camera_optical"
            publisher.publish(msg)
            time.sleep(0.3)
        print(f"published {count}", flush=True)
        while True:
            rclpy.spin_once(node, timeout_sec=0.5)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
