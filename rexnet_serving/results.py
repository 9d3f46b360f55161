"""The result of classifying one image, as the service sends it and every client returns it.

Wire form (JSON, the same over HTTP, gRPC and bRPC): one entry per image, in request order, either
``{"predictions": [{"class_id": 281, "label": "tabby, tabby cat", "score": 0.91}, ...]}`` or
``{"error": {"code": "truncated", "message": "..."}}``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class ImageResult:
    predictions: List[Prediction] = field(default_factory=list)
    error_code: Optional[str] = None
    error_message: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    def to_dict(self) -> Dict[str, Any]:
        if self.ok:
            return {"predictions": [asdict(p) for p in self.predictions]}
        return {"error": {"code": self.error_code, "message": self.error_message}}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ImageResult":
        if "error" in data:
            return cls(error_code=str(data["error"]["code"]),
                       error_message=str(data["error"]["message"]))
        return cls(predictions=[Prediction(int(p["class_id"]), str(p["label"]), float(p["score"]))
                                for p in data["predictions"]])

    @classmethod
    def failure(cls, code: str, message: str) -> "ImageResult":
        return cls(error_code=code, error_message=message)
