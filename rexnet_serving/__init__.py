"""rexnet-serving: the ReXNet family (PaddleClas layout) from training to Paddle Serving."""

__version__ = "0.1.0"
