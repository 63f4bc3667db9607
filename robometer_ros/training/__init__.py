"""robometer_ros.training."""
