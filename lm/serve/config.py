"""The `serve` part of the run config: what `--mode serve` listens on, its limits, and where feedback goes."""

from __future__ import annotations

import ipaddress

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.models.quantize import check_choice

FIELDS = {
    "serve.host": "127.0.0.1",  # any other address needs serve.api_key
    "serve.port": 8000,  # 0: a free port the OS picks (printed at start-up)
    "serve.api_key": "",  # clients send `Authorization: Bearer KEY`; required off loopback; never logged
    "serve.model_name": "",  # the id /v1/models lists; empty: the workdir's name
    "serve.max_batch": 32,  # decode slots (sequences decoded together)
    "serve.decode_block": 32,  # decode steps per call between admissions (fewer Python round trips per token)
    "serve.max_queue": 256,  # requests waiting for a slot; beyond it: 429 with Retry-After
    "serve.max_body_bytes": 1_000_000,  # request body; larger: 413
    "serve.max_tokens": 256,  # the most a request may ask for (also capped by the context)
    "serve.max_n": 8,  # the most choices per request (each takes a slot)
    "serve.max_stop": 4,  # stop strings per request
    "serve.request_timeout": 120.0,  # seconds from arrival to the last token; beyond: 504
    "serve.warmup": True,  # compile every prefill bucket and the decode step before listening
    "serve.watch_interval": 2.0,  # seconds between looks at the workdir for a newer model (0: never swap)
    "serve.feedback_dir": "",  # where feedback chunks go; empty: online.stream's dir: folder, else WORKDIR/serve/chunks
    "serve.feedback_chunk_size": 64,  # a chunk is written once this many feedback records wait ...
    "serve.feedback_interval": 600.0,  # ... or once the oldest has waited this many seconds
    "serve.quantize": "none",  # int8: serve int8 matmul weights (quantized at load and at every swap)
}


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  serve = config.serve
  require(isinstance(serve.host, str) and bool(serve.host), "config.serve.host must be an address, e.g. 127.0.0.1.")
  if mode == "serve":
    require(is_loopback(serve.host) or bool(serve.api_key),
            f"config.serve.host={serve.host!r} is not a loopback address, and serving beyond this machine needs a "
            "key. Fix: set --config.serve.api_key=... (clients send `Authorization: Bearer KEY`), or serve on "
            "127.0.0.1.")
  require(isinstance(serve.port, int) and 0 <= serve.port <= 65535,
          f"config.serve.port={serve.port!r} must be a port number 0..65535 (0: any free port).")
  for field in ("max_batch", "decode_block", "max_queue", "max_body_bytes", "max_tokens", "max_n", "feedback_chunk_size"):
    value = serve[field]
    require(isinstance(value, int) and value >= 1, f"config.serve.{field}={value!r} must be an integer >= 1.")
  require(isinstance(serve.max_stop, int) and serve.max_stop >= 0, "config.serve.max_stop must be >= 0.")
  require(serve.max_n <= serve.max_batch, f"config.serve.max_n={serve.max_n} choices would not fit in "
          f"serve.max_batch={serve.max_batch} slots; lower max_n or raise max_batch.")
  for field in ("request_timeout", "feedback_interval"):
    require(serve[field] > 0, f"config.serve.{field}={serve[field]!r} must be > 0 seconds.")
  require(serve.watch_interval >= 0, "config.serve.watch_interval must be >= 0 seconds (0: never swap).")
  check_choice("serve.quantize", serve.quantize)


CONFIG = ConfigPart("lm.serve", FIELDS, validate)
