"""Model registry: PaddleClas's names mapped to factories, and ``build_model``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from paddle import nn

from .rexnet import (VARIANTS, ReXNet_1_0, ReXNet_1_3, ReXNet_1_5, ReXNet_2_0, ReXNet_3_0,
                     ReXNetV1, ReXNetVariant)
from .weights import WeightsError, load_weights, read_state_dict

MODELS: Dict[str, Callable[..., ReXNetV1]] = {
    "ReXNet_1_0": ReXNet_1_0,
    "ReXNet_1_3": ReXNet_1_3,
    "ReXNet_1_5": ReXNet_1_5,
    "ReXNet_2_0": ReXNet_2_0,
    "ReXNet_3_0": ReXNet_3_0,
}


def list_models() -> List[str]:
    return list(MODELS)


def build_model(name: str, class_num: int = 1000, **kwargs: Any) -> nn.Layer:
    """Build a model by its PaddleClas name, e.g. ``build_model("ReXNet_1_0", class_num=10)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](class_num=class_num, **kwargs)


__all__ = ["MODELS", "VARIANTS", "ReXNetV1", "ReXNetVariant", "WeightsError", "build_model",
           "list_models", "load_weights", "read_state_dict", *MODELS]
