"""The CPU runtimes side by side: Paddle Inference + oneDNN, OpenVINO FP32 and OpenVINO BF16, in one run.

For each runtime and batch size (1 and 8 by default), back-to-back calls on the same photos:
- ``infer``: inference only, on batches preprocessed beforehand;
- ``pipeline``: decode + preprocessing + inference + top-5 as Classifier.classify runs them on the CPU
  (OpenCV decode and preprocessing);
and how far each runtime's answers are from Paddle Inference's on those photos (the project's own
preprocessing, every photo once): max |output difference| against the outputs' scale, max probability
difference, and top-1 / top-5 agreement. BF16 is skipped, with the reason, on a CPU without it.

Run in its own process by rexnet-bench after the in-process limit, printing JSON:
    python -m rexnet_serving.bench.runtime_compare --model-dir DIR --images DIR [--batches 1,8] [--seconds 4]
    python -m rexnet_serving.bench.runtime_compare --model-dir DIR --images DIR --agreement-only
The second form (no timing) is how the README's BF16 agreement numbers are made, on an export with real
weights and real photos.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .inprocess import int_list, sweep
from .payloads import load_payloads

# (name in the report, runtime, precision); the first is the reference the others are compared with.
RUNTIMES = (("Paddle Inference + oneDNN", "paddle", "fp32"), ("OpenVINO FP32", "openvino", "fp32"),
            ("OpenVINO BF16", "openvino", "bf16"))
DEFAULT_BATCHES = (1, 8)
TOP_K = 5


def agreement(reference: np.ndarray, outputs: np.ndarray, softmax: bool) -> Dict[str, float]:
    """How far ``outputs`` are from ``reference`` (both [N, C], probabilities if ``softmax`` else logits)."""
    from ..postprocess import softmax as to_probs
    ref_p, out_p = (reference, outputs) if softmax else (to_probs(reference), to_probs(outputs))
    ref_top = np.argsort(-ref_p, axis=1)[:, :TOP_K]
    out_top = np.argsort(-out_p, axis=1)[:, :TOP_K]
    overlap = [len(set(a) & set(b)) / TOP_K for a, b in zip(ref_top, out_top)]
    return {"images": int(len(reference)),
            "max_abs_output_diff": float(np.abs(outputs - reference).max()),
            "output_scale": float(np.abs(reference).max()),
            "max_prob_diff": float(np.abs(out_p - ref_p).max()),
            "top1_agreement": float(np.mean(ref_top[:, 0] == out_top[:, 0])),
            "top5_same_order": float(np.mean(np.all(ref_top == out_top, axis=1))),
            "top5_overlap": float(np.mean(overlap))}


def _outputs(model: Any, batch: np.ndarray) -> np.ndarray:
    return np.concatenate([model.run(batch[i:i + model.max_batch]) for i in range(0, len(batch), model.max_batch)])


def compare_runtimes(model_dir: Path, payloads: Sequence[bytes], batches: Sequence[int], seconds: float,
                     cpu_threads: int = 2, timing: bool = True,
                     progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Every runtime of RUNTIMES: agreement with the first, and (``timing``) img/s at each batch size."""
    from ..classifier import Classifier
    from ..imageio import decode_image
    from ..runtimes import load_model
    say = progress or (lambda message: None)
    max_batch = max(batches)
    reference_clf = Classifier(model_dir, runtime="paddle", cpu_threads=cpu_threads, max_batch=max_batch)
    # Every photo once through the project's preprocessing: the inputs of the agreement check.
    photos = np.asarray(reference_clf.preprocess([decode_image(p) for p in payloads]), dtype=np.float32)
    reference = _outputs(reference_clf.model, photos)
    singles = [photos[i:i + 1] for i in range(len(photos))]
    rows: List[Dict[str, Any]] = []
    for name, runtime, precision in RUNTIMES:
        row: Dict[str, Any] = {"name": name, "runtime": runtime, "precision": precision}
        rows.append(row)
        try:
            model = reference_clf.model if runtime == "paddle" else load_model(
                model_dir, runtime=runtime, precision=precision, cpu_threads=cpu_threads, max_batch=max_batch)
        except RuntimeError as exc:  # bf16 on a CPU without it: say so, measure the others
            row["skipped"] = str(exc)
            continue
        row["agreement"] = agreement(reference, _outputs(model, photos), reference_clf.manifest.softmax)
        if not timing:
            continue
        clf = Classifier(model_dir, model=model)
        for mode, classify in (("infer", lambda items: model.run(np.concatenate(items))),
                               ("pipeline", lambda items: clf.classify(items, TOP_K))):
            inputs = singles if mode == "infer" else payloads
            row[mode] = []
            for batch in batches:
                say(f"runtimes: {name} {mode} batch {batch}")
                row[mode].append(sweep(classify, inputs, batch, seconds))
    return {"cpu_threads": cpu_threads, "seconds_per_point": seconds if timing else None,
            "batches": list(batches), "rows": rows}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexnet_serving.bench.runtime_compare",
                                     description="Compare the CPU runtimes on one export; print JSON.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="directory of encoded images")
    parser.add_argument("--batches", type=int_list, default=list(DEFAULT_BATCHES))
    parser.add_argument("--seconds", type=float, default=4.0, help="per runtime, mode and batch size")
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--agreement-only", action="store_true", help="no timing: only the agreement")
    args = parser.parse_args(argv)
    payloads = [p.data for p in load_payloads(args.images)]
    result = compare_runtimes(args.model_dir, payloads, args.batches, args.seconds, args.cpu_threads,
                              timing=not args.agreement_only,
                              progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
