"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own (several servers in one process,
as tests run them, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the API)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
  """Requests by route and status, latency and time to first token, tokens, slots, queue, model version."""

  def __init__(self, max_batch: int):
    registry = self.registry = CollectorRegistry()
    self.requests = Counter("lm_requests", "HTTP requests answered, by route and status code.",
                            ["route", "status"], registry=registry)
    self.latency = Histogram("lm_request_seconds", "Seconds from a request's arrival to its last byte, by route.",
                             ["route"], buckets=_SECONDS, registry=registry)
    self.time_to_first_token = Histogram("lm_time_to_first_token_seconds",
                                         "Seconds from a completion request's arrival to its first text.",
                                         buckets=_SECONDS, registry=registry)
    self.tokens = Counter("lm_generated_tokens", "Tokens generated.", registry=registry)
    occupancy = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch) + (max_batch,)
    self.occupancy = Histogram("lm_batch_occupancy", "Busy decode slots at each decode step.",
                               buckets=occupancy, registry=registry)
    self.slots = Gauge("lm_decode_slots", "Decode slots (serve.max_batch).", registry=registry)
    self.slots.set(max_batch)
    self.queue_depth = Gauge("lm_queue_depth", "Requests waiting for decode slots.", registry=registry)
    self.model_step = Gauge("lm_model_step", "Step of the model served (its version's step).", registry=registry)
    self.model_info = Gauge("lm_model_info", "The model served (1 for its version id).", ["version"],
                            registry=registry)
    self.swaps = Counter("lm_model_swaps", "Hot swaps to a newer model.", registry=registry)

  def serving(self, version_id: str, step: int) -> None:
    self.model_info.clear()
    self.model_info.labels(version=version_id).set(1)
    self.model_step.set(step)

  def render(self) -> bytes:
    return generate_latest(self.registry)
