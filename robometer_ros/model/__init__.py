"""robometer_ros.model."""
