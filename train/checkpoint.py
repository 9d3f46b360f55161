"""Checkpoints: full training state for ``--resume``, and plain weights for ``rexnet-export --weights``.

A checkpoint (``*.pdckpt``, written with ``paddle.save``) holds the model, optimizer (momentum buffers),
LR scheduler, AMP loss scaler, the number of finished epochs, the best metric and the metric history.
No generator state is stored: every random stream of an epoch (data order, augmentation, dropout) is
seeded from (Global.seed, epoch, ...), so resuming at an epoch boundary repeats the uninterrupted run.
Every file is written to a temporary name and renamed, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict

import paddle

CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "best_metric", "history")
BEST_WEIGHTS = "best_model.pdparams"
LATEST_WEIGHTS = "latest.pdparams"
BEST_CHECKPOINT = "best.pdckpt"


class CheckpointError(ValueError):
    """A --resume file that is missing, unreadable or from another model."""


def epoch_checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pdckpt"


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
