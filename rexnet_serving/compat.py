"""What Paddle Serving 0.9.0 needs on Python 3.11 and a current protobuf, provided in one place.

Why: Paddle Serving 0.9.0 is the framework's last release, written for Python <= 3.9 and protobuf 3.
Two things of it break on the interpreter and protobuf this project runs (README "Python version"):

* ``collections.Iterable``: paddle_serving_client/httpclient.py does ``from collections import
  Iterable`` (Python 3.10 removed the ABC aliases from ``collections``), and every Pipeline import goes
  through it (pipeline.operator imports paddle_serving_client). ALIASES are put back.
* Its generated ``_pb2`` modules are protoc-3.11-style code (``_descriptor.FieldDescriptor(...)``), which
  protobuf's upb implementation refuses ("Descriptors cannot be created directly"); the alternative, the
  pure-Python implementation, costs ~0.5 s per request on the bRPC front door's float feed (measured:
  scripts/protobuf_cost.py, README "Python version"). Each such module is the serialized
  FileDescriptorProto its code embeds (``serialized_pb=b"..."``) plus boilerplate, so LegacyPb2Finder
  loads those modules instead as current protoc output would: the same descriptor added to the default
  pool, message classes built by ``google.protobuf.internal.builder`` (what protoc >= 3.20 generates),
  under the same module names, so Paddle Serving's own code (PipelineServer, PipelineClient, its
  _pb2_grpc modules) uses them unchanged. The descriptor bytes are read from the file with ``ast``
  (literals only; the old code is never run).

Both are installed before anything imports Paddle Serving: ``rexnet_serving/__init__.py`` and
``rexnet_pipelines/__init__.py`` import this module, so every entry point has it; nothing inside
site-packages is edited. tests/test_compat.py fails when an installed Paddle Serving needs more than
this or no longer needs it.
"""
from __future__ import annotations

import ast
import collections
import collections.abc
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from types import ModuleType
from typing import Optional, Sequence

#: ``collections`` names Paddle Serving 0.9.0 imports that Python 3.10 moved to ``collections.abc`` only.
ALIASES = ("Iterable",)
#: packages whose old-style ``*_pb2`` modules are loaded from their embedded descriptor
LEGACY_PB2_PACKAGES = ("paddle_serving_server", "paddle_serving_client", "paddle_serving_app")
# Paddle Serving imports some of them also as top-level modules (its proto/ directories go on sys.path)
_IN_PACKAGE = re.compile(r"[/\\](%s)[/\\]" % "|".join(LEGACY_PB2_PACKAGES))


def serialized_descriptor(source: str) -> Optional[bytes]:
    """The ``serialized_pb`` literal of an old-style _pb2 module's FileDescriptor, or None when the
    module is current protoc output (``AddSerializedFile``) or has none. Older protoc wrote the bytes
    as ``_b('...')`` (``_b`` = latin-1 encode on Python 3)."""
    if "AddSerializedFile" in source:
        return None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "serialized_pb":
                    value = keyword.value
                    if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "_b"
                            and len(value.args) == 1):
                        text = ast.literal_eval(value.args[0])
                        return text.encode("latin-1") if isinstance(text, str) else None
                    value = ast.literal_eval(value)
                    return value if isinstance(value, bytes) else None
    return None


class _DescriptorLoader(importlib.abc.Loader):
    def __init__(self, descriptor: bytes) -> None:
        self.descriptor = descriptor

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        from google.protobuf import descriptor_pool
        from google.protobuf.internal import builder
        namespace = vars(module)
        namespace["DESCRIPTOR"] = descriptor_pool.Default().AddSerializedFile(self.descriptor)
        builder.BuildMessageAndEnumDescriptors(namespace["DESCRIPTOR"], namespace)
        builder.BuildTopDescriptorsAndMessages(namespace["DESCRIPTOR"], module.__name__, namespace)


class LegacyPb2Finder(importlib.abc.MetaPathFinder):
    """Finds Paddle Serving's old-style ``*_pb2`` modules and loads them from their descriptor."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if not fullname.endswith("_pb2"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        origin = spec.origin if spec is not None else None
        if not origin or not origin.endswith(".py") or not _IN_PACKAGE.search(origin):
            return None
        return pb2_spec(fullname, origin)


def pb2_spec(fullname: str, origin: str) -> importlib.machinery.ModuleSpec:
    """The spec a ``_pb2`` file at ``origin`` loads with: from its descriptor when it is old-style, as
    it is otherwise (for code that loads such a file by path, e.g. rexnet_serving.clients.grpc)."""
    with open(origin, encoding="utf-8") as f:
        descriptor = serialized_descriptor(f.read())
    loader = _DescriptorLoader(descriptor) if descriptor is not None else None
    return importlib.util.spec_from_file_location(fullname, origin, loader=loader)


def apply() -> None:
    """Idempotent: sets each missing alias (never replaces what the interpreter has) and puts the
    finder first on sys.meta_path once."""
    for name in ALIASES:
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    if not any(isinstance(finder, LegacyPb2Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LegacyPb2Finder())


apply()
