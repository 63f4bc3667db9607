"""pip install for machines without ROS (training boxes, CI): model, engine and training code.

On a robot, build the package with colcon instead (package.xml / CMakeLists.txt); that also
generates robometer_ros.msg and installs the node executable.
"""

from setuptools import find_packages, setup

setup(
    name="robometer_ros",
    version="0.1.0",
    description="Robometer learned reward model for ROS 2 robots: engines, node and training",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["robometer_ros", "robometer_ros.*"]),
    package_data={"robometer_ros": ["py.typed"], "robometer_ros.model": ["*.jinja"],
                  "robometer_ros.training.data": ["*.yaml"]},
    install_requires=[
        "numpy>=1.24",
        "pillow",
        "simplejpeg>=1.9",
        "pyyaml",
        "tokenizers>=0.20",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "rosbags>=0.10",
    ],
    extras_require={
        "train": [
            "torch>=2.4",
            "transformers>=5.0",
            "safetensors",
            "onnxscript",
            "peft",
            "tensorboard",
            "tqdm",
            "matplotlib",
            "pyarrow",
            "av",
            "mcap>=1.6",
        ],
        "sim": ["metaworld==3.1.1", "mujoco==3.3.0", "packaging", "imageio", "gymnasium"],
        "tensorrt": ["tensorrt"],
    },
    entry_points={
        "console_scripts": [
            "robometer-dataset = robometer_ros.training.data.dataset_cli:main",
            "robometer-train = robometer_ros.training.recipe.trainer:main",
            "robometer-eval = robometer_ros.training.evaluation.evaluate:main",
            "robometer-score = robometer_ros.training.evaluation.score:main",
            "robometer-calibrate = robometer_ros.training.evaluation.calibrate:main",
            "robometer-filter-bc = robometer_ros.training.evaluation.filtering:main",
            "robometer-export = robometer_ros.training.export.onnx_export:main",
            "robometer-build-engines = robometer_ros.engine.tensorrt_build:main",
        ],
    },
)
