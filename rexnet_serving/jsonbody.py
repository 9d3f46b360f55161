"""JSON request bodies parsed at a cost known before parsing, and integers read as the wire spells them.

Why a bound before ``json.loads``: parsing multiplies memory 10-20x (a 4-byte ``"a",`` becomes a
~50-byte str and an 8-byte list slot; ``0.5,`` a 24-byte float) and CPython's C parser holds the GIL
for the whole call, so one 60 MiB body of small values stalled every other thread of the process,
event loops included, for seconds. Every value after the first in a JSON array or object is preceded by
a comma, and every container opens with ``[`` or ``{``: counting those three bytes (C speed, ~20 ms for
60 MiB, and an upper bound since strings may contain them) bounds the number of values, so the
memory and time of the parse, from the bytes before any object exists. Hand-written because the
well-kept parsers (json, orjson, ujson) offer no value or depth limit.

Why :func:`ascii_uint`: ``str.isdigit()`` accepts Unicode digits such as ``"²"`` that ``int()`` then
refuses, and ``int()`` refuses more than 4300 digits: both turned bad input into server faults.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional, Union

Body = Union[bytes, bytearray, memoryview, str]

# What a JSON body may hold unless configured (rexnet.max_json_values): ~100 MB and ~0.3 s of parsing.
DEFAULT_MAX_VALUES = 2_000_000
_ASCII_UINT = re.compile(r"[0-9]{1,18}")  # fits an int64; ASCII only (re's [0-9], not \d)


class JsonBodyError(ValueError):
    """The body is not JSON this service will parse (malformed, too many values, too deep)."""


def count_values(body: Body) -> int:
    """An upper bound of the JSON values in ``body`` (commas + opening brackets + 1)."""
    data = body.encode() if isinstance(body, str) else bytes(body) if isinstance(body, memoryview) else body
    return data.count(b",") + data.count(b"[") + data.count(b"{") + 1


def load_json(body: Body, max_values: int = DEFAULT_MAX_VALUES, what: str = "the request body") -> Any:
    """``json.loads(body)`` once its value count is within ``max_values``; JsonBodyError otherwise."""
    count = count_values(body)
    if count > max_values:
        raise JsonBodyError(f"{what} holds up to {count} JSON values, over the limit of {max_values} "
                            "(rexnet.max_json_values); send tensors in binary form (v2 binary data "
                            "extension or gRPC) or fewer values per request")
    try:
        data = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except RecursionError:  # the C parser's own depth guard (about sys.getrecursionlimit() levels)
        raise JsonBodyError(f"{what} nests JSON arrays or objects too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise JsonBodyError(f"{what} is not valid JSON: {exc}") from None
    return data


def ascii_uint(text: Any) -> Optional[int]:
    """The non-negative integer ``text`` spells in 1..18 ASCII digits (surrounding blanks allowed), else
    None: never raises, whatever the text."""
    if not isinstance(text, str):
        return None
    found = _ASCII_UINT.fullmatch(text.strip())
    return int(found.group(0)) if found else None
