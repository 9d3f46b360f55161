"""Imports run one way: no cycle among the project's modules, lazy (in-function) imports included.

The graph is grimp's (import-linter's engine: it resolves relative imports and ``from package import
module`` the way Python does); a cycle is a direct import A -> B with a chain back from B to A.
"""
from __future__ import annotations

from typing import List, Tuple

import grimp
import pytest

PACKAGES = ("rexnet_serving", "rexnet_pipelines", "rexnet_train")


def cycles(graph: grimp.ImportGraph) -> List[Tuple[str, ...]]:
    """Every import that closes a cycle, as the chain importer -> ... -> importer (shortest way back)."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                found.append((importer,) + tuple(back))
    return found


def test_the_check_finds_a_cycle_through_a_third_module():
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert ("p.a", "p.b", "p.c", "p.a") in cycles(graph)
    graph.remove_import(importer="p.c", imported="p.a")
    assert cycles(graph) == []


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_no_import_cycle_between_project_modules(graph):
    assert len(graph.modules) > 100  # the whole project was read, not an empty graph
    found = cycles(graph)
    assert not found, "import cycles (each import -> ... -> back):\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_library_never_imports_the_service(graph):
    """rexnet_serving (clients, wire contract, runtimes) sits below rexnet_pipelines: a client install
    never pulls in the server, and the service's wire contract is imported from below."""
    assert not graph.chain_exists(importer="rexnet_serving", imported="rexnet_pipelines", as_packages=True), \
        graph.find_shortest_chains(importer="rexnet_serving", imported="rexnet_pipelines")
