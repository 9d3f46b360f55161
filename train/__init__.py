"""rexnet_train: training and fine-tuning the ReXNet family (PaddleClas names), single- or multi-GPU.

In the repository this package lives in ``train/``; setup.py installs it as ``rexnet_train`` so that no
top-level ``train`` package lands in site-packages. Entry point: ``rexnet-train`` (``rexnet_train.cli``).
"""
