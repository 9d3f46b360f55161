"""SECURITY.md's "What faces the network" against what is deployed, so the two cannot drift: every port
of rexnet_serving.defaults is in the table with its value and Kubernetes port name, and the table's
names are exactly the ports the Deployment, the NetworkPolicy and the Services expose (base, plus the
brpc-cpp component for ``brpc``); the per-pod totals are the config defaults' sums; the Kubernetes
section names every port the NetworkPolicy admits. Reads the YAML files themselves (no kubectl)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import yaml

from rexnet_serving import defaults

REPO = Path(__file__).resolve().parents[1]
SECURITY = (REPO / "SECURITY.md").read_text(encoding="utf-8")
BASE = REPO / "k8s" / "base"
BRPC_COMPONENT = REPO / "k8s" / "components" / "brpc-cpp"
PORT_CONSTANTS = ("HTTP_PORT", "GRPC_PORT", "OIP_HTTP_PORT", "OIP_GRPC_PORT", "METRICS_PORT", "BRPC_PORT")
COMPONENT_ONLY = {"brpc"}  # served by a sidecar that only the brpc-cpp component adds


def section(title: str) -> str:
    start = SECURITY.index(f"## {title}")
    end = SECURITY.find("\n## ", start + 1)
    return SECURITY[start:end if end != -1 else None]


def documents(path: Path) -> Iterator[Dict[str, Any]]:
    yield from (doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)


def find(path: Path, kind: str, name: str = None) -> Dict[str, Any]:
    found = [d for d in documents(path) if d.get("kind") == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (path, kind, name)
    return found[0]


@pytest.fixture(scope="module")
def table() -> Dict[str, tuple]:
    """k8s port name -> (port, defaults constant) from the ports table."""
    rows = re.findall(r"^\| (\d+) \(`(\w+)`\) \| `([\w-]+)` \|", section("What faces the network"), re.M)
    assert rows, "the ports table of SECURITY.md was not found (or its format changed)"
    return {name: (int(port), constant) for port, constant, name in rows}


def container_ports() -> Dict[str, int]:
    deployment = find(BASE / "deployment.yaml", "Deployment")
    ports = {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    sidecar = find(BRPC_COMPONENT / "sidecar.yaml", "Deployment")
    ports.update({p["name"]: p["containerPort"] for c in sidecar["spec"]["template"]["spec"]["containers"]
                  for p in c.get("ports", [])})
    return ports


def policy_port_names() -> List[str]:
    policy = find(BASE / "networkpolicy.yaml", "NetworkPolicy")
    names = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    for patch in find(BRPC_COMPONENT / "kustomization.yaml", "Component")["patches"]:
        if patch.get("target", {}).get("kind") == "NetworkPolicy":
            names += [op["value"]["port"] for op in yaml.safe_load(patch["patch"])]
    return names


def test_every_default_port_is_in_the_table_with_its_value(table: Dict[str, tuple]) -> None:
    assert sorted(constant for _, constant in table.values()) == sorted(PORT_CONSTANTS)
    for name, (port, constant) in table.items():
        assert getattr(defaults, constant) == port, f"SECURITY.md says {constant} is {port}"


def test_the_table_is_what_the_manifests_expose(table: Dict[str, tuple]) -> None:
    ports = container_ports()
    assert {name: port for name, (port, _) in table.items()} == ports
    policy = policy_port_names()
    assert sorted(policy) == sorted(table), "the NetworkPolicy admits other ports than SECURITY.md lists"
    for service in ("rexnet-serving", "rexnet-serving-headless"):
        exposed = {p["name"]: p["port"] for path in (BASE / "service.yaml", BRPC_COMPONENT / "service.yaml")
                   for p in find(path, "Service", service)["spec"]["ports"]}
        for name, port in exposed.items():
            assert table[name][0] == port, f"Service {service} port {name}"
    base_policy = set(policy) - COMPONENT_ONLY
    kubernetes = section("What the Kubernetes manifests add")
    for name in policy:
        assert f"`{name}`" in kubernetes, f"the Kubernetes section does not name the admitted port {name}"
    assert base_policy == set(table) - COMPONENT_ONLY


def test_the_stated_totals_are_the_config_defaults() -> None:
    from rexnet_pipelines.config import load_config
    rex = load_config(REPO / "serving_configs" / "base.yml").rexnet
    text = section("What faces the network")

    def stated(key: str) -> int:
        match = re.search(rf"2 × `{key}` = (\d+)", text)
        assert match, f"SECURITY.md states no total for {key}"
        return int(match.group(1))

    for key in ("http_max_connections", "grpc_max_connections", "grpc_max_pending_rpcs"):
        assert stated(key) == 2 * rex[key], key
    from rexnet_pipelines.health import MAX_CONNECTIONS
    total = 2 * rex["http_max_connections"] + 2 * rex["grpc_max_connections"] + MAX_CONNECTIONS
    assert f"{2 * rex['http_max_connections']} + {2 * rex['grpc_max_connections']} + {MAX_CONNECTIONS} = {total}" \
        in text
    assert f"| open connections on the metrics port | {MAX_CONNECTIONS} |" in text
    assert f"`max_in_flight_requests` = {rex['max_in_flight_requests']}" in text
