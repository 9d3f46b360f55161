"""rexnet_serving.compat is exactly what the installed Paddle Serving needs on this Python and protobuf:
every Paddle Serving module the project imports loads with it and fails without either of its two parts,
the names it provides are the ones Paddle Serving's source takes from where Python removed them, and
the _pb2 modules it loads from their descriptors are all old-style and come out on the upb
implementation. A new release (or interpreter, or protobuf) that needs more, or no longer needs a
patch, fails here, so the patch is revisited then.
"""
from __future__ import annotations

import ast
import collections
import importlib.util
import subprocess
import sys
from pathlib import Path

from rexnet_serving import compat

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("paddle_serving_server", "paddle_serving_client", "paddle_serving_app")
PROJECT_SOURCES = ("rexnet_serving", "pipelines", "train", "tests")
# Paddle Serving modules that need extras the project installs only for some jobs (not part of the check).
OPTIONAL = {"paddle_serving_app.reader": "the bench extra (sentencepiece, pyclipper, shapely)"}


def used_modules() -> list:
    """Every paddle_serving_* module the project's own code imports (from its source, not a list kept
    by hand, so a new import is covered the day it is written)."""
    found = set()
    for top in PROJECT_SOURCES:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    found.add(node.module)
                    for alias in node.names:  # `from pkg.proto import x_pb2` imports a module too
                        if importlib.util.find_spec(node.module) and _is_module(f"{node.module}.{alias.name}"):
                            found.add(f"{node.module}.{alias.name}")
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return sorted(found - set(OPTIONAL))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


ALIASES_ONLY = ("import collections, collections.abc\n"
                "for n in %r: setattr(collections, n, getattr(collections.abc, n))\n" % (compat.ALIASES,))


def import_in_child(modules: list, patched: bool, prelude: str = "") -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter, with or without the patch (nothing else of ours loaded)."""
    prelude = "import rexnet_serving.compat\n" if patched else prelude
    code = prelude + "".join(f"import {m}\n" for m in modules)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def removed_collections_names() -> set:
    """Names Paddle Serving's source takes from ``collections`` that this Python has only in
    ``collections.abc`` (``from collections import X`` or ``collections.X``)."""
    # asked of a fresh interpreter: this one has the patch applied already (conftest imports it)
    missing = set(subprocess.run(
        [sys.executable, "-c", "import collections, collections.abc\n"
         "print(' '.join(n for n in collections.abc.__all__ if n not in vars(collections)))"],
        capture_output=True, text=True, check=True).stdout.split())
    used = set()
    for package in PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in root.rglob("*.py"):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "collections":
                    used.update(a.name for a in node.names if a.name in missing)
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id == "collections" and node.attr in missing):
                    used.add(node.attr)
    return used


def test_the_project_uses_paddle_serving_modules_found_from_source():
    modules = used_modules()
    assert "paddle_serving_server.pipeline" in modules and "paddle_serving_client.proto" in modules, modules


def test_every_used_paddle_serving_module_imports_with_the_patch():
    proc = import_in_child(used_modules(), patched=True)
    assert proc.returncode == 0, ("Paddle Serving needs more than rexnet_serving.compat provides:\n"
                                  + proc.stderr[-3000:])


def test_paddle_serving_still_needs_the_aliases():
    prelude = "import collections, rexnet_serving.compat\n" + "".join(
        f"del collections.{name}\n" for name in compat.ALIASES)
    proc = import_in_child(["paddle_serving_server.pipeline"], patched=False, prelude=prelude)
    assert proc.returncode != 0, "Paddle Serving imports without compat.ALIASES: remove them"
    assert "cannot import name 'Iterable' from 'collections'" in proc.stderr, proc.stderr[-3000:]


def test_paddle_serving_still_needs_its_pb2_modules_loaded_from_their_descriptors():
    proc = import_in_child(["paddle_serving_server.pipeline"], patched=False, prelude=ALIASES_ONLY)
    assert proc.returncode != 0, ("Paddle Serving's _pb2 modules load on this protobuf as they are: "
                                  "remove LegacyPb2Finder from rexnet_serving.compat")
    assert "Descriptors cannot be created directly" in proc.stderr, proc.stderr[-3000:]


def test_every_paddle_serving_pb2_is_old_style_and_loads_on_upb():
    from google.protobuf.internal import api_implementation
    assert api_implementation.Type() == "upb"
    names = []
    for package in PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.rglob("*_pb2.py")):
            source = path.read_text(encoding="utf-8")
            assert compat.serialized_descriptor(source) is not None, f"{path} is current protoc output"
            names.append(".".join((package,) + path.relative_to(root).with_suffix("").parts))
    assert len(names) >= 10, names
    # paddle_serving_client.pipeline is a copy of paddle_serving_server.pipeline whose proto defines the
    # same message names, which upb's default pool refuses to hold twice (the project imports the server's)
    names = [n for n in names if not n.startswith("paddle_serving_client.pipeline.")]
    proc = import_in_child(names, patched=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_loaded_pb2_module_round_trips_like_protoc_output():
    from paddle_serving_server.pipeline.proto import pipeline_service_pb2 as pb
    assert isinstance(pb.__loader__, compat._DescriptorLoader)
    request = pb.Request(key=["image"], value=["aGk="], logid=7)
    parsed = pb.Request.FromString(request.SerializeToString())
    assert (list(parsed.key), list(parsed.value), parsed.logid) == (["image"], ["aGk="], 7)
    assert pb.DESCRIPTOR.message_types_by_name["Response"] is pb._RESPONSE


def test_the_aliases_are_exactly_the_removed_names_paddle_serving_uses():
    assert set(compat.ALIASES) == removed_collections_names()


def test_apply_never_replaces_what_the_interpreter_has(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(collections, "Iterable", sentinel, raising=False)
    compat.apply()
    assert collections.Iterable is sentinel
