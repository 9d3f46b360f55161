"""The optimizer of the ReXNet recipe: timm's ``--opt sgd``, i.e. SGD with Nesterov momentum.

timm (2020) builds ``sgd`` as ``torch.optim.SGD(..., nesterov=True)`` and, with weight decay on, passes
two parameter groups (``add_weight_decay``, ``filter_bias_and_bn=True``): every 1-D parameter (BatchNorm
weights and biases, biases) and every ``*.bias`` gets no weight decay. Paddle's ``Momentum`` has both:
``use_nesterov`` and per-group ``weight_decay`` (fused L2 decay); PaddleClas calls the grouping
``one_dim_param_no_weight_decay``. The LR schedule is ``rexnet_train.schedule``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import paddle
from paddle import nn
from paddle.optimizer.lr import LRScheduler


def split_weight_decay(model: nn.Layer) -> Tuple[List[paddle.Tensor], List[paddle.Tensor]]:
    """(decayed, exempt) trainable parameters: exempt are the 1-D ones and biases (timm's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        (no_decay if len(param.shape) <= 1 or name.endswith(".bias") else decay).append(param)
    return decay, no_decay


def build_optimizer(model: nn.Layer, optim: Dict[str, Any],
                    scheduler: LRScheduler) -> paddle.optimizer.Optimizer:
    if optim["one_dim_param_no_weight_decay"]:
        decay, no_decay = split_weight_decay(model)
        parameters: Any = [{"params": decay, "weight_decay": optim["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}]
    else:
        parameters = [{"params": [p for p in model.parameters() if not p.stop_gradient],
                       "weight_decay": optim["weight_decay"]}]
    return paddle.optimizer.Momentum(learning_rate=scheduler, momentum=optim["momentum"],
                                     parameters=parameters, use_nesterov=optim["use_nesterov"])
