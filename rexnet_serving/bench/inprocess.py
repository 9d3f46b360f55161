"""The in-process limit: decode + preprocess + inference + top-k in one process, no serving layer.

What the hardware gives the model with the project's own pipeline as the service runs it on the CPU
(rexnet_serving.classifier.Classifier: OpenCV decode, the CPU path of rexnet_serving.preprocess, which is
OpenCV, and the CPU service's runtime: OpenVINO FP32 unless told otherwise), one call after another at
each batch size; a service can at best approach it. A second variant preprocesses with the GPU path's Paddle ops instead (run here on the CPU) to
show what that implementation costs. A per-stage breakdown at batch 1 says where a single image's time goes.

Run in its own process by rexnet-bench (nothing else running), printing JSON:
    python -m rexnet_serving.bench.inprocess --model-dir DIR --images DIR [--batches 1,2,4,8,16]
        [--runtime openvino|paddle] [--precision fp32|bf16]
The runtimes side by side: rexnet_serving.bench.runtime_compare.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..runtimes import default_runtime
from ..runtimes.base import PRECISIONS, RUNTIMES
from ..preprocess import preprocess, preprocess_opencv
from .payloads import load_payloads

VARIANTS = ("project", "paddle_ops")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sweep(classify: Callable[[List[bytes]], Any], payloads: Sequence[bytes], batch: int,
          seconds: float) -> Dict[str, float]:
    """Images/s and call latency of back-to-back ``classify`` calls on ``batch`` images for ``seconds``."""
    def batch_at(n: int) -> List[bytes]:
        return [payloads[(n * batch + j) % len(payloads)] for j in range(batch)]
    for n in range(2):  # oneDNN builds its kernels for this batch shape on the first calls
        classify(batch_at(n))
    latencies: List[float] = []
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        latencies.append(_timed(lambda: classify(batch_at(n))))
        n += 1
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"batch": batch, "images_per_s": round(len(latencies) * batch / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "calls": len(latencies)}


def stage_breakdown(clf: Any, payloads: Sequence[bytes], rounds: int = 3) -> Dict[str, float]:
    """Median ms per image of each stage at batch 1."""
    from ..imageio import decode_image
    times: Dict[str, List[float]] = {k: [] for k in ("decode", "preprocess_paddle", "preprocess_opencv",
                                                     "infer", "topk")}
    cfg = clf.preprocess_config
    for _ in range(rounds):
        for data in payloads:
            box: Dict[str, Any] = {}
            times["decode"].append(_timed(lambda: box.update(img=decode_image(data))))
            times["preprocess_opencv"].append(_timed(lambda: preprocess_opencv([box["img"]], cfg)))
            times["preprocess_paddle"].append(_timed(lambda: preprocess([box["img"]], cfg)))
            box.update(x=clf.preprocess([box["img"]]))  # what the service feeds (the CPU path: OpenCV)
            times["infer"].append(_timed(lambda: box.update(p=clf.probabilities(box["x"]))))
            times["topk"].append(_timed(lambda: clf.results(1, box["p"], {}, 5)))
    return {f"{k}_ms": round(float(np.median(v)) * 1000, 2) for k, v in times.items()}


def run_baseline(model_dir: Path, payloads: Sequence[bytes], batches: Sequence[int], seconds: float,
                 cpu_threads: int = 2, mkldnn: bool = True, runtime: str = "openvino", precision: str = "fp32",
                 progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    from ..classifier import Classifier
    from ..imageio import decode_image
    from ..runtimes.base import runtime_info
    say = progress or (lambda message: None)
    clf = Classifier(model_dir, runtime=runtime, precision=precision, cpu_threads=cpu_threads, mkldnn=mkldnn,
                     max_batch=max(batches))
    cfg = clf.preprocess_config
    paddle_model = clf.model.clone()  # its own predictor, so the two variants never share warm caches

    def classify_paddle_ops(batch: List[bytes]) -> Any:
        probs = clf.probabilities(preprocess([decode_image(d) for d in batch], cfg), model=paddle_model)
        return clf.results(len(batch), probs, {}, 5)

    functions = {"project": lambda batch: clf.classify(batch, 5), "paddle_ops": classify_paddle_ops}
    result: Dict[str, Any] = {"cpu_threads": cpu_threads, "mkldnn": mkldnn, "seconds_per_point": seconds,
                              **runtime_info(clf.model)}
    for variant in VARIANTS:
        rows = []
        for batch in batches:
            say(f"in-process {variant} batch {batch}")
            rows.append(sweep(functions[variant], payloads, batch, seconds))
        result[variant] = rows
    say("in-process stage breakdown")
    result["stages_batch1"] = stage_breakdown(clf, payloads)
    for variant in VARIANTS:
        best = max(result[variant], key=lambda row: row["images_per_s"])
        result[f"{variant}_best"] = {"batch": best["batch"], "images_per_s": best["images_per_s"]}
        single = [row for row in result[variant] if row["batch"] == 1]
        if single:
            result[f"{variant}_single_p50_ms"] = single[0]["p50_ms"]
    return result


def int_list(text: str) -> List[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexnet_serving.bench.inprocess",
                                     description="Measure the in-process limit and print it as JSON.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="directory of encoded images")
    parser.add_argument("--batches", type=int_list, default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="per batch size and variant")
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--no-mkldnn", action="store_true", help="runtime paddle: without oneDNN")
    parser.add_argument("--runtime", choices=RUNTIMES, default=default_runtime("cpu"),
                        help="default %(default)s, the CPU service's (serving_configs/cpu.yml)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    args = parser.parse_args(argv)
    payloads = [p.data for p in load_payloads(args.images)]
    result = run_baseline(args.model_dir, payloads, args.batches, args.seconds, args.cpu_threads,
                          not args.no_mkldnn, args.runtime, args.precision,
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
