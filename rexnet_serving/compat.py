"""What Paddle Serving 0.9.0 needs from Python that Python 3.11 no longer has, provided in one place.

Why: Paddle Serving 0.9.0 is the framework's last release and was written for Python <= 3.9. On 3.11 the
only thing its modules miss is ``collections.Iterable`` (paddle_serving_client/httpclient.py does
``from collections import Iterable``; Python 3.10 removed the ABC aliases from ``collections``), and
every Pipeline import goes through that module (pipeline.operator imports paddle_serving_client).
The alias is put back here, before anything imports Paddle Serving: ``rexnet_serving/__init__.py`` and
``rexnet_pipelines/__init__.py`` import this module, so every entry point has it; nothing inside
site-packages is edited. tests/test_compat.py fails when an installed Paddle Serving needs more than
ALIASES or no longer needs them, so this list tracks the installed release.

Paddle Serving's generated ``_pb2`` modules (protoc 3.x style) run on protobuf 3.20, which on 3.11 is
the pure-Python implementation (3.20.3 has no C extension for 3.11): see README "Python version" for
what that costs per request.
"""
from __future__ import annotations

import collections
import collections.abc

#: ``collections`` names Paddle Serving 0.9.0 imports that Python 3.10 moved to ``collections.abc`` only.
ALIASES = ("Iterable",)


def apply() -> None:
    """Idempotent: sets each alias that is missing (never replaces what the interpreter has)."""
    for name in ALIASES:
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


apply()
