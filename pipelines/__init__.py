"""rexnet_pipelines: the ReXNet classification service on Paddle Serving 0.9.0's Pipeline (`rexnet-serve`).

Modules: ``protocol`` (the wire contract shared with the clients), ``config`` (validated config files),
``ops`` (the decode -> preprocess -> infer -> postprocess DAG), ``metrics`` and ``health`` (Prometheus
and probes), ``server`` (life cycle: load, warm up, ready, serve, drain), ``cli`` (the command).
Nothing of these is imported by this file: clients import ``protocol`` without pulling in the server.
"""
import rexnet_serving.compat  # noqa: F401  (before any Paddle Serving import: see that module)
