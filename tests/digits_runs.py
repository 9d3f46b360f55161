"""The handwritten-digits data set and the short rexnet-train runs that tests/test_train.py and
tests/test_eval.py check, started early.

The data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), written as PNG files
with PaddleClas list files and as a class-per-folder tree. The runs use ReXNet_1_0 at 32x32.

Why early: Paddle's CPU depthwise convolution (forward and backward, 80 % of a training step here) runs on
one thread, so a training run holds one core for its whole length, and the 3-epoch run is the suite's
longest step (about 2 minutes on 2 cores). tests/conftest.py starts the runs that the selected tests need
as soon as collection ends, each in a child process through the real ``rexnet-train`` command, so they
train beside the tests collected before them; a fixture then waits for its run (``finish``). A run that
conftest did not start (a test module imported some other way) is started when its fixture asks.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

EPOCHS = 3

# Small-data settings on top of the ImageNet recipe: no flips (digits are not mirror-symmetric),
# milder crops and RandAugment, an LR (0.01 for batch 16) for a from-scratch run of 75 steps, and BN statistics that
# follow the last few batches so that eval mode is usable after so few steps.
SMALL_RUN = [
    f"Global.epochs={EPOCHS}", "Global.save_interval=1", "Global.log_interval=5", "Global.seed=7",
    "Global.device=cpu", "Arch.class_num=10", "Arch.bn_momentum=0.5",
    "Data.batch_size=16", "Data.eval_batch_size=50", "Data.num_workers=0",
    "Augment.crop_size=32", "Augment.hflip_prob=0", "Augment.crop_scale=[0.8,1.0]",
    "Augment.randaugment_magnitude=1", "Optimizer.lr=0.32", "Optimizer.warmup_epochs=0",
    "Optimizer.cooldown_epochs=0",
    "Eval.resize_short=36", "Eval.crop_size=32",
]


@dataclass(frozen=True)
class RunSpec:
    """A training run: images per class (train, val) and overrides on top of SMALL_RUN."""

    train_per_class: int
    val_per_class: int
    extra: Tuple[str, ...] = ()


# By the fixture that waits for the run: test_train's full run, test_eval's one epoch.
RUNS: Dict[str, RunSpec] = {
    "full_run": RunSpec(40, 20),
    "trained": RunSpec(12, 8, ("Global.epochs=1",)),
}


def write_digits(root: Path, train_per_class: int, val_per_class: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(0)
    splits: Dict[str, List[int]] = {"train": [], "val": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        splits["train"] += idx[:train_per_class].tolist()
        splits["val"] += idx[train_per_class:train_per_class + val_per_class].tolist()
    for split, indices in splits.items():
        lines = []
        for i in indices:
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
            rel = f"{split}/{digits.target[i]}/{i}.png"  # also a class-per-folder tree under split/
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).save(root / rel)
            lines.append(f"{rel} {digits.target[i]}\n")
        (root / f"{split}_list.txt").write_text("".join(lines))


def data_overrides(root: Path) -> List[str]:
    return [f"Data.train_root={root}", f"Data.train_list={root / 'train_list.txt'}",
            f"Data.val_root={root}", f"Data.val_list={root / 'val_list.txt'}"]


def train_command(data: Path, out: Path, *extra: str, resume: Optional[str] = None) -> List[str]:
    """The ``rexnet-train`` command line of a small run on ``data`` into ``out``."""
    cmd = [str(Path(sys.executable).parent / "rexnet-train"), "-c", "ReXNet_1_0", "--no-progress"]
    for override in [*SMALL_RUN, *data_overrides(data), f"Global.output_dir={out}", *extra]:
        cmd += ["-o", override]
    return cmd + (["--resume", resume] if resume else [])


@dataclass
class Run:
    """A started run: its data set, its output folder, its process and log, when it started."""

    data: Path
    out: Path
    process: subprocess.Popen
    log: Path
    started: float
    seconds: Optional[float] = None


_base: Optional[Path] = None
_runs: Dict[str, Run] = {}


def data(name: str) -> Path:
    """The run's data set, written on first use (without starting the run)."""
    global _base
    if _base is None:
        _base = Path(tempfile.mkdtemp(prefix="rexnet-digits-runs-"))
    spec, root = RUNS[name], _base / name / "data"
    if not root.is_dir():
        write_digits(root, spec.train_per_class, spec.val_per_class)
    return root


def start(name: str) -> Run:
    """Start ``rexnet-train`` on the run's data set in a child process (once per name)."""
    if name in _runs:
        return _runs[name]
    root = data(name)
    spec, out, log = RUNS[name], root.parent / "out", root.parent / "train.out"
    with log.open("wb") as sink:
        process = subprocess.Popen(train_command(root, out, *spec.extra), stdout=sink, stderr=subprocess.STDOUT)
    _runs[name] = Run(root, out, process, log, time.time())
    return _runs[name]


def finish(name: str, timeout: float = 1200) -> Run:
    """The run, once its process has ended; AssertionError with its output's tail unless it exited 0."""
    run = start(name)
    try:
        code = run.process.wait(timeout)
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
        raise AssertionError(f"rexnet-train {name} did not end within {timeout:.0f} s") from None
    if run.seconds is None:
        run.seconds = time.time() - run.started
    assert code == 0, f"rexnet-train {name} exited {code}:\n{run.log.read_text(errors='replace')[-3000:]}"
    return run


def pids() -> Set[int]:
    """The process ids of the runs started (running or ended)."""
    return {run.process.pid for run in _runs.values()}


def stop_all() -> None:
    """Stop the runs still going (an interrupted session) and remove their folders."""
    global _base
    for run in _runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
    _runs.clear()
    if _base is not None:
        shutil.rmtree(_base, ignore_errors=True)
        _base = None
