"""Validate KServe objects (YAML files, several documents each) against KServe's API types, strictly.

Run with the venv's Python (the test extra's `kserve` package and, through it, the
`kubernetes` client): every ServingRuntime / ClusterServingRuntime / InferenceService is walked against
the generated models' ``openapi_types`` and ``attribute_map`` (kserve.models for KServe's types,
kubernetes.client.models for the core ones they embed), so an unknown or misspelt field anywhere, or a
value of the wrong type, is an error with its path, and each object is built with the model's
constructor, which runs its own required-field checks.

    python scripts/validate_kserve.py FILE...      exit 0 all valid, 1 otherwise (one line per problem)
"""
import re
import sys
from typing import Any, List

import kubernetes.client.models as k8s_models
import yaml
from kserve import models as kserve_models

KINDS = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
         ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
         ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "datetime": str, "date": str, "bytes": str, "ResourceQuantity": (str, int, float)}


def model_class(name: str) -> Any:
    for module in (kserve_models, k8s_models):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def build(value: Any, type_name: str, path: str, problems: List[str]) -> Any:
    """``value`` as ``type_name`` (model objects built with their constructors, which check required
    fields); every unknown field or wrong type is appended to ``problems`` with its path."""
    # The generators spell containers both ways: list[X] / List[X], dict(str, X) / Dict[str, X].
    list_match = re.fullmatch(r"[lL]ist\[(.+)\]", type_name)
    dict_match = re.fullmatch(r"dict\(([^,]+), (.+)\)|[dD]ict\[([^,]+), (.+)\]", type_name)
    if value is None:
        return None
    if list_match:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        return [build(item, list_match.group(1), f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if dict_match:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a map, got {type(value).__name__}")
            return None
        item_type = dict_match.group(2) or dict_match.group(4)
        return {key: build(item, item_type, f"{path}.{key}", problems) for key, item in value.items()}
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]) or (type_name == "int" and isinstance(value, bool)):
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    cls = model_class(type_name)
    if not isinstance(value, dict):
        problems.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
        return None
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    kwargs = {}
    for key, item in value.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: unknown field (not in {type_name})")
            continue
        kwargs[by_json[key]] = build(item, cls.openapi_types[by_json[key]], f"{path}.{key}", problems)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        problems.append(f"{path}: {exc}")
        return None


def validate(doc: Any, where: str) -> List[str]:
    if not isinstance(doc, dict):
        return [f"{where}: not an object"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"{where}: {key[1]} {key[0]} is not a KServe type this checks ({', '.join(k for _, k in KINDS)})"]
    where = f"{where}: {key[1]} {doc.get('metadata', {}).get('name', '?')}"
    problems: List[str] = []
    build(doc, KINDS[key], where, problems)
    return problems


def main(paths: List[str]) -> int:
    problems: List[str] = []
    count = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    count += 1
                    problems += validate(doc, path)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"validate_kserve: {count} objects valid")
    return 1 if problems or not count else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
