"""Optional Paddle Lite copies of the exported model: ``lite/<target>/model.nb`` for ARM and x86 CPUs.

Why the program is patched first: Paddle Lite 2.13 (``paddlelite==2.13rc0``, the newest on PyPI) reads
programs written by Paddle 2.6 but expects three operators in their Paddle 2.3-and-earlier form, and its
``opt`` dies without a message otherwise (found by converting one-operator programs, see the README):
  * ``swish`` without a ``beta`` attribute: Lite's op reads it, the check fails, the process aborts;
  * ``relu6`` without ``threshold``: the same abort;
  * ``flatten_contiguous_range`` without the ``XShape`` output (Paddle 2.6 no longer writes it for
    inference): Lite dereferences the missing output and segfaults.
Every other operator of ReXNet converts as written. The Lite input is therefore a copy of
``inference/inference.pdmodel`` with the old attributes filled in with the values that reproduce
Paddle 2.6's behaviour (``beta=1``: x * sigmoid(x); ``threshold=6``) and an ``XShape`` variable added;
``inference/`` itself is untouched.

``opt`` runs in a child process (``lite_worker.py``), so a crash in Paddle Lite is an error message,
not a dead exporter, and so it can run on another interpreter: paddlelite 2.13rc0 has wheels only up to
Python 3.10, the project runs on 3.11, so the worker runs on ``$REXNET_LITE_PYTHON`` (a Python with
paddlelite and NumPy: scripts/lite_tools.sh builds one) or, where paddlelite is installed here, on this
interpreter; the x86 model is then run with Lite's ``MobileConfig`` predictor and compared with
Paddle Inference (ARM models cannot run here and are not checked).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from ..manifest import LITE, LITE_FILE, LITE_TARGETS, MODEL_FILE, PARAMS_FILE, lite_key

WORKER = Path(__file__).with_name("lite_worker.py")
PACKAGE = "paddlelite==2.13rc0"
OPT_TIMEOUT_S = 600
TOLERANCE = 1e-4  # max abs difference to Paddle Inference on a random batch
CHECKABLE_HERE = ("x86",)  # targets whose model can run on this (x86) machine


class LiteError(RuntimeError):
    """paddlelite missing, opt failed, or the Lite model does not reproduce Paddle Inference."""


def parse_targets(text: str) -> tuple:
    """``"arm,x86"`` -> ("arm", "x86"); unknown or repeated targets are a LiteError."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in LITE_TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise LiteError(f"--lite-targets {text!r}: name one or more of {', '.join(LITE_TARGETS)}, "
                        "comma-separated, each once")
    return targets


def lite_python() -> str:
    """The interpreter the worker runs on: $REXNET_LITE_PYTHON, else this one (see the module docstring)."""
    return os.environ.get("REXNET_LITE_PYTHON") or sys.executable


def paddlelite_version() -> str:
    """The worker interpreter's paddlelite version; LiteError (with the fix) when it has none."""
    python = lite_python()
    try:
        done = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('paddlelite'))"],
                              capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise LiteError(f"REXNET_LITE_PYTHON={python} cannot run: {exc}") from None
    if done.returncode != 0:
        raise LiteError(f"Paddle Lite export needs {PACKAGE} ({python} has none; it has no wheels for Python "
                        "3.11): build a Python 3.10 venv with scripts/lite_tools.sh and set REXNET_LITE_PYTHON "
                        "to the python it prints") from None
    return done.stdout.strip()


def lite_compatible_program(model_file: Path, out_file: Path) -> None:
    """Write ``model_file`` with the operator forms Paddle Lite 2.13 reads (see the module docstring)."""
    import paddle
    core = paddle.framework.core
    desc = core.ProgramDesc(model_file.read_bytes())
    for b in range(desc.num_blocks()):
        block = desc.block(b)
        for i in range(block.op_size()):
            op = block.op(i)
            if op.type() == "swish" and not op.has_attr("beta"):
                op._set_float32_attr("beta", 1.0)
            elif op.type() == "relu6" and not op.has_attr("threshold"):
                op._set_float32_attr("threshold", 6.0)
            elif op.type() == "flatten_contiguous_range" and "XShape" not in op.output_names():
                source = block.find_var(op.input("X")[0].encode())
                xshape = block.var((op.output("Out")[0] + ".xshape").encode())
                xshape.set_type(core.VarDesc.VarType.LOD_TENSOR)
                xshape.set_dtype(core.VarDesc.VarType.FP32)
                xshape.set_shape([0] + list(source.shape()))  # Paddle's XShape convention: [0, *x.shape]
                op.set_output("XShape", [xshape.name()])
    out_file.write_bytes(desc.serialize_to_string())


def _worker(args: Sequence[str], what: str) -> None:
    try:
        done = subprocess.run([lite_python(), str(WORKER), *args], capture_output=True, text=True,
                              timeout=OPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LiteError(f"{what}: Paddle Lite did not finish within {OPT_TIMEOUT_S} s") from None
    if done.returncode == 0:
        return
    if done.returncode < 0:
        how = f"crashed with {signal.Signals(-done.returncode).name}"
    else:
        how = f"failed (exit {done.returncode})"
    output = (done.stderr + done.stdout).strip().splitlines()
    detail = next((line for line in reversed(output) if "Check failed" in line or "Error" in line),
                  output[-1] if output else "no message")
    raise LiteError(f"{what}: Paddle Lite {how}: {detail.strip()}")


def convert(inference_dir: Path, model_dir: Path, targets: Sequence[str]) -> Dict[str, str]:
    """Write ``model_dir/lite/<target>/model.nb`` per target; return the manifest ``paths`` entries."""
    paddlelite_version()  # a clear error when it is not installed
    paths = {}
    with tempfile.TemporaryDirectory(prefix="rexnet-lite-") as scratch:
        program = Path(scratch) / MODEL_FILE
        lite_compatible_program(inference_dir / MODEL_FILE, program)
        for target in targets:
            out = model_dir / LITE / target / LITE_FILE
            out.parent.mkdir(parents=True, exist_ok=True)
            # opt appends ".nb" to its output prefix.
            _worker(["opt", str(program), str(inference_dir / PARAMS_FILE),
                     str(out.with_suffix("")), target], f"opt for {target}")
            if not out.is_file() or out.stat().st_size == 0:
                raise LiteError(f"opt for {target} wrote no model to {out}")
            paths[lite_key(target)] = out.relative_to(model_dir).as_posix()
    return paths


def run_lite(nb_file: Path, batch: np.ndarray) -> np.ndarray:
    """Run ``batch`` through ``nb_file`` with Paddle Lite's MobileConfig predictor (child process)."""
    with tempfile.TemporaryDirectory(prefix="rexnet-lite-run-") as scratch:
        given, result = Path(scratch) / "input.npy", Path(scratch) / "output.npy"
        np.save(given, np.ascontiguousarray(batch, dtype=np.float32))
        _worker(["run", str(nb_file), str(given), str(result)], f"running {nb_file}")
        return np.load(result)


def check_against(nb_file: Path, batch: np.ndarray, expected: np.ndarray,
                  tolerance: float = TOLERANCE) -> float:
    """Max abs difference of Lite's output to ``expected`` (Paddle Inference); LiteError above
    ``tolerance`` or on another top-1."""
    got = run_lite(nb_file, batch)
    if got.shape != expected.shape:
        raise LiteError(f"{nb_file}: output shape {got.shape}, Paddle gives {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance or not np.array_equal(got.argmax(1), expected.argmax(1)):
        raise LiteError(f"{nb_file}: differs from Paddle Inference by {diff:.3g} (> {tolerance:g}) "
                        "or in top-1 on a random batch")
    return diff
