"""rexnet-brpc: serve an exported ReXNet model over bRPC (baidu_std), natively or via C++ Serving.

  rexnet-brpc [native] --model-dir DIR [--port 9393] [--host 127.0.0.1] [--workers N]
              [--runtime openvino|paddle] [--precision fp32|bf16|fp16] [limits]
      the Python GeneralModelService endpoint (rexnet_serving.brpc.server); the default subcommand;
      OpenVINO FP32 on the CPU unless told otherwise, Paddle Inference on a GPU; its limits
      (connections, requests per connection, idle and read timeouts, body size) have flags
  rexnet-brpc cpp --model-dir DIR [--port 9393] [--gpu-ids 0] [--thread N] [--workdir D]
      Paddle Serving's C++ server (rexnet_serving.brpc.cpp_backend); needs $SERVING_BIN or the unpacked
      binary package, never downloads it

Exit codes: 0 stopped cleanly, 1 failure (no binary, port taken, model not loadable), 2 usage error.
``rexnet-serve brpc ...`` delegates here with ``main(argv)``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from ..defaults import BRPC_PORT, default_model_dir
from ..runtimes import default_runtime
from ..runtimes.base import PRECISIONS, RUNTIMES, OptionError, check_runtime_options, runtime_info
from . import framing
from .server import ServerOptions

SUBCOMMANDS = ("native", "cpp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-brpc",
        description="Serve an exported ReXNet model as Paddle Serving's GeneralModelService over bRPC "
                    "(baidu_std). Without a subcommand, 'native' runs.")
    sub = parser.add_subparsers(dest="command", metavar="{native,cpp}")

    native = sub.add_parser("native", help="the Python bRPC endpoint (default)",
                            description="Serve GeneralModelService/inference from Python: tensor feeds as "
                                        "paddle_serving_client.Client sends them, or encoded images.")
    _model_dir(native)
    native.add_argument("--port", type=int, default=BRPC_PORT, help="TCP port (default %(default)s)")
    native.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface (default %(default)s)")
    native.add_argument("--workers", type=int, default=2,
                        help="inference threads, each with its own predictor (default %(default)s)")
    native.add_argument("--cpu-threads", type=int, default=1,
                        help="math threads per predictor (default %(default)s)")
    native.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="inference device (gpu needs paddlepaddle-gpu; default %(default)s)")
    native.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="openvino (CPU only) or paddle (Paddle Inference: CPU with oneDNN, GPU, "
                             "TensorRT); default openvino on the CPU, paddle on a GPU")
    native.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32; bf16 with openvino on a CPU that has BF16; fp16 = TensorRT with paddle "
                             "on a GPU (default %(default)s)")
    native.add_argument("--gpu-id", type=int, default=0, help="GPU for --device gpu (default %(default)s)")
    native.add_argument("--max-concurrency", type=int, default=256,
                        help="requests queued or running before ELIMIT refusals (default %(default)s)")
    native.add_argument("--max-body-size", type=int, default=framing.DEFAULT_MAX_BODY_SIZE,
                        help="largest frame body in bytes, as bRPC's -max_body_size (default %(default)s)")
    native.add_argument("--max-images", type=int, default=64,
                        help="encoded images per request (default %(default)s)")
    defaults = ServerOptions()
    native.add_argument("--max-request-pixels", type=int, default=defaults.max_request_pixels,
                        help="decoded pixels of all images of one request together, checked from their "
                             "headers before decoding; past it, EREQUEST request_too_large (default "
                             "%(default)s: one request stays under a 512 MB peak-memory budget)")
    native.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections; one more is closed as soon as it is accepted "
                             "(default %(default)s)")
    native.add_argument("--max-requests-per-connection", type=int,
                        default=defaults.max_requests_per_connection,
                        help="requests in flight on one connection; one more gets ELIMIT at once "
                             "(default %(default)s)")
    native.add_argument("--max-buffered-bytes", type=int, default=defaults.max_buffered_bytes,
                        help="request bodies held at once (being read, queued or running); a frame "
                             "whose body would pass it is read past unkept and gets ELIMIT "
                             "(default %(default)s)")
    native.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout,
                        help="seconds a connection with nothing in flight may send nothing before it "
                             "is closed (default %(default)s)")
    native.add_argument("--read-timeout", type=float, default=defaults.read_timeout,
                        help="seconds a frame may take to arrive once its first byte came; then the "
                             "connection is closed (default %(default)s)")

    cpp = sub.add_parser("cpp", help="Paddle Serving's C++ server (needs the serving binary)",
                         description="Prepare the C++ Serving working directory with Paddle Serving's own "
                                     "API and run its binary ($SERVING_BIN, or the unpacked 0.9.0 binary "
                                     "package; nothing is downloaded).")
    _model_dir(cpp)
    cpp.add_argument("--port", type=int, default=BRPC_PORT, help="TCP port (default %(default)s)")
    cpp.add_argument("--gpu-ids", default=None,
                     help="GPU id(s) such as 0 or 0,1 (needs paddle-serving-server-gpu); CPU when absent")
    cpp.add_argument("--thread", type=int, default=4, help="server threads (default %(default)s)")
    cpp.add_argument("--workdir", type=Path, default=None,
                     help="where the generated configs go (default ./workdir_<port>, as Paddle Serving)")
    cpp.add_argument("--prepare-only", action="store_true",
                     help="write the configs and print the command, do not run the binary")
    return parser


def _model_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="exported model directory (rexnet-export; default $REXNET_MODEL_DIR or "
                             "models/<arch>)")


def _with_default_command(argv: List[str]) -> List[str]:
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["native"] + argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    # grpcio-tools 1.33 (imported by paddle_serving_client) warns about pkg_resources on every start:
    # noise in front of this tool's one-line errors.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    args = build_parser().parse_args(_with_default_command(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = args.model_dir if args.model_dir is not None else default_model_dir()
    if not 0 <= args.port <= 65535:
        print(f"rexnet-brpc: error: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.command == "cpp":
        return _run_cpp(args, model_dir)
    return _run_native(args, model_dir)


def _run_cpp(args: argparse.Namespace, model_dir: Path) -> int:
    from .cpp_backend import BackendError, run
    if args.thread < 1:
        print(f"rexnet-brpc: error: --thread must be >= 1, got {args.thread}", file=sys.stderr)
        return 2
    try:
        return run(model_dir, port=args.port, gpu_ids=args.gpu_ids, threads=args.thread,
                   workdir=args.workdir, prepare_only=args.prepare_only)
    except BackendError as exc:
        print(f"rexnet-brpc cpp: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # execv of a binary that cannot run here (wrong architecture, missing libs)
        print(f"rexnet-brpc cpp: cannot run the serving binary: {exc}", file=sys.stderr)
        return 1


def _run_native(args: argparse.Namespace, model_dir: Path) -> int:
    from .server import NativeServer
    from .service import ModelService
    runtime = args.runtime or default_runtime(args.device)
    try:
        options = ServerOptions(host=args.host, port=args.port, workers=args.workers,
                                cpu_threads=args.cpu_threads, max_concurrency=args.max_concurrency,
                                max_body_size=args.max_body_size, max_images=args.max_images,
                                max_request_pixels=args.max_request_pixels,
                                max_connections=args.max_connections,
                                max_buffered_bytes=args.max_buffered_bytes,
                                max_requests_per_connection=args.max_requests_per_connection,
                                idle_timeout=args.idle_timeout, read_timeout=args.read_timeout)
        check_runtime_options(runtime, args.precision, args.device)
    except OptionError as exc:
        print(f"rexnet-brpc: error: --{exc.option}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rexnet-brpc: error: {exc}", file=sys.stderr)
        return 2
    try:
        service = ModelService(model_dir, cpu_threads=options.cpu_threads, max_images=options.max_images,
                               device=args.device, gpu_id=args.gpu_id,
                               max_request_pixels=options.max_request_pixels, runtime=runtime,
                               precision=args.precision, streams=options.workers)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"rexnet-brpc: cannot load the model in {model_dir}: {exc}", file=sys.stderr)
        return 1
    used = runtime_info(service.classifier.model)
    print(f"rexnet-brpc: inference: {used['runtime']} {used['precision']} on {used['device']}, "
          f"{options.workers} worker(s)", file=sys.stderr, flush=True)
    server = NativeServer(service, options)
    try:
        server.serve_forever(handle_signals=True)
    except OSError as exc:
        print(f"rexnet-brpc: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
