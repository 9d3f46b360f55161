"""rexnet_pipelines: the ReXNet classification service on Paddle Serving 0.9.0's Pipeline (`rexnet-serve`).

Modules, in the order a request meets them (the walk-through with each step's file: pipelines/README.md):
``http_front`` (the Pipeline HTTP API on Tornado), ``pipeline_front`` (the Pipeline's wire <-> the typed
request and answer; its gRPC servicer) and ``oip_front`` (the Open Inference Protocol's REST and gRPC)
each build a ``request.ClassifyRequest`` and hand it to ``frontdoor`` (one call path; the hardened gRPC
server), which admits it through ``admission`` (bounded requests and body bytes, deadlines, cancellation)
into the DAG of ``ops`` (prepare: decode and preprocess -> infer -> the answer), whose infer op takes its
batches from ``batcher``; ``paddle_adapter`` is the one module that touches Paddle Serving's hooks.
Around them: ``settings`` and ``config`` (typed, validated settings and config files), ``server`` (life
cycle: load, warm up, ready, serve, drain), ``metrics`` and ``health`` (Prometheus and probes),
``loop_thread`` (stopping a Tornado loop thread), ``floor`` (the model-less stand-in that rexnet-bench
measures the framework with), ``cli`` (the command).

The wire contract (err_no codes, keys, the results' encoding) is not here but in
rexnet_serving.pipeline_wire, below both this service and its clients. This file imports only
rexnet_serving.compat (Paddle Serving 0.9.0 on Python 3.11), before anything imports Paddle Serving.
"""
import rexnet_serving.compat  # noqa: F401  (before any Paddle Serving import: see that module)
