"""`colcon build` of the package in a workspace, as on a robot, and the installed package works on its own.

The sources are copied out of the repository first, like `ws/src/robometer_ros`: the developer venv
lives inside the repository, and CMake refuses exported include paths inside the source tree. The venv is
the ROS prefix colcon builds against (AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH), as /opt/ros/<distro> is on
a robot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


def _copy_sources(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


@pytest.mark.slow
def test_colcon_build_installs_a_complete_ros_package(tmp_path: Path):
    src = tmp_path / "src" / "robometer_ros"
    _copy_sources(src)
    env = {**os.environ, "AMENT_PREFIX_PATH": str(VENV), "CMAKE_PREFIX_PATH": str(VENV),
           "PATH": os.pathsep.join([str(VENV / "bin"), os.environ.get("PATH", "")])}
    cmd = [str(VENV / "bin" / "colcon"), "build", "--packages-select", "robometer_ros", "--event-handlers",
           "console_cohesion+", "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, f"colcon build failed:\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    assert "Summary: 1 package finished" in done.stdout
    prefix = tmp_path / "install" / "robometer_ros"  # colcon's isolated install layout

    share = prefix / "share" / "robometer_ros"
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    # ros2 run / launch_ros find executables here, launch files and configs in share/.
    assert os.access(prefix / "lib" / "robometer_ros" / "reward_node", os.X_OK)
    assert (share / "package.xml").is_file()
    assert (share / "launch" / "reward.launch.py").is_file()
    assert (share / "config" / "reward_node.yaml").is_file()
    assert (share / "msg" / "StepReward.msg").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "robometer_ros").is_file()
    # Our modules are merged into the generated Python package (ros2/rosidl_python#141 workaround).
    assert (site / "robometer_ros" / "reward_node.py").is_file()
    assert list((site / "robometer_ros").glob("robometer_ros_s__rosidl_typesupport_c*.so"))

    # The installed package imports on its own: messages and node module from the install prefix.
    check = (
        "import robometer_ros, robometer_ros.msg as m, robometer_ros.reward_node;"
        "from robometer_ros.srv import EndEpisode;"
        "from robometer_ros.node_parameters import default_parameters_file as f;"
        "print(robometer_ros.__file__, m.StepReward().reward_mode, EndEpisode.Request.OUTCOME_FAILURE, f())"
    )
    # Prepend, like `source install/setup.bash`: this process already carries the venv's library path.
    library_path = os.pathsep.join(p for p in (str(prefix / "lib"), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    run_env = {**env, "PYTHONPATH": str(site), "LD_LIBRARY_PATH": library_path,
               "AMENT_PREFIX_PATH": f"{prefix}:{VENV}", "ROBOMETER_ROS_INSTALLED_ONLY": "1"}
    done = subprocess.run([sys.executable, "-c", check], env=run_env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(site) in done.stdout and done.stdout.split()[1:3] == ["0", "2"]
    # the tools find the node's parameters in the install's share/ (robometer-eval --params-file default)
    assert done.stdout.split()[3] == str(share / "config" / "reward_node.yaml")
