"""The images a run classifies: files, folders (recursive), globs and list files, each image once.

A list file names one image per line, relative to the list file's folder; PaddleClas ``path label`` lines
carry their label into the output record. Each may also be a URL (``s3://bucket/prefix/``, a glob in
one, a list file in one: ``runs.storage``); ``file://`` URLs are local paths.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

from . import storage
from .summary import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

PathLike = Union[str, "os.PathLike[str]"]


class InputItem(NamedTuple):
    path: Union[Path, str]       # resolved, absolute; or the object's URL (a str)
    label: Optional[str] = None  # from a PaddleClas list file's second column

    @property
    def name(self) -> str:
        """The canonical name: the key of resume, of shards (runs.shards) and of the merge."""
        return str(self.path)

    def read_bytes(self) -> bytes:
        """The file's bytes (OSError when it cannot be read, after retries for an object)."""
        if isinstance(self.path, Path):
            return self.path.read_bytes()
        return storage.read_bytes(self.path)


def is_image(path: Union[Path, str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _remote_items(source: str) -> List[InputItem]:
    found, list_url = storage.list_images(source, is_image)
    if list_url is None:
        return [InputItem(url) for url in found]
    base = list_url.rpartition("/")[0]
    items = []
    for raw in found:  # a list file on the store: lines relative to its folder, or URLs
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, None
        parts = line.rsplit(None, 1)
        if not is_image(line) and len(parts) == 2:
            name, label = parts
        items.append(InputItem(name if storage.is_url(name) else storage.join(base, name), label))
    return items


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
    local = storage.file_url_path(source)
    if local is None and storage.is_url(source):
        return _remote_items(source)
    if local is not None:
        source = str(local)
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


def collect_inputs(sources: Sequence[Union[PathLike, InputItem]]) -> List[InputItem]:
    """Expand folders (recursive, image extensions, sorted), globs and list files into images; an
    InputItem (already collected) stands for itself.

    Each image appears once (the first mention wins); a source that yields nothing is a UsageError,
    because it is almost always a typo.
    """
    if not sources:
        raise UsageError("no inputs given")
    items: List[InputItem] = []
    seen = set()
    for source in sources:
        found = [source] if isinstance(source, InputItem) else _expand(os.fspath(source))
        if not found:
            raise UsageError(f"{source}: no images found "
                             f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        for item in found:
            key = item.name
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items
