"""``rexnet-bench``: load-test the ReXNet service over HTTP, gRPC and bRPC next to two baselines, in one run.

    rexnet-bench [--model-dir DIR] [--protocols http,grpc,brpc] [--concurrency 1,2,4,8,16]
                 [--duration S] [--warmup S] [--rate auto|R1,R2] [--arrivals poisson|uniform]
                 [--images DIR] [--out DIR] [--baselines inprocess,documented] [--batches 1,2,4,8,16]
                 [--runtime-batches 1,8] [--compare-serve-runtime paddle] [--serve-args "..."]
                 [--brpc-args "..."] [--quick]

Phases, one after another so that none competes with another for the CPU: the load generator against
instant servers (its own ceiling and CPU cost), the in-process limit (with the CPU service's runtime, then
every CPU runtime side by side: Paddle Inference + oneDNN, OpenVINO FP32, OpenVINO BF16), rexnet-serve
(HTTP, gRPC; with the runtime of its config, and with --compare-serve-runtime once more on that runtime,
reported as http@<runtime>), rexnet-brpc native, and PaddleClas's documented Paddle Serving example.
Each service runs as its own process group on free ports and is stopped before the next phase. Writes
bench.json, bench.md and bench.png into --out.

Exit codes: 0 every phase ran, 1 a phase failed (a server did not start, ...; the others still ran and
are reported), 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from .. import defaults
from ..runtimes.base import RUNTIMES
from .loadgen import ARRIVALS, RunResult, closed_loop, open_loop
from .payloads import PayloadError, describe, generate_photos, load_payloads
from .servers import IMAGES_PER_REQUEST

PROTOCOLS = ("http", "grpc", "brpc", "v2-http", "v2-grpc")
PIPELINE_PROTOCOLS = ("http", "grpc")  # rexnet-serve's own; the floor and the runtime comparison use these
V2_PROTOCOLS = ("v2-http", "v2-grpc")  # rexnet-serve's Open Inference Protocol ports
BASELINES = ("inprocess", "floor", "documented")
QUICK = {"duration": 4.0, "warmup": 2.0, "concurrency": [1, 8], "batches": [1, 8], "inprocess_seconds": 2.0,
         "calibration_seconds": 2.0}
FULL = {"duration": 15.0, "warmup": 3.0, "concurrency": [1, 2, 4, 8, 16], "batches": [1, 2, 4, 8, 16],
        "inprocess_seconds": 4.0, "calibration_seconds": 4.0}
AUTO_RATE_FRACTIONS = (0.5, 0.9)  # --rate auto: these fractions of the protocol's best closed-loop req/s
CALIBRATION_CLIENTS = 8


def _choices(allowed: Sequence[str], allow_empty: bool = False) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if values == ["none"] and allow_empty:
            return []
        bad = [v for v in values if v not in allowed]
        if bad or (not values and not allow_empty):
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}"
                                             + (" (or none)" if allow_empty else ""))
        return values
    return parse


def _positive_ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def _rates(text: str) -> Any:
    if text.strip() in ("auto", "none"):
        return text.strip()
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or positive requests/s like 20,40, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-bench",
        description="Benchmark the ReXNet service over HTTP, gRPC and bRPC (closed and open loop) against the "
                    "in-process limit and PaddleClas's documented Paddle Serving example, in one run. Writes "
                    "bench.json, bench.md and bench.png.")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"exported model (default ${defaults.MODEL_DIR_ENV}, else models/{defaults.DEFAULT_ARCH}, "
                             "exported with random weights first if missing)")
    parser.add_argument("--protocols", type=_choices(PROTOCOLS, allow_empty=True), default=list(PROTOCOLS),
                        help="service protocols to load, comma-separated, or none (default %(default)s)")
    parser.add_argument("--concurrency", type=_positive_ints, default=None,
                        help="closed-loop client counts (default 1,2,4,8,16; --quick 1,8)")
    parser.add_argument("--duration", type=_positive_float, default=None,
                        help="measured seconds per load point (default 15; --quick 4)")
    parser.add_argument("--warmup", type=_non_negative_float, default=None,
                        help="discarded seconds before each load point (default 3; --quick 2)")
    parser.add_argument("--rate", type=_rates, default=None,
                        help="open-loop requests/s per protocol, comma-separated; 'auto' = 50%% and 90%% of the "
                             "protocol's best closed-loop rate; 'none' (default auto; --quick none)")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="open-loop arrival process")
    parser.add_argument("--max-outstanding", type=int, default=64,
                        help="open loop: clients, i.e. most requests in flight at once (default %(default)s)")
    parser.add_argument("--images", type=Path, default=None,
                        help="directory of images to send (default: real photos generated into OUT/images)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory (default %(default)s)")
    parser.add_argument("--baselines", type=_choices(BASELINES, allow_empty=True), default=list(BASELINES),
                        help="baselines to measure, comma-separated, or none (default %(default)s)")
    parser.add_argument("--batches", type=_positive_ints, default=None,
                        help="in-process batch sizes to sweep (default 1,2,4,8,16; --quick 1,8)")
    parser.add_argument("--runtime-batches", type=_positive_ints, default=[1, 8],
                        help="batch sizes of the in-process runtime comparison (default 1,8)")
    parser.add_argument("--compare-serve-runtime", choices=RUNTIMES, default=None,
                        help="measure rexnet-serve a second time with --runtime this (e.g. paddle against "
                             "cpu.yml's openvino); its points are http@<runtime>, grpc@<runtime>")
    parser.add_argument("--no-calibration", action="store_true",
                        help="skip measuring the load generator against instant servers")
    parser.add_argument("--serve-args", default="",
                        help="extra rexnet-serve arguments, e.g. \"--config my.yml\" (quoted)")
    parser.add_argument("--brpc-args", default="",
                        help="extra rexnet-brpc native arguments, e.g. \"--workers 2 --cpu-threads 1\"")
    parser.add_argument("--timeout", type=_positive_float, default=30.0, help="per-request timeout (s)")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: concurrency 1,8, short points, in-process batches 1,8, no open loop")
    return parser


class Bench:
    """One benchmark run: its settings, payloads and the result being collected."""

    def __init__(self, args: argparse.Namespace, settings: Dict[str, Any], model_dir: Path,
                 payloads: List[bytes], result: Dict[str, Any]) -> None:
        self.args = args
        self.settings = settings
        self.model_dir = model_dir
        self.payloads = payloads
        self.result = result
        self.work = args.out / "logs"
        self.bar: Optional[tqdm] = None

    def fail(self, phase: str, exc: BaseException) -> None:
        message = f"{phase}: {type(exc).__name__}: {exc}"
        self.result["failures"].append(message)
        tqdm.write(f"rexnet-bench: {message}", file=sys.stderr)

    def load_point(self, target: str, factory: Any, mode: str, level: float, server_pid: Optional[int],
                   metrics_url: Optional[str] = None, record: bool = True) -> Dict[str, Any]:
        from .monitor import Monitor
        s = self.settings
        if self.bar is not None:
            self.bar.set_description(f"{target} {mode} {level:g}")
        with Monitor(server_pid, metrics_url) as monitor:
            if mode == "closed":
                run: RunResult = closed_loop(factory, self.payloads, int(level), s["duration"], s["warmup"], monitor)
            else:
                run = open_loop(factory, self.payloads, level, s["duration"], s["warmup"], self.args.arrivals,
                                self.args.max_outstanding, monitor)
        point = {"target": target, "mode": mode, "level": level, **run.summary(), **monitor.result}
        per_request = IMAGES_PER_REQUEST.get(target, 1)
        if per_request != 1:
            point["images_per_request"] = per_request
            point["images_per_s"] = round(point["images_per_s"] * per_request, 2)
        if mode == "open":
            point["arrivals"] = self.args.arrivals
        if point["requests"]:
            point["loadgen_ms_per_request"] = round(monitor.result.get("loadgen_cpu_s", 0.0) * 1000
                                                    / point["requests"], 3)
        if record:
            self.result["points"].append(point)
        if self.bar is not None:
            self.bar.update(1)
        return point

    def serve_and_load(self, name: str, server: Any, loads: List[tuple], metrics_url: Optional[str] = None) -> None:
        """Start ``server``, run the closed-loop points (and open-loop ones), record RSS, stop it."""
        from . import servers
        from .monitor import scrape_runtime, tree_rss_bytes
        started = time.monotonic()
        with server:
            info = {"startup_s": round(time.monotonic() - started, 1),
                    "rss_idle_mb": round(tree_rss_bytes(server.pid) / 2**20, 1)}
            if metrics_url:
                info["runtime"] = scrape_runtime(metrics_url)
            self.result["servers"][name] = info
            for target, address in loads:  # target: a protocol, or protocol@runtime
                factory = servers.sender_for(target.partition("@")[0], address, self.args.timeout, self.payloads,
                                             model=self.model_dir.name)
                for concurrency in self.settings["concurrency"]:
                    self.load_point(target, factory, "closed", concurrency, server.pid, metrics_url)
                for rate in self.open_rates(target):
                    self.load_point(target, factory, "open", rate, server.pid, metrics_url)
        peaks = [p.get("server_rss_peak_mb") for p in self.result["points"]
                 if p["target"] in [t for t, _ in loads] and p.get("server_rss_peak_mb") is not None]
        info["rss_peak_mb"] = max(peaks + [info["rss_idle_mb"]])

    def open_rates(self, target: str) -> List[float]:
        rates = self.settings["rate"]
        if rates == "none" or target == "documented":
            return []
        if rates == "auto":
            from .report import best_rate
            best = best_rate(self.result, target)
            return [round(best * f, 1) for f in AUTO_RATE_FRACTIONS] if best else []
        return list(rates)

    def point_count(self) -> int:
        s = self.settings
        per_target = len(s["concurrency"]) + (0 if s["rate"] == "none" else
                                              len(AUTO_RATE_FRACTIONS) if s["rate"] == "auto" else len(s["rate"]))
        count = len(self.args.protocols) * per_target
        serve_protocols = len(set(PIPELINE_PROTOCOLS) & set(self.args.protocols))
        count += per_target if "http" in self.args.protocols else 0  # http-x8
        if "floor" in self.args.baselines:
            count += serve_protocols * per_target
        if self.args.compare_serve_runtime:
            count += serve_protocols * per_target
        if "documented" in self.args.baselines:
            count += len(s["concurrency"])
        if not self.args.no_calibration:
            count += len([p for p in self.args.protocols if p not in V2_PROTOCOLS])
        return count

    # -- phases ------------------------------------------------------------------------------------------
    def calibrate(self) -> None:
        from . import servers
        self.result["calibration"] = []
        saved = dict(self.settings)
        self.settings.update(duration=self.settings["calibration_seconds"], warmup=1.0)
        try:
            for protocol in [p for p in self.args.protocols if p not in V2_PROTOCOLS]:  # no instant v2 server
                port = servers.free_port()
                try:
                    with servers.fake_server(protocol, port, self.work, self.payloads[0]) as fake:
                        point = self.load_point(f"fake-{protocol}", servers.sender_for(protocol, f"127.0.0.1:{port}", 10.0, self.payloads),
                                                "closed", CALIBRATION_CLIENTS, fake.pid, record=False)
                    point["protocol"] = protocol
                    self.result["calibration"].append(point)
                except Exception as exc:  # noqa: BLE001 - report and go on with the real phases
                    self.fail(f"calibration ({protocol})", exc)
        finally:
            self.settings.update(duration=saved["duration"], warmup=saved["warmup"])

    def inprocess(self) -> None:
        if self.bar is not None:
            self.bar.set_description("in-process limit")
        images_dir = self.settings["images_dir"]
        argv = [sys.executable, "-m", "rexnet_serving.bench.inprocess", "--model-dir", str(self.model_dir),
                "--images", str(images_dir), "--batches", ",".join(map(str, self.settings["batches"])),
                "--seconds", str(self.settings["inprocess_seconds"])]
        self.result["inprocess"] = self._json_from(argv, self.work / "inprocess.log")
        argv = [sys.executable, "-m", "rexnet_serving.bench.runtime_compare",
                "--model-dir", str(self.model_dir),
                "--images", str(images_dir), "--batches", ",".join(map(str, self.args.runtime_batches)),
                "--seconds", str(self.settings["inprocess_seconds"])]
        self.result["runtimes"] = self._json_from(argv, self.work / "runtimes.log")

    @staticmethod
    def _json_from(argv: List[str], log: Path) -> Any:
        """Run a measuring module in its own process; its last stdout line is its JSON result."""
        with log.open("wb") as err:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}; see {log}")
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])

    def pipeline(self, floor: bool = False, runtime: Optional[str] = None) -> None:
        """rexnet-serve under load; with ``floor``, the same service with no model (rexnet-serve --floor:
        same front doors, same DAG, pass-through stages), whose latency is the framework's floor; with
        ``runtime``, rexnet-serve --runtime that one (targets ``http@<runtime>``, ``grpc@<runtime>``)."""
        from . import servers
        main_run = not floor and not runtime
        v2 = [p for p in V2_PROTOCOLS if p in self.args.protocols] if main_run else []
        ports = servers.PipelinePorts.free(v2=bool(v2))
        name, prefix = ("floor", "floor-") if floor else ("pipeline", "")
        suffix = f"@{runtime}" if runtime else ""
        extra = (shlex.split(self.args.serve_args) + (["--floor"] if floor else [])
                 + (["--runtime", runtime] if runtime else []))
        server = servers.pipeline_server(self.model_dir, ports, self.work, self.payloads[0], self.args.timeout,
                                         extra, name + suffix)
        targets = [p for p in PIPELINE_PROTOCOLS if p in self.args.protocols] + v2
        if main_run and "http" in self.args.protocols:
            targets.append("http-x8")
        loads = [(prefix + t + suffix, f"127.0.0.1:{ports.of(t)}") for t in targets]
        self.serve_and_load(name + suffix, server, loads, f"http://127.0.0.1:{ports.metrics}/metrics")

    def floor(self) -> None:
        self.pipeline(floor=True)

    def brpc(self) -> None:
        from . import servers
        port = servers.free_port()
        server = servers.brpc_server(self.model_dir, port, self.work, self.payloads[0], self.args.timeout,
                                     shlex.split(self.args.brpc_args))
        self.serve_and_load("brpc", server, [("brpc", f"127.0.0.1:{port}")])

    def documented(self) -> None:
        from . import servers
        port = servers.free_port()
        server = servers.documented_server(self.model_dir, port, self.work, self.payloads[0], self.args.timeout)
        self.serve_and_load("documented", server, [("documented", f"127.0.0.1:{port}")])


def resolve_model_dir(explicit: Optional[Path]) -> Path:
    path = explicit or defaults.default_model_dir()
    if (path / "manifest.json").is_file():
        return path.resolve()
    if explicit is not None:
        raise FileNotFoundError(f"--model-dir {path}: not an exported model directory (no manifest.json; "
                                "create one with rexnet-export)")
    from ..export import export_model
    tqdm.write(f"rexnet-bench: no model at {path}: exporting {defaults.DEFAULT_ARCH} there (random weights)",
               file=sys.stderr)
    export_model(defaults.DEFAULT_ARCH, path, overwrite=path.exists())
    return path.resolve()


def settings_from(args: argparse.Namespace) -> Dict[str, Any]:
    base = dict(QUICK if args.quick else FULL)
    if args.duration is not None:
        base["duration"] = args.duration
    if args.warmup is not None:
        base["warmup"] = args.warmup
    if args.concurrency is not None:
        base["concurrency"] = sorted(set(args.concurrency))
    if args.batches is not None:
        base["batches"] = sorted(set(args.batches))
    base["rate"] = args.rate if args.rate is not None else ("none" if args.quick else "auto")
    return base


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    found = {"python": platform.python_version()}
    for key, distribution in (("paddle", "paddlepaddle"), ("openvino", "openvino")):
        try:
            found[key] = version(distribution)
        except PackageNotFoundError:  # a missing distribution only blanks the field
            found[key] = "unknown"
    return found


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_outstanding < 1:
        parser.error(f"--max-outstanding must be >= 1, got {args.max_outstanding}")
    for option, text in (("--serve-args", args.serve_args), ("--brpc-args", args.brpc_args)):
        try:
            shlex.split(text)
        except ValueError as exc:
            parser.error(f"{option}: {exc}")
    settings = settings_from(args)
    try:
        model_dir = resolve_model_dir(args.model_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "logs").mkdir(exist_ok=True)
        images_dir = args.images if args.images is not None else args.out / "images"
        if args.images is None:
            generate_photos(images_dir)
        loaded = load_payloads(images_dir)
    except (OSError, PayloadError, ValueError) as exc:
        print(f"rexnet-bench: {exc}", file=sys.stderr)
        return 1
    settings["images_dir"] = images_dir.resolve()

    from ..manifest import load_manifest
    from .monitor import machine_description
    from .report import check_targets, markdown, plot, write_json
    manifest = load_manifest(model_dir)
    result: Dict[str, Any] = {
        "meta": {"command": " ".join(["rexnet-bench"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                  else argv)]),
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_description(),
                 **_versions(), "duration_s": settings["duration"], "warmup_s": settings["warmup"],
                 "model": {"arch": manifest.arch, "input_size": manifest.input_size, "random_init": manifest.random_init,
                           "dir": str(model_dir)},
                 "images": describe(loaded)},
        "points": [], "servers": {}, "failures": []}
    bench = Bench(args, settings, model_dir, [p.data for p in loaded], result)

    phases: List[tuple] = []
    if not args.no_calibration and args.protocols:
        phases.append(("calibration", bench.calibrate))
    if "inprocess" in args.baselines:
        phases.append(("in-process baseline", bench.inprocess))
    if set(PIPELINE_PROTOCOLS + V2_PROTOCOLS) & set(args.protocols):
        phases.append(("rexnet-serve", bench.pipeline))
        if args.compare_serve_runtime:
            phases.append((f"rexnet-serve --runtime {args.compare_serve_runtime}",
                           lambda: bench.pipeline(runtime=args.compare_serve_runtime)))
    if set(PIPELINE_PROTOCOLS) & set(args.protocols) and "floor" in args.baselines:
        phases.append(("framework floor", bench.floor))
    if "brpc" in args.protocols:
        phases.append(("rexnet-brpc", bench.brpc))
    if "documented" in args.baselines:
        phases.append(("documented way", bench.documented))
    # SIGTERM (kill, a CI timeout) ends the run as Ctrl-C does, so the servers it started are stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    with tqdm(total=bench.point_count(), unit="point", file=sys.stderr) as bar:
        bench.bar = bar
        for name, phase in phases:
            try:
                phase()
            except KeyboardInterrupt:
                bench.fail(name, RuntimeError("interrupted"))
                break
            except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the others' numbers
                bench.fail(name, exc)

    import os
    result["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = check_targets(result)
    write_json(result, args.out / "bench.json")
    (args.out / "bench.md").write_text(markdown(result), encoding="utf-8")
    if result["points"]:
        plot(result, args.out / "bench.png")
    print(f"rexnet-bench: wrote {args.out / 'bench.md'}, bench.json" + (", bench.png" if result["points"] else ""))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
