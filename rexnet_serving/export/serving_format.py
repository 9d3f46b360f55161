"""Paddle Serving 0.9.0's model format: ``serving_server/`` (model + server config) and
``serving_client/`` (client config).

What Paddle Serving reads (paddle_serving_app/local_predict.py, paddle_serving_server/server.py and
the C++ engine paddle_inference/paddle/include/paddle_engine.h):
- ``serving_server_conf.prototxt``: a text-format ``GeneralModelConfig`` (feed_var/fetch_var with
  name, alias_name, is_lod_tensor, feed_type/fetch_type, shape without the batch dimension);
  LocalPredictor, the Pipeline ops and ``Server.load_model_config`` parse this one.
- ``serving_client_conf.prototxt``: the same message for clients.
- ``*.stream.prototxt``: the binary serialisation of the same message, which Paddle Serving's own
  ``save_model`` writes beside each text file for the C++ clients.
- Model files: LocalPredictor globs ``*.pdmodel`` + ``*.pdiparams``; the C++ engine takes the first
  regular file ending in ``.pdmodel|__model__|model`` and ``.pdiparams|__params__|params``, so the
  directory holds exactly one of each (no symlinks: the C++ engine skips them) and no ``__params__``
  (which would switch both to the "combined __model__/__params__" layout).
- ``fluid_time_file``: C++ Serving's reload timestamp, which ``Server.prepare_server`` touches in the
  model directory; it is created here so a read-only model volume still has it.

``paddle_serving_client.io.inference_model_to_serving`` would write all this but imports
paddle.fluid, which Paddle 2.6 removed; so the configs are built from Paddle Serving's own protobuf
messages instead.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from paddle_serving_client.proto import general_model_config_pb2

from ..manifest import CLIENT_CONF, MODEL_FILE, PARAMS_FILE, SERVER_CONF, TensorSpec

SERVER_CONF_STREAM = "serving_server_conf.stream.prototxt"
CLIENT_CONF_STREAM = "serving_client_conf.stream.prototxt"
RELOAD_STAMP = "fluid_time_file"

# GeneralModelConfig's feed_type/fetch_type codes (paddle_serving_client.io.var_type_conversion).
DTYPE_CODES = {"int64": 0, "float32": 1, "int32": 2, "float64": 3, "int16": 4, "float16": 5,
               "bfloat16": 6, "uint8": 7, "int8": 8, "bool": 9, "complex64": 10, "complex128": 11}


def model_config(feed: TensorSpec, fetch: TensorSpec) -> general_model_config_pb2.GeneralModelConfig:
    """The GeneralModelConfig of a single-feed, single-fetch dense model (batch dim left out)."""
    config = general_model_config_pb2.GeneralModelConfig()
    feed_var = config.feed_var.add()
    feed_var.name, feed_var.alias_name = feed.name, feed.alias
    feed_var.is_lod_tensor = False
    feed_var.feed_type = DTYPE_CODES[feed.dtype]
    feed_var.shape.extend(d for d in feed.shape if d >= 0)
    fetch_var = config.fetch_var.add()
    fetch_var.name, fetch_var.alias_name = fetch.name, fetch.alias
    fetch_var.is_lod_tensor = False
    fetch_var.fetch_type = DTYPE_CODES[fetch.dtype]
    fetch_var.shape.extend(d for d in fetch.shape if d >= 0)
    return config


def _write_config(directory: Path, text_name: str, stream_name: str,
                  config: general_model_config_pb2.GeneralModelConfig) -> None:
    (directory / text_name).write_text(text_format.MessageToString(config), encoding="utf-8")
    (directory / stream_name).write_bytes(config.SerializeToString())


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space and is a regular file to the C++ engine; copy across filesystems.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_serving_model(inference_dir: Path, server_dir: Path, client_dir: Path,
                        feed: TensorSpec, fetch: TensorSpec) -> None:
    """Write ``server_dir`` (model files + server configs) and ``client_dir`` (client configs)."""
    if feed.alias != feed.name:
        # LocalPredictor looks feed tensors up by the program's input names.
        raise ValueError(f"feed alias {feed.alias!r} must equal the input name {feed.name!r}")
    server_dir.mkdir(parents=True, exist_ok=True)
    client_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, PARAMS_FILE):
        _link_or_copy(inference_dir / name, server_dir / name)
    (server_dir / RELOAD_STAMP).touch()
    config = model_config(feed, fetch)
    _write_config(server_dir, SERVER_CONF, SERVER_CONF_STREAM, config)
    _write_config(client_dir, CLIENT_CONF, CLIENT_CONF_STREAM, config)
