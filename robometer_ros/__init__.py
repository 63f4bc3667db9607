"""robometer_ros: the Robometer learned reward model on the robot (ROS 2) and its training pipeline.

The generated interfaces (``robometer_ros.msg``, ``robometer_ros.srv``) live beside these sources
after a colcon build; in the no-ROS developer venv they are installed into site-packages, and the
``__path__`` extension below lets this source package find them there.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
