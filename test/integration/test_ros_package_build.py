"""The package builds as a ROS 2 workspace package would (colcon runs the same CMake steps).

The sources are copied out of the repository first, like `ws/src/robometer_ros`: the developer venv
lives inside the repository, and CMake refuses exported include paths inside the source tree.
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
def test_cmake_build_installs_a_complete_ros_package(tmp_path: Path):
    src, build, prefix = tmp_path / "src" / "robometer_ros", tmp_path / "build", tmp_path / "install"
    _copy_sources(src)
    env = {**os.environ, "AMENT_PREFIX_PATH": str(VENV)}
    for cmd in (
        ["cmake", "-S", src, "-B", build, f"-DCMAKE_INSTALL_PREFIX={prefix}", f"-DCMAKE_PREFIX_PATH={VENV}",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
        ["cmake", "--build", build, "-j2"],
        ["cmake", "--install", build],
    ):
        done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

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
        "print(robometer_ros.__file__, m.StepReward().reward_mode, EndEpisode.Request.OUTCOME_FAILURE)"
    )
    # Prepend, like `source install/setup.bash`: this process already carries the venv's library path.
    library_path = os.pathsep.join(p for p in (str(prefix / "lib"), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    run_env = {**env, "PYTHONPATH": str(site), "LD_LIBRARY_PATH": library_path,
               "AMENT_PREFIX_PATH": f"{prefix}:{VENV}", "ROBOMETER_ROS_INSTALLED_ONLY": "1"}
    done = subprocess.run([sys.executable, "-c", check], env=run_env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(site) in done.stdout and done.stdout.split()[1:] == ["0", "2"]
