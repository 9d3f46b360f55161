"""``rexnet-serve``: the ReXNet classification service (Paddle Serving Pipeline: HTTP + gRPC).

    rexnet-serve [--config serving_configs/cpu.yml] [--model-dir DIR | --model-repository DIR] [--host ADDR]
                 [--http-port N]
                 [--grpc-port N] [--metrics-port N] [--device cpu|gpu] [--runtime openvino|paddle]
                 [--precision P] [--workdir DIR] [--floor]
    rexnet-serve brpc ...   (the bRPC endpoint: rexnet_serving.brpc.cli)

Exit codes: 0 after a clean drain (SIGTERM/SIGINT), 1 when the service cannot start, 2 for a usage or
config error.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from rexnet_serving import defaults
from rexnet_serving.runtimes.base import PRECISIONS, RUNTIMES
from rexnet_serving.repository import scan_repository

from .config import ConfigError, ServingConfig, load_config

log = logging.getLogger("rexnet_serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-serve",
        description="Serve a ReXNet export over HTTP and gRPC (Paddle Serving Pipeline), with health "
                    "probes and Prometheus metrics. `rexnet-serve brpc --help` for the bRPC endpoint.")
    parser.add_argument("--config", type=Path, help="serving config file (default: serving_configs/cpu.yml, "
                                                    "or gpu.yml with --device gpu)")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model-dir", type=Path,
                        help=f"one exported model (default: op.infer.local_service_conf.model_config, else "
                             f"${defaults.MODEL_DIR_ENV}, else models/{defaults.DEFAULT_ARCH}, exported "
                             "on first start)")
    models.add_argument("--model-repository", type=Path,
                        help="serve every export under DIR: DIR/<name>/ (an export) or DIR/<name>/<version>/ "
                             "(the highest version unless rexnet.model_versions lists others); requests pick "
                             "one with the 'model' key, else rexnet.default_model")
    parser.add_argument("--host", help="address every port listens on (default rexnet.host: 0.0.0.0)")
    parser.add_argument("--http-port", type=int, help=f"HTTP port (default {defaults.HTTP_PORT})")
    parser.add_argument("--grpc-port", type=int, help=f"gRPC port (default {defaults.GRPC_PORT})")
    parser.add_argument("--metrics-port", type=int,
                        help=f"health and /metrics port (default {defaults.METRICS_PORT})")
    parser.add_argument("--oip-http-port", type=int, help=f"Open Inference Protocol (KServe v2) REST port "
                                                           f"(default {defaults.OIP_HTTP_PORT}; 0: off)")
    parser.add_argument("--oip-grpc-port", type=int, help=f"Open Inference Protocol (KServe v2) gRPC port "
                                                           f"(default {defaults.OIP_GRPC_PORT}; 0: off)")
    parser.add_argument("--device", choices=("cpu", "gpu"), help="run inference here (overrides the config)")
    parser.add_argument("--runtime", choices=RUNTIMES,
                        help="openvino (CPU) or paddle (Paddle Inference); overrides "
                             "op.infer.local_service_conf.runtime")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="fp32, bf16 (openvino) or fp16 (paddle, TensorRT); overrides "
                             "op.infer.local_service_conf.precision")
    parser.add_argument("--floor", action="store_true",
                        help="benchmark baseline: the same front doors and DAG with pass-through stages and "
                             "no model (rexnet-bench's framework floor; answers carry no predictions)")
    parser.add_argument("--workdir", type=Path, help="where Paddle Serving writes its logs (default: "
                                                     "a rexnet-serve-<grpc port> dir under the temp dir)")
    return parser


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    if args.http_port is not None:
        overrides["http_port"] = args.http_port
    if args.grpc_port is not None:
        overrides["rpc_port"] = args.grpc_port
    rexnet: Dict[str, Any] = {}
    if args.metrics_port is not None:
        rexnet["metrics_port"] = args.metrics_port
    for key in ("oip_http_port", "oip_grpc_port"):
        if getattr(args, key) is not None:
            rexnet[key] = getattr(args, key)
    if args.workdir is not None:
        rexnet["workdir"] = str(args.workdir)
    if args.host is not None:
        rexnet["host"] = args.host
    if rexnet:
        overrides["rexnet"] = rexnet
    service = {k: getattr(args, k) for k in ("runtime", "precision") if getattr(args, k) is not None}
    if service:
        overrides["op"] = {"infer": {"local_service_conf": service}}
    return overrides


def resolve_model_dir(explicit: Optional[Path], config: ServingConfig) -> Path:
    """The model to serve; the default one is exported first when it does not exist yet."""
    configured = explicit or config.inference.model_config
    if configured is not None:
        path = Path(configured)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"not an exported model directory: {path} (create one with rexnet-export)")
        return path.resolve()
    path = defaults.default_model_dir()
    if not (path / "manifest.json").is_file():
        from rexnet_serving.export import export_model
        log.info("no model at %s: exporting %s there first", path, defaults.DEFAULT_ARCH)
        export_model(defaults.DEFAULT_ARCH, path, weights=os.environ.get(defaults.WEIGHTS_ENV) or None,
                     overwrite=path.exists())
    return path.resolve()


def prepare_workdir(config: ServingConfig) -> Path:
    """Make the work dir and run there: Paddle Serving writes PipelineServingLogs/ and ProcessInfo.json
    into the current directory (and SERVING_HOME / SERVING_LOG_PATH) at import time."""
    configured = config.settings.workdir
    workdir = Path(configured) if configured else Path(tempfile.gettempdir()) / f"rexnet-serve-{config.rpc_port}"
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SERVING_HOME"] = str(workdir)
    os.environ["SERVING_LOG_PATH"] = str(workdir)
    os.chdir(workdir)
    return workdir


def _on_stop_signals(stop: threading.Event) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "brpc":
        from rexnet_serving.brpc.cli import main as brpc_main
        return brpc_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rexnet-serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler (Paddle's libraries add some) would print every line twice

    stop = threading.Event()
    _on_stop_signals(stop)
    try:
        config = load_config(args.config, _overrides(args), args.device)
    except ConfigError as exc:
        print(f"rexnet-serve: {exc}", file=sys.stderr)
        return 2
    try:
        root = args.model_repository or resolve_model_dir(args.model_dir, config)
        repository = scan_repository(root, config.settings.model_versions, config.settings.default_model)
    except (OSError, ValueError) as exc:
        print(f"rexnet-serve: {exc}", file=sys.stderr)
        return 1
    workdir = prepare_workdir(config)
    log.info("starting: models %s in %s, config %s, logs in %s", ", ".join(sorted(repository.models)),
             repository.root, config.source, workdir)
    from .server import RexnetServer  # after prepare_workdir: importing Paddle Serving writes logs
    import paddle
    # Paddle's C++ handlers turn SIGTERM into a "FatalError" abort; drain instead.
    paddle.disable_signal_handler()
    _on_stop_signals(stop)
    log.disabled = False  # Paddle Serving's logging.config.dictConfig disabled existing loggers
    # Paddle Serving logs several INFO lines per request into PipelineServingLogs/ (file I/O on the
    # request path); keep its warnings and errors only.
    logging.getLogger("paddle_serving_server").setLevel(logging.WARNING)
    logging.getLogger("paddle_serving_server.pipeline.operator").setLevel(logging.ERROR)  # per-request noise
    return RexnetServer(config, repository, stop, floor=args.floor).run()


if __name__ == "__main__":
    sys.exit(main())
