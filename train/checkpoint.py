"""Checkpoints: full training state for ``--resume``, and plain weights for ``rexnet-export --weights``.

A checkpoint (``*.pdckpt``, written with ``paddle.save``) holds the model, optimizer (momentum buffers),
LR scheduler (its position in epochs: ``rexnet_train.schedule``), AMP loss scaler, the number of finished
epochs, the best metric, the metric history, the config and the world size. No generator state is
stored: every random stream of an epoch (data order, augmentation, dropout) is seeded from
(Global.seed, epoch, ...), so resuming at an epoch boundary repeats the uninterrupted run.

Durability: every file goes through ``rexnet_serving.models.weights.save_atomically`` (temporary name,
fsync, rename, fsync of the directory), so after a crash or power loss a name holds either the old or
the new complete file.

The best model is a *pair*, ``best.pdckpt`` and ``best_model.pdparams``, which must never come from two
different epochs. Both are written into a new directory ``best-epoch_NNNN-*/``; one rename then points
the symlink ``best`` at it, which switches the pair at once. ``best.pdckpt`` and ``best_model.pdparams``
in the output directory are fixed symlinks into ``best/``; older ``best-*`` directories are removed.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import paddle

from rexnet_serving.models.weights import fsync_path, save_atomically

CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "best_metric", "history")
BEST_WEIGHTS = "best_model.pdparams"
LATEST_WEIGHTS = "latest.pdparams"
BEST_CHECKPOINT = "best.pdckpt"
BEST_LINK = "best"  # -> the directory holding the current best pair
BEST_DIR_PREFIX = "best-epoch_"


class CheckpointError(ValueError):
    """A --resume file that is missing, unreadable or from another model."""


def epoch_checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pdckpt"


def _replace_durably(tmp: str, path: str) -> None:
    """Rename ``tmp`` (already complete) over ``path``, then fsync the directory."""
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def _symlink_durably(target: str, path: str) -> None:
    """Make ``path`` a symlink to ``target`` in one rename (replacing a file or link already there)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-link-{os.getpid()}-{os.path.basename(path)}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    _replace_durably(tmp, path)


def publish_best(output_dir: str, state: Dict[str, Any], weights: Dict[str, Any], epoch: int) -> None:
    """Write the best pair (checkpoint + plain weights) so that both always come from one epoch."""
    pair_dir = tempfile.mkdtemp(prefix=f"{BEST_DIR_PREFIX}{epoch:04d}-", dir=output_dir)
    save_atomically(state, os.path.join(pair_dir, BEST_CHECKPOINT))
    save_atomically(weights, os.path.join(pair_dir, BEST_WEIGHTS))
    fsync_path(output_dir)  # the new directory's own entry
    _symlink_durably(os.path.basename(pair_dir), os.path.join(output_dir, BEST_LINK))
    for name in (BEST_CHECKPOINT, BEST_WEIGHTS):
        link, target = os.path.join(output_dir, name), os.path.join(BEST_LINK, name)
        if not (os.path.islink(link) and os.readlink(link) == target):
            _symlink_durably(target, link)
    current = os.path.basename(pair_dir)
    for name in os.listdir(output_dir):  # earlier pairs, and any left half-written by a crash
        if name.startswith(BEST_DIR_PREFIX) and name != current:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def training_state(model: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer, scheduler: Any,
                   epoch: int, config: Dict[str, Any], world_size: int, best_metric: float = -1.0,
                   history: Optional[List[Dict[str, Any]]] = None,
                   scaler: Optional[paddle.amp.GradScaler] = None) -> Dict[str, Any]:
    """What a checkpoint holds after ``epoch`` finished epochs (the format ``load_checkpoint`` reads)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "best_metric": best_metric,
        "history": list(history or []), "config": config, "world_size": world_size,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = paddle.load(path)
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a rexnet-train checkpoint (missing: {', '.join(missing)}); "
                              "plain .pdparams weights go in Global.pretrained_model instead")
    return state
