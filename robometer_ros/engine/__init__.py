"""robometer_ros.engine."""
