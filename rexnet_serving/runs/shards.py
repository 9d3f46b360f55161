"""Shards of a run: which images one of N processes (a Kubernetes Indexed Job's pods) classifies.

An image belongs to shard ``sha256(name) mod N``, where ``name`` is its canonical name: the resolved
absolute path of a local file, the full URL of an object (``s3://bucket/key``). The name, not the
position in the listing, so the partition is the same on every pod and every retry however the input
was listed (a folder, a glob, a list file, an object-store prefix, in any order) and an image added to
the listing moves no other image. sha256 rather than Python's ``hash()``: that one is salted per process.

Each shard writes its own result file, ``OUT-00003-of-00016.jsonl`` for ``-o OUT.jsonl --shard 3/16``
(the naming Beam and TFRecord use), and resumes on its own; ``rexnet-batch merge`` checks the union.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, TypeVar

from .summary import UsageError

INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
COUNT_ENV = "REXNET_SHARD_COUNT"    # the Job's completions (Kubernetes does not expose them to the pod)

T = TypeVar("T")


class Shard(NamedTuple):
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def suffix(self) -> str:
        """What the shard adds to the output's stem: ``-00003-of-00016``."""
        return f"-{self.index:05d}-of-{self.count:05d}"


def parse_shard(text: str) -> Shard:
    """``I/N`` (0 <= I < N) as a Shard; UsageError naming the flag otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 3/16")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text}: the index must be in 0..N-1 and N at least 1")
    return Shard(index, count)


def resolve_shard(flag: Optional[str], count: Optional[int],
                  env: Mapping[str, str] = os.environ) -> Optional[Shard]:
    """The shard of this process: ``--shard I/N``; else ``$JOB_COMPLETION_INDEX`` with N from
    ``--shard-count`` or ``$REXNET_SHARD_COUNT``; else None (the whole input)."""
    if flag is not None:
        return parse_shard(flag)
    index = env.get(INDEX_ENV)
    if index is None:
        if count is not None:
            raise UsageError(f"--shard-count needs ${INDEX_ENV} (an Indexed Job's pod) or --shard I/N")
        return None
    if count is None:
        text = env.get(COUNT_ENV)
        if text is None:
            raise UsageError(f"${INDEX_ENV} is set but the shard count is not: pass --shard-count N or set "
                             f"${COUNT_ENV} to the Job's completions")
        if not text.strip().isdecimal():
            raise UsageError(f"${COUNT_ENV}={text!r}: not a number")
        count = int(text)
    if not index.strip().isdecimal():
        raise UsageError(f"${INDEX_ENV}={index!r}: not a number")
    return parse_shard(f"{index.strip()}/{count}")


def shard_of(name: str, count: int) -> int:
    """The shard (0..count-1) of the image whose canonical name is ``name``."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select(items: Sequence[T], shard: Optional[Shard],
           name: Callable[[T], str] = lambda item: item.name) -> List[T]:
    """The items of ``shard`` (all of them for None), in their listed order; ``name`` gives an item's
    canonical name (runs.inputs.InputItem.name)."""
    if shard is None:
        return list(items)
    return [item for item in items if shard_of(name(item), shard.count) == shard.index]


def shard_output(output: str, shard: Optional[Shard]) -> str:
    """The result file of ``shard``: ``OUT-00003-of-00016.jsonl`` for ``OUT.jsonl`` (a path or URL)."""
    if shard is None:
        return output
    head, sep, tail = output.rpartition("/")
    stem, dot, ext = tail.partition(".")
    return f"{head}{sep}{stem}{shard.suffix}{dot}{ext}"


def shard_outputs_pattern(output: str) -> "re.Pattern[str]":
    """Matches the base names of ``output``'s shard files; groups: index, count."""
    tail = output.rpartition("/")[2]
    stem, dot, ext = tail.partition(".")
    return re.compile(re.escape(stem) + r"-(\d{5})-of-(\d{5})" + re.escape(dot + ext))
