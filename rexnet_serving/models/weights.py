"""Loading ``.pdparams`` into a model: strict by default, with errors that list what does not fit."""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import paddle
from paddle import nn

CLASSIFIER_PREFIX = "output.1."


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or does not fit the model."""


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a ``.pdparams`` file (or a training checkpoint holding one under ``model``) as arrays."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = paddle.load(path, return_numpy=True)
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, RuntimeError, KeyError) as exc:
        raise WeightsError(f"cannot read weights file {path}: not a Paddle state dict "
                           f"({type(exc).__name__}: {exc})") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a checkpoint written by rexnet-train
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"cannot read weights file {path}: it holds no state dict")
    return {str(k): np.asarray(v) for k, v in state.items()}


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name (POSIX lets a directory be opened read-only for this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomically(obj: Any, path: str) -> None:
    """paddle.save through a temporary file in the same directory, so a crash never leaves half a file.

    The file is fsync'ed before the rename and the directory after it: without that, a power loss can
    leave the new name pointing at data that never reached the disk (an empty or truncated file).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        paddle.save(obj, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_state_dict(model: nn.Layer, state: Mapping[str, np.ndarray],
                     ignore: Iterable[str] = ()) -> List[str]:
    """Return one line per problem (missing, unexpected, mis-shaped key); empty when it fits."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not any(k.startswith(p) for p in ignore)}
    given = {k: tuple(np.shape(v)) for k, v in state.items()
             if not any(k.startswith(p) for p in ignore)}
    problems = [f"missing key: {k} {list(s)}" for k, s in expected.items() if k not in given]
    problems += [f"unexpected key: {k} {list(s)}" for k, s in given.items() if k not in expected]
    problems += [f"shape mismatch: {k} is {list(given[k])} in the file, {list(s)} in the model"
                 for k, s in expected.items() if k in given and given[k] != s]
    return problems


def load_weights(model: nn.Layer, path: str, strict: bool = True,
                 drop_classifier: bool = False) -> Optional[List[str]]:
    """Load ``path`` into ``model``.

    ``drop_classifier`` skips the classifier (``output.1.*``) on both sides, for fine-tuning to another
    class count. With ``strict=False`` keys that do not fit are skipped and returned instead of raised.
    """
    state = read_state_dict(path)
    ignore = (CLASSIFIER_PREFIX,) if drop_classifier else ()
    problems = check_state_dict(model, state, ignore)
    if problems and strict:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightsError(f"{path} does not fit {type(model).__name__} "
                           f"({len(problems)} problems):\n  {shown}{more}")
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and tuple(v.shape) == tuple(own[k].shape)
              and not any(k.startswith(p) for p in ignore)}
    model.set_state_dict(usable)
    return problems
