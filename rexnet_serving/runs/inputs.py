"""The images a run classifies: files, folders (recursive), globs and list files, each image once.

A list file names one image per line, relative to the list file's folder; PaddleClas ``path label`` lines
carry their label into the output record.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

PathLike = Union[str, "os.PathLike[str]"]


class UsageError(ValueError):
    """The inputs or the output cannot be used as given (no images found, unknown format, ...)."""


class InputItem(NamedTuple):
    path: Path                   # resolved, absolute
    label: Optional[str] = None  # from a PaddleClas list file's second column


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _has_glob_magic(source: str) -> bool:
    return any(c in source for c in "*?[")


def read_list_file(path: Path) -> List[InputItem]:
    """Images named by a list file: one path per line, relative to the list file's folder.

    PaddleClas ``path label`` lines are accepted: when the whole line is not an existing file, the last
    whitespace-separated field is taken as the label (so paths with spaces work when they exist).
    Blank lines and ``#`` comments are skipped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                         "nor a UTF-8 list file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the list file: {e.strerror or e}") from None
    base = path.parent
    items = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, None
        if not (base / Path(line).expanduser()).is_file():
            parts = line.rsplit(None, 1)
            if len(parts) == 2:
                name, label = parts
        items.append(InputItem((base / Path(name).expanduser()).resolve(), label))
    return items


def _expand(source: str) -> List[InputItem]:
    path = Path(source).expanduser()
    if path.is_dir():
        return [InputItem(p.resolve()) for p in sorted(path.rglob("*")) if is_image(p) and p.is_file()]
    if path.is_file():
        return [InputItem(path.resolve())] if is_image(path) else read_list_file(path)
    if _has_glob_magic(source):
        # A glob selects image files; matched folders and other files are left out, so "data/*" works.
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        return [InputItem(Path(m).resolve()) for m in matches if is_image(Path(m)) and Path(m).is_file()]
    raise UsageError(f"{source}: no such file or directory")


def collect_inputs(sources: Sequence[PathLike]) -> List[InputItem]:
    """Expand folders (recursive, image extensions, sorted), globs and list files into images.

    Each image appears once (the first mention wins); a source that yields nothing is a UsageError,
    because it is almost always a typo.
    """
    if not sources:
        raise UsageError("no inputs given")
    items: List[InputItem] = []
    seen = set()
    for source in sources:
        found = _expand(os.fspath(source))
        if not found:
            raise UsageError(f"{source}: no images found "
                             f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        for item in found:
            key = str(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items
