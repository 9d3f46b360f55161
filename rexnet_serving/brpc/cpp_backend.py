"""C++ Serving backend: an exported model behind Paddle Serving's own bRPC server binary.

The working directory (infer_service, workflow, resource, general_model and model_toolkit prototxt) is
written by Paddle Serving's Python API exactly as ``python -m paddle_serving_server.serve`` writes it
(paddle_serving_server/serve.py start_gpu_card_model: OpMaker/OpSeqMaker reader -> infer -> response,
Server.load_model_config, Server.prepare_server), and the binary gets the command line of
Server.run_server. What differs: the binary is never downloaded. Paddle Serving fetches it from its CDN on
first run (Server.download_bin); here it must be given by $SERVING_BIN or already unpacked where
download_bin would put it, otherwise this fails at once with one message saying how to provide it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from ..defaults import BRPC_PORT
from .framing import DEFAULT_MAX_BODY_SIZE

if TYPE_CHECKING:  # importing paddle_serving_server costs a second; only the functions need it
    from paddle_serving_server import Server

SERVING_VERSION = "0.9.0"
CDN = "https://paddle-serving.bj.bcebos.com/test-dev/bin"
DEFAULT_THREADS = 4  # paddle_serving_server.serve's --thread default


class BackendError(RuntimeError):
    """The backend cannot start (no binary, port taken, bad model dir); the message says why."""


@dataclass(frozen=True)
class BinaryLocation:
    """Where Paddle Serving's download_bin would unpack the binary package for this machine."""

    package: str  # e.g. serving-cpu-avx-mkl-0.9.0
    directory: Path

    @property
    def binary(self) -> Path:
        return self.directory / self.package / "serving"

    @property
    def url(self) -> str:
        return f"{CDN}/{self.package}.tar.gz"


def binary_location(server: "Server") -> BinaryLocation:
    """The package name download_bin would fetch (device build, AVX/MKL) and where it unpacks it."""
    from paddle_serving_server.version import version_tag
    return BinaryLocation(package=f"serving-{server.get_serving_bin_name()}-{version_tag}",
                          directory=Path(server.module_path))


def find_serving_binary(server: "Server") -> Path:
    """$SERVING_BIN if set (it must be an executable file), else the unpacked package; BackendError if none."""
    env = os.environ.get("SERVING_BIN")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendError(f"SERVING_BIN={env} is not an executable file; point it at the C++ Serving "
                               f"binary ('serving' from the paddle-serving-server {SERVING_VERSION} package)")
        return path
    location = binary_location(server)
    if location.binary.is_file() and os.access(location.binary, os.X_OK):
        return location.binary
    raise BackendError(
        f"no C++ Serving binary (rexnet-brpc never downloads one): set SERVING_BIN to a serving binary, "
        f"or unpack the paddle-serving-server {SERVING_VERSION} binary package {location.url} into "
        f"{location.directory} so that {location.binary} exists")


def build_server(serving_server_dir: Path, threads: int = DEFAULT_THREADS,
                 gpu_ids: Optional[str] = None,
                 max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> "Server":
    """A Server with the standard reader -> infer -> response workflow and the model's config loaded."""
    from paddle_serving_server import OpMaker, OpSeqMaker, Server

    from ..manifest import SERVER_CONF
    if not (serving_server_dir / SERVER_CONF).is_file():
        raise BackendError(f"{serving_server_dir}: no {SERVER_CONF} (not a Serving model)")
    op_maker = OpMaker()
    sequence = OpSeqMaker()
    for op in ("GeneralReaderOp", "GeneralInferOp", "GeneralResponseOp"):
        sequence.add_op(op_maker.create(op))
    server = Server()
    server.set_op_sequence(sequence.get_op_sequence())
    server.set_num_threads(threads)
    server.set_memory_optimize(True)
    server.set_max_body_size(max_body_size)
    if gpu_ids:
        # GPU build only (paddle-serving-server-gpu): engine.use_gpu + gpu_ids in model_toolkit.prototxt.
        server.set_device("gpu")
        try:
            server.set_gpuid(gpu_ids)
        except SystemExit:  # format_gpu_to_strlist exits when the ids are not in CUDA_VISIBLE_DEVICES
            raise BackendError(f"--gpu-ids {gpu_ids}: not in CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}") from None
        except ValueError as exc:
            raise BackendError(f"--gpu-ids {gpu_ids}: {exc}") from None
    else:
        server.set_device("cpu")
    server.load_model_config(str(serving_server_dir))
    return server


def prepare_workdir(server: "Server", workdir: Path,
                    port: int = BRPC_PORT) -> None:
    """Write the C++ Serving configs into ``workdir`` (Server.prepare_server); BackendError if the port is taken."""
    try:
        server.prepare_server(workdir=str(workdir), port=port, device=server.device)
    except SystemExit as exc:  # prepare_server exits the process when the port is in use
        raise BackendError(str(exc)) from None


def serving_command(server: "Server", binary: Path) -> List[str]:
    """The binary's argv, flag for flag as Server.run_server builds it (which runs it through a shell)."""
    workdir = server.workdir
    return [str(binary),
            "-enable_model_toolkit",
            "-inferservice_path", workdir, "-inferservice_file", server.infer_service_fn,
            "-max_concurrency", str(server.max_concurrency),
            "-num_threads", str(server.num_threads),
            "-port", str(server.port),
            "-precision", server.precision,
            f"-use_calib={server.use_calib}",
            "-reload_interval_s", str(server.reload_interval_s),
            "-resource_path", workdir, "-resource_file", server.resource_fn,
            "-workflow_path", workdir, "-workflow_file", server.workflow_fn,
            "-bthread_concurrency", str(server.num_threads),
            "-max_body_size", str(server.max_body_size)]


def model_serving_dir(model_dir: Path) -> Path:
    """``serving_server/`` of an export as verify_files resolved it (every file in it listed and
    checked), or ``model_dir`` if it is one itself: then the export around it, if any, is verified and
    ``model_dir`` must be that export's ``serving_server`` (a bare Paddle Serving model made elsewhere
    has no digests to check)."""
    from ..integrity import verify_files
    from ..manifest import MANIFEST_FILE, SERVER_CONF
    if (model_dir / SERVER_CONF).is_file():
        if not (model_dir.parent / MANIFEST_FILE).is_file():
            return model_dir.resolve()
        try:
            served = verify_files(model_dir.parent).serving_server_dir
        except (OSError, ValueError) as exc:
            raise BackendError(f"{model_dir.parent}: {exc}") from None
        if served != model_dir.resolve():
            raise BackendError(f"{model_dir}: not the serving_server of the export around it (its manifest "
                               f"names {served}); pass the export directory {model_dir.parent}")
        return served
    try:
        return verify_files(model_dir).serving_server_dir
    except (OSError, ValueError, KeyError) as exc:
        raise BackendError(f"{model_dir}: not an exported model ({exc})") from None


def run(model_dir: Path, port: int = BRPC_PORT, gpu_ids: Optional[str] = None,
        threads: int = DEFAULT_THREADS, workdir: Optional[Path] = None, prepare_only: bool = False) -> int:
    """Find the binary (before touching anything), prepare the workdir, then exec the binary.

    Returns only with ``prepare_only`` (after printing the command) or on an error; otherwise this
    process becomes the C++ server, so signals sent to it reach the server directly.
    """
    serving_dir = model_serving_dir(Path(model_dir))
    server = build_server(serving_dir, threads=threads, gpu_ids=gpu_ids)
    binary = None if prepare_only else find_serving_binary(server)
    workdir = Path(workdir) if workdir is not None else Path(f"workdir_{port}")
    prepare_workdir(server, workdir.resolve(), port)
    command = serving_command(server, binary or Path(os.environ.get("SERVING_BIN") or
                                                     binary_location(server).binary))
    print(f"C++ Serving configs written to {workdir}; "
          f"{'command' if prepare_only else 'running'}: {' '.join(command)}", flush=True)
    if prepare_only:
        return 0
    sys.stderr.flush()
    os.execv(command[0], command)
    return 1  # not reached: execv replaces this process or raises OSError

