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


# Pins that install and run together on Python 3.11. Paddle Serving 0.9.0 (its last release) goes in
# afterwards without its metadata's dependencies, which pin 2020 releases with no wheels for 3.11
# (grpcio<=1.33.2, Flask 1): paddle-serving-server/app from scripts/no-deps-requirements.txt, the client
# from scripts/serving_client_wheel.py (scripts/bootstrap.sh, the Dockerfiles), which say why. What Paddle
# Serving imports from those dependencies is listed here (six, func_timeout, flask, grpcio).
COMMON = [
    # numpy 1.26 (the last 1.x): Paddle 2.6.2 was released against numpy 1.x; with numpy 2 it imports and
    # computes, but the stack (export, Paddle Inference, paddle2onnx) has not been validated on it.
    "numpy<2",
    "opencv-python-headless>=4,<5",  # 4.11.0.86: 4.12 and later need numpy >= 2
    # protobuf 6 runs the upb implementation; Paddle Serving's protoc-3.11-style _pb2 modules are loaded
    # from their descriptors by rexnet_serving/compat.py (why: there, and README "Python version").
    "protobuf==6.33.6",
    "grpcio==1.85.4",  # the gRPC front doors; >= 1.81.1 for tritonclient 2.73 (test extra)
    "pillow>=9",
    "pyyaml>=5.4",
    "requests>=2.25",
    "tqdm>=4.60",
    "prometheus_client>=0.16",
    "matplotlib>=3.5",  # rexnet-train: loss/accuracy curves (Agg backend)
    "psutil>=5.8",  # rexnet-bench: service RSS and CPU over its process tree
    "tornado==6.5.10",  # rexnet-serve's HTTP front door (pipelines/http_front.py)
    # imported by Paddle Serving 0.9.0 (pipeline ops, PipelineClient, web_service), installed --no-deps;
    # pytest too: paddle_serving_server.serve (which web_service imports) imports its env_check module
    "six>=1.16", "func_timeout==4.3.5", "flask>=3,<4", "pytest>=7",
]
FSSPEC, PYARROW = "fsspec==2025.10.0", "pyarrow==21.0.0"
EXTRAS = {
    # openvino: the CPU runtime (rexnet_serving/runtimes/openvino.py). The GPU images run Paddle Inference
    # only and do without it. Paddle Serving's server (the same Python code for CPU and GPU: the -gpu
    # package differs only in the C++ binary it downloads, which the GPU image does not run) comes from
    # scripts/no-deps-requirements.txt for both.
    "cpu": ["paddlepaddle==2.6.2", "openvino==2026.4.1"],
    # paddlepaddle-gpu 2.6.2 from PyPI is the CUDA 12 build.
    "gpu": ["paddlepaddle-gpu==2.6.2"],
    "onnx": ["paddle2onnx==1.3.1", "onnxruntime==1.19.2"],  # rexnet-export --onnx
    # rexnet-bench's documented-way baseline: paddle_serving_app.reader imports these at import time (the
    # --no-deps install of paddle-serving-app leaves them out); scikit-learn ships the benchmark photos.
    "bench": ["sentencepiece==0.2.1", "pyclipper==1.3.0.post6", "shapely==2.0.7", "scikit-learn>=1.0"],
    # Object storage for rexnet-predict/rexnet-batch inputs and outputs (rexnet_serving/runs/storage.py),
    # through fsspec and its maintained backends; chosen on Python 3.9, they resolve on 3.11 against the
    # protobuf 6 and numpy<2 pins above (gcsfs's google-api-core settles on 2.44 there).
    "s3": [FSSPEC, "s3fs==2025.10.0"],
    "gcs": [FSSPEC, "gcsfs==2025.10.0"],
    "azure": [FSSPEC, "adlfs==2025.8.0"],
    "parquet": [PYARROW],  # --format parquet (rexnet_serving/runs/output.py)
    # h2: the front-door tests' HTTP/2 rapid-reset probe (tests/probes.py); moto[server]: the S3 server
    # the sharded-run tests start on loopback (tests/test_shards.py); grimp: the import graph the
    # no-cycle test reads (tests/test_import_cycles.py; import-linter's engine)
    "test": ["pytest>=7", "pytest-timeout>=2", "scikit-learn>=1.0", "h2==4.2.0", "grimp>=3.13,<4",
             "paddle2onnx==1.3.1", "onnxruntime==1.19.2", "onnx==1.14.1",
             FSSPEC, "s3fs==2025.10.0", PYARROW, "moto[server]==5.1.22",
             # the official v2 clients the service is tested with, and the KServe API types the KServe
             # manifests are validated against (tests/conftest.py tool_python)
             "tritonclient[http,grpc]==2.73.0", "kserve==0.21.0"],
}

setup(
    name="rexnet-serving",
    version=read_version(),
    description="ReXNet (PaddleClas) training, export and serving on Paddle Serving",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["rexnet_serving", "rexnet_serving.*"]) + ["rexnet_train", "rexnet_pipelines"],
    package_data={"rexnet_serving": ["data/*.txt"], "rexnet_train": ["configs/*.yaml", "README.md"]},
    package_dir={"rexnet_train": "train",  # train/ in the repo, rexnet_train when installed
                 "rexnet_pipelines": "pipelines"},
    install_requires=COMMON,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "rexnet-convert=rexnet_serving.convert:main",
            "rexnet-export=rexnet_serving.export.cli:main",
            "rexnet-train=rexnet_train.cli:main",
            "rexnet-batch=rexnet_serving.clients.batch:main",
            "rexnet-predict=rexnet_serving.predict_cli:main",
            "rexnet-eval=rexnet_train.eval_cli:main",
            "rexnet-brpc=rexnet_serving.brpc.cli:main",
            "rexnet-serve=rexnet_pipelines.cli:main",
            "rexnet-classify=rexnet_serving.clients.classify_cli:main",
            "rexnet-bench=rexnet_serving.bench.cli:main",
        ],
    },
)
