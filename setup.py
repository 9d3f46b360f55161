"""rexnet-serving: the ReXNet family from training to production serving on Paddle Serving."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "rexnet_serving", "__init__.py"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in rexnet_serving/__init__.py")


# Pins that install and run together (Paddle Serving 0.9.0 is the last release; its generated _pb2 files
# need protobuf 3.20, its server pins grpcio<=1.33.2, so Python 3.9 is the newest it runs on).
# paddle-serving-app==0.9.0 is installed separately with --no-deps (scripts/bootstrap.sh): it pins an
# opencv-python wheel that does not exist.
COMMON = [
    "paddle-serving-client==0.9.0",
    "numpy<2",
    "opencv-python-headless>=4,<5",
    "protobuf>=3.20,<3.21",
    "pillow>=9",
    "pyyaml>=5.4",
    "requests>=2.25",
    "tqdm>=4.60",
    "prometheus_client>=0.16",
]
EXTRAS = {
    "cpu": ["paddlepaddle==2.6.2", "paddle-serving-server==0.9.0"],
    # paddlepaddle-gpu 2.6.2 from PyPI is the CUDA 12 build; paddle-serving-server-gpu's CUDA (11.2 for
    # post112, the newest) matters only for the C++ Serving binary it downloads.
    "gpu": ["paddlepaddle-gpu==2.6.2", "paddle-serving-server-gpu==0.9.0.post112"],
    "test": ["pytest>=7", "pytest-timeout>=2"],
}

setup(
    name="rexnet-serving",
    version=read_version(),
    description="ReXNet (PaddleClas) training, export and serving on Paddle Serving",
    python_requires=">=3.9,<3.10",
    packages=find_packages(include=["rexnet_serving", "rexnet_serving.*"]),
    package_data={"rexnet_serving": ["data/*.txt"]},
    install_requires=COMMON,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "rexnet-convert=rexnet_serving.convert:main",
        ],
    },
)
