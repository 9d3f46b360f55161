"""Optimizer and learning-rate schedule of the ReXNet recipe (arXiv:2007.00992, Sec. 4.1).

SGD with momentum and L2 weight decay; the LR is given for a reference global batch (512) and scaled
linearly to the real one (Goyal et al., "Accurate, Large Minibatch SGD", arXiv:1706.02677), warmed up
linearly from 0 over the first epochs and then decayed with a cosine (Loshchilov & Hutter, SGDR,
arXiv:1608.03983) to ``min_lr``. Both are stepped per iteration.
"""
from __future__ import annotations

from typing import Any, Dict

import paddle
from paddle import nn
from paddle.optimizer.lr import CosineAnnealingDecay, LinearWarmup, LRScheduler


def scaled_lr(optim: Dict[str, Any], global_batch: int) -> float:
    return optim["lr"] * global_batch / optim["lr_batch_size"]


def build_scheduler(optim: Dict[str, Any], global_batch: int, epochs: int,
                    iters_per_epoch: int) -> LRScheduler:
    peak = scaled_lr(optim, global_batch)
    total = epochs * iters_per_epoch
    warmup = min(optim["warmup_epochs"] * iters_per_epoch, total)
    cosine = CosineAnnealingDecay(peak, T_max=max(1, total - warmup), eta_min=optim["min_lr"])
    if warmup == 0:
        return cosine
    return LinearWarmup(cosine, warmup_steps=warmup, start_lr=0.0, end_lr=peak)


def build_optimizer(model: nn.Layer, optim: Dict[str, Any],
                    scheduler: LRScheduler) -> paddle.optimizer.Optimizer:
    return paddle.optimizer.Momentum(
        learning_rate=scheduler, momentum=optim["momentum"], parameters=model.parameters(),
        weight_decay=paddle.regularizer.L2Decay(optim["weight_decay"]))
