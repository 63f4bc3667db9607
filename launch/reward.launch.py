"""Launch the Robometer reward node (a lifecycle node that walks itself to active unless autostart:=false).

    ros2 launch robometer_ros reward.launch.py bundle:=/opt/bundles/robometer-4b \\
        image_topic:=/camera/color/image_raw instruction_topic:=/task/instruction namespace:=arm

Arguments left empty keep the value from params_file (default: the package's config/reward_node.yaml);
``calibration:=cal.yaml`` adds the thresholds robometer-calibrate wrote, applied after params_file.
Without a colcon install of robometer_ros (a pip/venv checkout), the node is started as
`python -m robometer_ros.reward_node` and the config is read from the source tree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

PACKAGE = "robometer_ros"

# (name, default, description); an empty default means "keep params_file's value".
ARGUMENTS = (
    ("bundle", "", "exported model bundle directory (overrides params_file)"),
    ("image_topic", "", "camera topic (overrides params_file; default there: ~/image)"),
    ("instruction_topic", "", "instruction topic, std_msgs/String (overrides params_file; default: ~/instruction)"),
    ("namespace", "", "namespace of the node (its topics become /<namespace>/reward_node/...)"),
    ("node_name", "reward_node", "name of the node"),
    ("params_file", "", "parameters YAML; empty = the package's config/reward_node.yaml"),
    ("calibration", "", "a second parameters YAML applied after params_file, e.g. the monitor thresholds "
     "robometer-calibrate wrote for this robot; empty = none"),
    ("use_sim_time", "false", "use /clock (simulation or bag replay) for the node's clock"),
    ("log_level", "info", "logging level: debug, info, warn, error"),
)


def _package_paths() -> tuple[bool, Path]:
    """(whether robometer_ros is installed with its executable (colcon), the directory of reward_node.yaml)."""
    try:
        from ament_index_python.packages import get_package_prefix

        prefix = Path(get_package_prefix(PACKAGE))
    except Exception:  # not installed, no ament_index_python, or AMENT_PREFIX_PATH unset
        prefix = None
    if prefix is not None:
        config = prefix / "share" / PACKAGE / "config"
        if (config / "reward_node.yaml").exists() and (prefix / "lib" / PACKAGE / "reward_node").exists():
            return True, config
    return False, Path(__file__).resolve().parents[1] / "config"


def _node(context: LaunchContext) -> list[LifecycleNode]:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    installed, config_dir = _package_paths()
    params_files = [arg("params_file") or str(config_dir / "reward_node.yaml")]
    if arg("calibration"):
        params_files.append(arg("calibration"))
    overrides: dict[str, object] = {"use_sim_time": arg("use_sim_time").lower() in ("true", "1", "yes")}
    for name in ("bundle", "image_topic", "instruction_topic"):
        if arg(name):
            overrides[name] = arg(name)
    if installed:
        executable: dict[str, object] = {"package": PACKAGE, "executable": "reward_node"}
    else:  # a source checkout in a venv: no lib/robometer_ros/reward_node, run the module instead
        executable = {"executable": sys.executable, "arguments": ["-m", "robometer_ros.reward_node"]}
    arguments = [*executable.pop("arguments", []), "--ros-args", "--log-level", arg("log_level")]
    return [
        LifecycleNode(
            **executable,
            name=arg("node_name"),
            namespace=arg("namespace"),
            parameters=[*params_files, overrides],
            arguments=arguments,
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    """The launch description: the arguments above and one LifecycleNode (autostart is its parameter)."""
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text) for name, default, text in ARGUMENTS]
        + [OpaqueFunction(function=_node)]
    )
