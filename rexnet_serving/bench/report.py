"""The benchmark's outputs: bench.json (everything measured), bench.md (the tables and the target check)
and bench.png (throughput and p99 latency against concurrency, Matplotlib's Agg backend: no display)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

# Targets for ReXNet_1_0 on the CPU (the issue's acceptance numbers; reported, not enforced).
TARGET_CONCURRENCY = 8
# The targets of the serving-overhead work (issue 11), against the in-process limit on the same runtime.
SINGLE_LATENCY_MARGIN_MS = {"http": 8.0, "grpc": 6.0}
VS_INPROCESS = {"http": 0.75, "grpc": 0.8, "http-x8": 0.9, "brpc": 0.9}
P99_OVER_P50 = 2.0
HTTP_VS_DOCUMENTED = 3.0
MAX_RSS_MB = 1536.0
OPENVINO_VS_PADDLE_INPROCESS = 1.3   # in-process OpenVINO FP32 / Paddle Inference + oneDNN, batch 1
OPENVINO_VS_PADDLE_SERVICE = 1.25    # HTTP service at its best concurrency, on OpenVINO FP32 / on Paddle

LABELS = {"http": "HTTP (rexnet-serve)", "grpc": "gRPC (rexnet-serve)", "brpc": "bRPC (rexnet-brpc native)",
          "http-x8": "HTTP, 8 images per request", "v2-http": "v2 REST (Open Inference Protocol)",
          "v2-grpc": "v2 gRPC (Open Inference Protocol, raw image bytes)", "floor-http": "framework floor, HTTP (no model)",
          "floor-grpc": "framework floor, gRPC (no model)", "documented": "documented way (PaddleClas example)"}


def label(target: str) -> str:
    """A target's name in tables and plots; ``http@paddle`` is the HTTP service run with --runtime paddle."""
    base, _, runtime = target.partition("@")
    return LABELS.get(base, base) + (f" on {runtime}" if runtime else "")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def closed_points(result: Dict[str, Any], target: str) -> List[Dict[str, Any]]:
    return sorted((p for p in result.get("points", []) if p["target"] == target and p["mode"] == "closed"),
                  key=lambda p: p["level"])


def point_at(result: Dict[str, Any], target: str, concurrency: int) -> Optional[Dict[str, Any]]:
    """The closed-loop point at ``concurrency``, else the highest one below it, else None."""
    points = [p for p in closed_points(result, target) if p["level"] <= concurrency]
    return points[-1] if points else None


def best_rate(result: Dict[str, Any], target: str) -> Optional[float]:
    points = closed_points(result, target)
    return max(p["images_per_s"] for p in points) if points else None


def check_targets(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target with what was measured and whether it was met (None: not measured in this run)."""
    checks: List[Dict[str, Any]] = []

    def add(name: str, measured: Optional[float], goal: str, met: Optional[bool]) -> None:
        checks.append({"target": name, "measured": measured, "goal": goal, "met": met})

    inproc = result.get("inprocess") or {}
    limit = (inproc.get("project_best") or {}).get("images_per_s")
    single = inproc.get("project_single_p50_ms")
    for target, margin in SINGLE_LATENCY_MARGIN_MS.items():
        point = point_at(result, target, 1)
        if point and point["level"] == 1 and single and point.get("p50_ms") is not None:
            extra = point["p50_ms"] - single
            add(f"{target} p50 at 1 client minus in-process single image ({single:.1f} ms)", round(extra, 1),
                f"<= {margin:g} ms", extra <= margin)
    for target, goal in VS_INPROCESS.items():
        best = best_rate(result, target)
        if best and limit:
            add(f"{target} img/s at its best concurrency / in-process best ({limit:.1f} img/s)",
                round(best / limit, 2), f">= {goal}", best / limit >= goal)
    v2, pipeline_grpc = best_rate(result, "v2-grpc"), best_rate(result, "grpc")
    if v2 and pipeline_grpc:
        add(f"v2 gRPC best img/s / Pipeline gRPC best ({pipeline_grpc:.1f} img/s)", round(v2 / pipeline_grpc, 2),
            ">= 1.0", v2 / pipeline_grpc >= 1.0)
    for target in ("http", "grpc"):
        point = point_at(result, target, TARGET_CONCURRENCY)
        if point and point.get("p50_ms") and point.get("p99_ms") is not None:
            ratio = point["p99_ms"] / point["p50_ms"]
            add(f"{target} p99 / p50 at {point['level']} clients", round(ratio, 2), f"<= {P99_OVER_P50:g}",
                ratio <= P99_OVER_P50)
    http, documented = best_rate(result, "http"), best_rate(result, "documented")
    if http and documented:
        add(f"HTTP best img/s / documented way's best ({documented:.1f} img/s)", round(http / documented, 2),
            f">= {HTTP_VS_DOCUMENTED}", http / documented >= HTTP_VS_DOCUMENTED)
    errors = sum(p.get("errors", 0) for p in result.get("points", []))
    if result.get("points"):
        add("errors over every load point", errors, "0", errors == 0)
    checks += runtime_targets(result)
    for name, server in result.get("servers", {}).items():
        if name in ("pipeline", "brpc") and server.get("rss_peak_mb") is not None:
            add(f"{name} service RSS (all its processes, peak under load)", server["rss_peak_mb"],
                f"< {MAX_RSS_MB:.0f} MB", server["rss_peak_mb"] < MAX_RSS_MB)
    return checks


def runtime_targets(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """OpenVINO FP32 against Paddle Inference: in-process at batch 1, and the HTTP service at its best."""
    checks: List[Dict[str, Any]] = []
    rows = {(r["runtime"], r["precision"]): r for r in (result.get("runtimes") or {}).get("rows", [])}
    paddle, openvino = rows.get(("paddle", "fp32"), {}), rows.get(("openvino", "fp32"), {})
    for mode, what in (("infer", "inference only"), ("pipeline", "with decode + preprocessing")):
        base = [r for r in paddle.get(mode, []) if r["batch"] == 1]
        fast = [r for r in openvino.get(mode, []) if r["batch"] == 1]
        if base and fast:
            ratio = fast[0]["images_per_s"] / base[0]["images_per_s"]
            checks.append({"target": f"in-process OpenVINO FP32 / Paddle Inference img/s at batch 1, {what}",
                           "measured": round(ratio, 2), "goal": f">= {OPENVINO_VS_PADDLE_INPROCESS}",
                           "met": ratio >= OPENVINO_VS_PADDLE_INPROCESS})
    service = (result.get("servers", {}).get("pipeline") or {}).get("runtime") or {}
    for other in [t for t in {p["target"] for p in result.get("points", [])} if t.startswith("http@")]:
        best, base = best_rate(result, "http"), best_rate(result, other)
        if best and base and (service.get("runtime"), service.get("precision")) == ("openvino", "fp32"):
            ratio = best / base
            checks.append({"target": f"HTTP service best img/s on OpenVINO FP32 / on {other.partition('@')[2]} "
                                     f"({base:.1f} img/s)", "measured": round(ratio, 2),
                           "goal": f">= {OPENVINO_VS_PADDLE_SERVICE}", "met": ratio >= OPENVINO_VS_PADDLE_SERVICE})
    return checks


def latency_split(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Where a lone request's time goes (p50 at 1 client): the in-process work (decode, preprocess and
    inference of one image in one process), the framework floor (the same service with no model) and the
    rest, this project's own overhead."""
    work = (result.get("inprocess") or {}).get("project_single_p50_ms")
    rows = []
    for protocol in ("http", "grpc"):
        service, floor = point_at(result, protocol, 1), point_at(result, f"floor-{protocol}", 1)
        if work and service and floor and service["level"] == 1 and floor["level"] == 1:
            rows.append({"protocol": protocol, "service_ms": service["p50_ms"], "inprocess_ms": work,
                         "floor_ms": floor["p50_ms"],
                         "project_ms": round(service["p50_ms"] - work - floor["p50_ms"], 1)})
    return rows


def write_json(result: Dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def markdown(result: Dict[str, Any]) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    lines = ["# rexnet-bench results", "",
             f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
             f"({machine['physical_cores']} cores), {machine['memory_gb']} GB; load average "
             f"{machine['load_average']} at the start, {meta.get('load_average_end')} at the end. "
             f"Python {meta['python']}, Paddle {meta['paddle']}, OpenVINO {meta.get('openvino', 'unknown')}.",
             f"Model: {meta['model']['arch']} {meta['model']['input_size']}x{meta['model']['input_size']}, CPU"
             + (" (random weights: speed does not depend on them)" if meta["model"]["random_init"] else "")
             + f"; images: {meta['images']['count']} {'/'.join(meta['images']['formats'])} files, mean "
             f"{meta['images']['mean_kb']} KB, {meta['images']['mean_megapixels']} MP; one image per request.",
             f"Per point: {meta['warmup_s']} s warm-up (discarded) + {meta['duration_s']} s measured.",
             "", f"Command: `{meta['command']}`", ""]
    points = result.get("points", [])
    closed = [p for p in points if p["mode"] == "closed"]
    if closed:
        lines += ["## Closed loop (N clients back to back)", "",
                  "| target | clients | img/s | p50 ms | p90 ms | p99 ms | max ms | errors | server cores "
                  "| loadgen cores | other cores | server RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in closed:
            lines.append("| " + " | ".join(_fmt(v) for v in (
                label(p["target"]), p["level"], p["images_per_s"], p["p50_ms"], p["p90_ms"],
                p["p99_ms"], p["max_ms"], p["errors"], p.get("server_cores"), p.get("loadgen_cores"),
                p.get("other_cores"), p.get("server_rss_peak_mb"))) + " |")
        lines.append("")
    opened = [p for p in points if p["mode"] == "open"]
    if opened:
        lines += ["## Open loop (fixed arrival rate; latency from the scheduled send time)", "",
                  "| target | rate req/s | arrivals | img/s | p50 ms | p90 ms | p99 ms | max ms | send lag p99 ms "
                  "| errors | server cores | loadgen cores |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in opened:
            lines.append("| " + " | ".join(_fmt(v) for v in (
                label(p["target"]), p["level"], p.get("arrivals"), p["images_per_s"],
                p["p50_ms"], p["p90_ms"], p["p99_ms"], p["max_ms"], p["send_lag_p99_ms"], p["errors"],
                p.get("server_cores"), p.get("loadgen_cores"))) + " |")
        lines.append("")
    staged = [p for p in points if p.get("stages")]
    if staged:
        lines += ["## Inside the service (its /metrics histograms, mean per call over the window)", "",
                  "| target | mode | level | decode ms | preprocess ms | infer ms (per batch) | postprocess ms "
                  "| images per batch | requests per batch | server request ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in staged:
            s = p["stages"]
            lines.append("| " + " | ".join(_fmt(v) for v in (
                p["target"], p["mode"], p["level"], s.get("decode_ms"), s.get("preprocess_ms"), s.get("infer_ms"),
                s.get("postprocess_ms"), s.get("mean_batch_images"), s.get("mean_batch_requests"),
                s.get("server_request_ms"))) + " |")
        lines.append("")
    inproc = result.get("inprocess")
    if inproc:
        engine = (f"{inproc['runtime']} {inproc['precision']}" if "runtime" in inproc
                  else f"oneDNN {'on' if inproc['mkldnn'] else 'off'}")
        lines += [f"## In-process limit (one process, no serving layer, {inproc['cpu_threads']} math threads, "
                  f"{engine})", "",
                  "| preprocessing | batch | img/s | p50 ms per call | p99 ms per call |", "|---|---|---|---|---|"]
        for variant, name in (("project", "project (OpenCV, the CPU path)"),
                              ("paddle_ops", "Paddle ops (the GPU path, on the CPU)")):
            for row in inproc.get(variant, []):
                lines.append(f"| {name} | {row['batch']} | {_fmt(row['images_per_s'])} | {_fmt(row['p50_ms'])} "
                             f"| {_fmt(row['p99_ms'])} |")
        stages = inproc.get("stages_batch1", {})
        lines += ["", "Batch-1 stage medians: " + ", ".join(f"{k[:-3]} {v} ms" for k, v in stages.items()), ""]
    lines += runtimes_markdown(result)
    calibration = result.get("calibration")
    if calibration:
        lines += ["## Load generator alone (against an instant server)", "",
                  "| protocol | clients | req/s | loadgen CPU ms per request | loadgen cores |", "|---|---|---|---|---|"]
        for c in calibration:
            lines.append(f"| {c['protocol']} | {c['level']} | {_fmt(c['images_per_s'])} "
                         f"| {_fmt(c.get('loadgen_ms_per_request'))} | {_fmt(c.get('loadgen_cores'))} |")
        lines.append("")
    servers = result.get("servers", {})
    if servers:
        lines += ["## Servers", "", "| server | runtime | start s | RSS idle MB | RSS peak MB (all processes) |",
                  "|---|---|---|---|---|"]
        for name, s in servers.items():
            runtime = s.get("runtime") or {}
            engine = " ".join(runtime[k] for k in ("runtime", "precision") if k in runtime) or "–"
            lines.append(f"| {name} | {engine} | {_fmt(s.get('startup_s'))} | {_fmt(s.get('rss_idle_mb'))} "
                         f"| {_fmt(s.get('rss_peak_mb'))} |")
        lines.append("")
    split = latency_split(result)
    if split:
        lines += ["## Where a lone request's time goes (p50 at 1 client)", "",
                  "| protocol | service ms | = in-process work ms | + framework floor ms | + project overhead ms |",
                  "|---|---|---|---|---|"]
        for row in split:
            lines.append(f"| {row['protocol']} | {_fmt(row['service_ms'])} | {_fmt(row['inprocess_ms'])} "
                         f"| {_fmt(row['floor_ms'])} | {_fmt(row['project_ms'])} |")
        lines.append("")
    checks = result.get("targets", [])
    if checks:
        lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {_fmt(c['measured'])} | {c['goal']} | "
                         f"{'yes' if c['met'] else 'no'} |")
        lines.append("")
    failures = result.get("failures", [])
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)


def runtimes_markdown(result: Dict[str, Any]) -> List[str]:
    """The runtime comparison (rexnet_serving.bench.runtime_compare): img/s per runtime and batch size,
    inference only and with OpenCV decode + preprocessing, and each runtime's agreement with Paddle Inference."""
    runtimes = result.get("runtimes")
    if not runtimes:
        return []
    lines = [f"## CPU runtimes side by side ({runtimes['cpu_threads']} math threads, in-process)", "",
             "| runtime | batch | img/s inference only | p50 ms per call | img/s with decode + preprocessing "
             "| max abs output diff vs Paddle (output scale) | max prob diff | top-1 / top-5 agree |",
             "|---|---|---|---|---|---|---|---|"]
    for row in runtimes["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | – | skipped: {row['skipped']} | | | | | |")
            continue
        a = row["agreement"]
        agree = (f"{a['max_abs_output_diff']:.2g} ({a['output_scale']:.2g}) | {a['max_prob_diff']:.2g} | "
                 f"{a['top1_agreement']:.0%} / {a['top5_same_order']:.0%} of {a['images']} images")
        timed = list(zip(row.get("infer", []), row.get("pipeline", []))) or [({"batch": "–"}, {})]
        for infer, pipeline in timed:
            lines.append(f"| {row['name']} | {infer['batch']} | {_fmt(infer.get('images_per_s'))} "
                         f"| {_fmt(infer.get('p50_ms'))} | {_fmt(pipeline.get('images_per_s'))} | {agree} |")
    if result["meta"]["model"]["random_init"]:
        lines += ["", "Random weights: every score is about 1/classes, so the agreement columns compare near-ties "
                      "and mean little; `python -m rexnet_serving.bench.runtime_compare --agreement-only` on an "
                      "export with real weights gives the meaningful numbers."]
    return lines + [""]


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = sorted({p["level"] for p in result.get("points", []) if p["mode"] == "closed"})
    extra = sorted({p["target"] for p in result.get("points", []) if "@" in p["target"]})
    for target in ["http", "grpc", "brpc", "http-x8", "floor-http", "documented"] + extra:
        points = closed_points(result, target)
        if not points:
            continue
        x = [p["level"] for p in points]
        ax_rate.plot(x, [p["images_per_s"] for p in points], marker="o", label=label(target))
        ax_p99.plot(x, [p["p99_ms"] if p["p99_ms"] is not None else float("nan") for p in points], marker="o",
                    label=label(target))
    inproc = result.get("inprocess") or {}
    for key, style, name in (("project_best", "--", "in-process limit"),
                             ("paddle_ops_best", ":", "in-process, Paddle-op preprocessing")):
        best = inproc.get(key)
        if best:
            ax_rate.axhline(best["images_per_s"], linestyle=style, color="gray",
                            label=f"{name} (batch {best['batch']})")
    for ax, title, unit in ((ax_rate, "Throughput", "images/s"), (ax_p99, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        if levels:
            ax.set_xticks(levels)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_p99.set_yscale("log")
    ax_rate.legend(fontsize=8)
    ax_p99.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{meta['model']['arch']} on {meta['machine']['cpu']} ({meta['machine']['logical_cpus']} CPUs)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
