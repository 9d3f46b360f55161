"""Prometheus metrics of the service, collected where requests are processed.

Paddle Serving 0.9.0's Pipeline has no usable metrics endpoint (its prometheus_metrics.py counters are
never exported in thread mode), so the service registers its own with prometheus_client. The whole DAG
runs as threads of one process (serving_configs: is_thread_op true, build_dag_each_worker false), so the
default registry sees every op; no multiprocess mode is needed.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

STAGES = ("decode", "preprocess", "infer", "postprocess")
REFUSAL_REASONS = ("overloaded", "deadline", "cancelled", "draining")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("rexnet_requests", "Pipeline requests answered, by err_no (0 = success)", ["err_no"])
IMAGES = Counter("rexnet_images", "Images classified (code 'ok') or refused (the image error code)",
                 ["code"])
REQUEST_SECONDS = Histogram("rexnet_request_seconds", "Time from receiving a request to answering it",
                            buckets=_LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("rexnet_stage_seconds", "Time spent in one stage for one request "
                          "(infer: for one auto-batch)", ["stage"], buckets=_LATENCY_BUCKETS)
BATCH_IMAGES = Histogram("rexnet_batch_images", "Images per forward pass", buckets=_BATCH_BUCKETS)
BATCH_WAIT = Histogram("rexnet_batch_wait_seconds", "Time an auto-batch waited for requests still being "
                       "prepared, after its first request (0 when nothing was on its way)",
                       buckets=(0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
IN_FLIGHT = Gauge("rexnet_in_flight_requests", "Requests admitted and not yet answered")
REFUSED = Counter("rexnet_refused_requests", "Requests refused or dropped before their work was done, by "
                  "reason: overloaded (admission limit), deadline, cancelled (client gone), draining",
                  ["reason"])
MODEL_REQUESTS = Counter("rexnet_model_requests", "Requests answered, by the model and version they went to "
                         "(empty when refused before a model was chosen) and err_no",
                         ["model", "version", "err_no"])
MODEL_REQUEST_SECONDS = Histogram("rexnet_model_request_seconds", "Time from receiving a request to answering "
                                  "it, by model and version", ["model", "version"], buckets=_LATENCY_BUCKETS)
# rexnet_runtime_info{runtime="openvino",precision="fp32",device="cpu"} 1: what the infer op really runs
# (rexnet_serving.runtimes.base.runtime_info of the loaded predictor), set once at start-up.
RUNTIME = Info("rexnet_runtime", "Inference runtime, precision and device the service runs")
# rexnet_cpus{source="cgroup quota"} 4 and rexnet_sizing{setting="op.infer.concurrency",origin="derived"} 1:
# the CPUs the process may use (rexnet_serving.cpus) and the thread counts chosen from them, set at start.
CPUS = Gauge("rexnet_cpus", "CPUs the process may use, by what bounds them: affinity, cgroup quota or host",
             ["source"])
SIZING = Gauge("rexnet_sizing", "Thread counts of the service by config key, derived from rexnet_cpus "
               "(origin derived) or set in the config (origin config)", ["setting", "origin"])
READY = Gauge("rexnet_ready", "1 when the service takes requests (model loaded, warmed up, not draining)")



def set_sizing(sizing: Any) -> None:
    """Export a rexnet_serving.cpus.Sizing (the config's thread counts and the CPUs they came from)."""
    CPUS.labels(sizing.cpus.source).set(sizing.cpus.count)
    for key, value in (("op.prepare.concurrency", sizing.prepare_workers), ("op.infer.concurrency", sizing.infer_streams),
                       ("op.infer.local_service_conf.thread_num", sizing.infer_threads)):
        SIZING.labels(key, "derived" if key in sizing.derived else "config").set(value)
    if sizing.lone_image_threads:  # OpenVINO's one-image model (rexnet_serving.cpus.lone_image_threads)
        SIZING.labels("lone_image_threads", "derived").set(sizing.lone_image_threads)


for _stage in STAGES:  # export every stage from the start, so dashboards see zeros rather than gaps
    STAGE_SECONDS.labels(_stage)
REQUESTS.labels("0")
for _reason in REFUSAL_REASONS:
    REFUSED.labels(_reason)
