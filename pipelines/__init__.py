"""rexnet_pipelines: the ReXNet classification service on Paddle Serving 0.9.0's Pipeline (`rexnet-serve`).

Modules, in the order a request meets them:
``http_front`` (the Pipeline HTTP API on Tornado) and ``oip_front`` (the Open Inference Protocol's REST
and gRPC) hand every request to ``frontdoor`` (one call path; the hardened gRPC server), which admits it
through ``admission`` (bounded requests in flight, deadlines, cancellation) into the DAG of ``ops``
(decode and preprocess -> infer -> postprocess), whose infer op takes its batches from ``batcher``.
Around them: ``config`` (validated config files), ``server`` (life cycle: load, warm up, ready, serve,
drain), ``metrics`` and ``health`` (Prometheus and probes), ``floor`` (the model-less stand-in that
rexnet-bench measures the framework with), ``cli`` (the command).

The wire contract (err_no codes, keys, the results' encoding) is not here but in
rexnet_serving.pipeline_wire, below both this service and its clients. Nothing is imported by this file.
"""
