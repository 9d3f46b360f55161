"""Top-1/top-k accuracy and mean cross-entropy of an evaluation pass (PaddleClas's TopkAcc and CELoss),
kept as sums so that batches and ranks of any size add up to exactly the per-sample mean.

Used by the training loop's evaluation and by ``rexnet-eval``, so the two print the same number for
the same weights and data.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import paddle
import paddle.nn.functional as F

TOP_K = 5
# Probabilities from an export's softmax underflow to 0.0 in float32 for logits ~104 below the best, which
# would make the loss infinite: such a sample counts -log(PROB_FLOOR) = 27.6 instead.
PROB_FLOOR = 1e-12


class EvalTotals:
    """Summed loss, top-1 and top-k hits and the sample count of the batches seen so far.

    The sums are device tensors, read once by ``sums()``: float()/int() per batch would make the host
    wait for the GPU at every batch.
    """

    def __init__(self) -> None:
        self._loss = paddle.zeros([], dtype="float64")
        self._top1 = paddle.zeros([], dtype="int64")
        self._topk = paddle.zeros([], dtype="int64")
        self.seen = 0  # from shapes: known on the host

    def add(self, scores: paddle.Tensor, labels: paddle.Tensor, k: int,
            probabilities: bool = False) -> None:
        """One batch: ``scores`` [N, C] are logits, or probabilities when ``probabilities`` (an
        export with its softmax); ``labels`` [N] int64 class ids."""
        if probabilities:
            picked = paddle.take_along_axis(scores, labels.unsqueeze(1), axis=1)
            loss = -paddle.log(paddle.clip(picked, min=PROB_FLOOR)).sum()
        else:
            loss = F.cross_entropy(scores, labels, reduction="sum")
        self._loss += loss.astype("float64")
        hits = (paddle.topk(scores, k, axis=1)[1] == labels.unsqueeze(1)).astype("int64")
        self._top1 += hits[:, 0].sum()
        self._topk += hits.sum()
        self.seen += int(labels.shape[0])

    def sums(self) -> List[float]:
        """[loss sum, top-1 hits, top-k hits, samples]: what distributed.sum_across_ranks adds up."""
        return [float(self._loss), int(self._top1), int(self._topk), self.seen]


def eval_metrics(sums: Sequence[float], k: int, prefix: str = "val_") -> Dict[str, Union[float, int]]:
    """``{val_loss, val_top1, val_top<k>, val_samples}`` from ``EvalTotals.sums()``, as metrics.jsonl
    records them."""
    loss_sum, top1, topk, seen = sums
    count = max(seen, 1)
    return {f"{prefix}loss": loss_sum / count, f"{prefix}top1": top1 / count,
            f"{prefix}top{k}": topk / count, f"{prefix}samples": int(seen)}
