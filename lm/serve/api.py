"""The HTTP API: OpenAI-compatible completions, feedback, models, health, metrics and the playground.

  POST /v1/completions  prompt (a string or a list), max_tokens, temperature, top_p, top_k, n, stop, seed,
                        stream (server-sent events), logprobs (of the chosen tokens); OpenAI's response
                        shape, plus `system_fingerprint` = the model version's id and `lm_version` (the
                        version: run, step, chunk, promotion time), and per choice `feedback` (the id and
                        choice `/v1/feedback` takes)
  POST /v1/feedback     {"id", "choice", "rating": -1|1, "preferred": i, "correction": "..."}
  GET  /v1/models       the model, with its version
  GET  /v1/status       the online run's gate decisions and whether its R heatmap exists
  GET  /v1/status/heatmap  WORKDIR/continual_R.png
  GET  /health, GET /metrics (Prometheus), GET / (the playground page)

Errors are OpenAI's body, `{"error": {"message", "type", "param", "code"}}`:
400 (malformed JSON, a wrong type, an unknown field, a value out of range,
a prompt the tokenizer cannot encode or that leaves no room for max_tokens),
401 (a missing or wrong key when serve.api_key is set), 404 (another model),
413 (a body over serve.max_body_bytes), 429 (the queue is full; Retry-After),
504 (past serve.request_timeout). A request's text never appears in another's
response or in an error message of another request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import fastapi
import pydantic
from fastapi import responses
from starlette.concurrency import run_in_threadpool

from lm.serve import engine as engine_lib
from lm.serve import metrics as metrics_lib
from lm.serve.feedback import FeedbackError

_STATIC = Path(__file__).with_name("static")
_SURROGATE = re.compile("[\ud800-\udfff]")
_RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
  """An error answered with OpenAI's error body."""

  def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
    self.headers = headers or {}


def error_response(status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None) -> responses.JSONResponse:
  return responses.JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                                status_code=status, headers=headers)


class CompletionRequest(pydantic.BaseModel):
  """POST /v1/completions (OpenAI's fields; top_k is this server's addition)."""

  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  model: str | None = None
  prompt: str | list[str]
  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  n: int = 1
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  logprobs: int | None = None
  user: str | None = None


class FeedbackRequest(pydantic.BaseModel):
  """POST /v1/feedback: on choice `choice` of completion `id` (as each choice's `feedback` field names them)."""

  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  id: str
  choice: int = 0
  rating: int | None = None
  preferred: int | None = None
  correction: str | None = None


class Service:
  """What the routes need: the engine, the tokenizer's two directions, the store, the limits, the version."""

  def __init__(self, *, engine: engine_lib.Engine, encode: Callable[[str], Any], model_name: str,
               serve_config: Any, store: Any, metrics: metrics_lib.ServeMetrics, workdir: str,
               status: Callable[[], dict[str, Any]]):
    self.engine, self.encode, self.model_name = engine, encode, model_name
    self.config, self.store, self.metrics, self.workdir, self.status = serve_config, store, metrics, workdir, status
    self.max_len = engine.max_len

  @property
  def version(self) -> Any:
    return self.engine.version


def create_app(service: Service) -> fastapi.FastAPI:
  """The FastAPI app over `service` (uvicorn runs it; tests may too)."""
  app = fastapi.FastAPI(title="lm", summary="An lm model behind an OpenAI-compatible API, learning from feedback.",
                        version="1")
  config = service.config
  app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

  @app.exception_handler(ApiError)
  async def _api_error(request: fastapi.Request, error: ApiError):
    del request
    return error_response(error.status, error.message, param=error.param, kind=error.kind, code=error.code,
                          headers=error.headers)

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _invalid(request: fastapi.Request, error: fastapi.exceptions.RequestValidationError):
    del request
    first = error.errors()[0] if error.errors() else {}
    location = list(first.get("loc", ()))[1:]  # after "body": the field, an index, then pydantic's type tags
    param = ".".join(str(part) for part in location[:2 if len(location) > 1 and isinstance(location[1], int)
                                                     else 1]) or None
    if first.get("type") == "json_invalid":
      message = "The body is not valid JSON. Fix: send a JSON object, e.g. {\"prompt\": \"ROMEO:\"}."
    elif first.get("type") == "extra_forbidden":
      message = f"Unknown field {param!r}. Fix: remove it (the fields are OpenAI's: see GET /docs)."
    elif first.get("type") == "missing":
      message = f"Field {param!r} is required."
    elif first.get("type") in ("model_attributes_type", "dict_type"):
      message = "The body must be a JSON object. Fix: send e.g. {\"prompt\": \"ROMEO:\"}."
    else:
      message = f"Field {param!r}: {first.get('msg', 'invalid value')}."
    return error_response(400, message, param=param)

  @app.middleware("http")
  async def _authorize_and_count(request: fastapi.Request, call_next):
    started = time.perf_counter()
    route = request.url.path if request.url.path in _ROUTES else "other"
    if config.api_key and (route.startswith("/v1/") or route == "/metrics"):
      given = request.headers.get("authorization", "")
      if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {config.api_key}".encode()):
        response = error_response(401, "Missing or wrong API key. Fix: send `Authorization: Bearer <serve.api_key>`.",
                                  kind="authentication_error", code="invalid_api_key")
        service.metrics.requests.labels(route, "401").inc()
        return response
    response = await call_next(request)
    service.metrics.requests.labels(route, str(response.status_code)).inc()
    if not isinstance(response, responses.StreamingResponse) or route != "/v1/completions":
      service.metrics.latency.labels(route).observe(time.perf_counter() - started)
    return response

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, request: fastapi.Request):
    arrived = time.perf_counter()
    prompts, settings, prompt_ids = _check_completion(body, service)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    engine_request = engine_lib.Request(
        prompt_ids, settings, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
        request_id=completion_id, seed=body.seed if body.seed is not None else uuid.uuid4().int % (1 << 31))
    try:
      service.engine.submit(engine_request)
    except engine_lib.QueueFullError:
      raise ApiError(429, f"The server is busy: {config.max_queue} requests are waiting. Fix: retry after "
                     f"{_RETRY_AFTER_SECONDS} s.", kind="rate_limit_error", code="queue_full",
                     headers={"Retry-After": str(_RETRY_AFTER_SECONDS)}) from None
    deadline = arrived + config.request_timeout
    if body.stream:
      return responses.StreamingResponse(
          _stream(service, engine_request, queue, prompts, body, completion_id, created, arrived, deadline, request),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, tokens, logprobs, reasons = await _collect(service, engine_request, queue, deadline, arrived)
    version = engine_request.version
    await _record(service, completion_id, prompts, settings, texts, version, created)
    service.metrics.tokens.inc(sum(len(t) for t in tokens))
    choices = []
    for index in range(len(texts)):
      choice = {"index": index, "text": texts[index], "finish_reason": reasons[index],
                "logprobs": ({"tokens": list(tokens[index]), "token_logprobs": list(logprobs[index])}
                             if settings.logprobs else None),
                "feedback": _feedback_address(completion_id, prompts, settings.n, index)}
      choices.append(choice)
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    completion_tokens = sum(len(t) for t in tokens) if settings.logprobs else sum(
        len(service.encode(text)) for text in texts)
    return responses.JSONResponse(
        {"id": completion_id, "object": "text_completion", "created": created, "model": service.model_name,
         "system_fingerprint": version.id, "lm_version": version.to_json(), "choices": choices,
         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens}},
        headers={"X-LM-Model-Version": version.id})

  @app.post("/v1/feedback")
  async def feedback(body: FeedbackRequest):
    if body.correction is not None and _SURROGATE.search(body.correction):
      raise ApiError(400, "correction holds an unpaired surrogate escape (\\ud800-\\udfff), which is no "
                     "character. Fix: send the text as UTF-8.", param="correction")
    try:
      feedback_id = await run_in_threadpool(service.store.record_feedback, completion_id=body.id,
                                            choice=body.choice, rating=body.rating, preferred=body.preferred,
                                            correction=body.correction)
    except FeedbackError as error:
      unknown = "unknown" in str(error).lower() or "no completion" in str(error).lower()
      raise ApiError(404 if unknown else 400, str(error), param="id" if unknown else None) from None
    return {"id": feedback_id, "object": "feedback", "completion_id": body.id, "choice": body.choice}

  @app.get("/v1/models")
  async def models():
    version = service.version
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "lm", "version": version.to_json()}]}

  @app.get("/v1/status")
  async def status():
    return {"model": service.model_name, "version": service.version.to_json(), **service.status(),
            "slots": config.max_batch, "busy_slots": service.engine.busy_slots,
            "queue_depth": service.engine.queue_depth, "swaps": service.engine.swaps}

  @app.get("/v1/status/heatmap")
  async def heatmap():
    path = Path(service.workdir) / "continual_R.png"
    if not path.is_file():
      raise ApiError(404, "This run has no R heatmap yet (an online run draws one after its first chunk).",
                     kind="not_found_error")
    return responses.FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})

  @app.get("/health")
  async def health():
    return {"status": "ok", "version": service.version.id}

  @app.get("/metrics")
  async def metrics():
    service.metrics.queue_depth.set(service.engine.queue_depth)
    return responses.Response(service.metrics.render(), media_type=metrics_lib.CONTENT_TYPE_LATEST)

  @app.get("/favicon.ico", include_in_schema=False)
  async def favicon():
    return responses.Response(status_code=204)

  @app.get("/", include_in_schema=False)
  async def playground():
    return responses.FileResponse(_STATIC / "index.html", media_type="text/html")

  return app


_ROUTES = ("/v1/completions", "/v1/feedback", "/v1/models", "/v1/status", "/v1/status/heatmap", "/health",
           "/metrics", "/")


class _TooLarge(Exception):
  pass


class _BodyLimit:
  """413 for a body over serve.max_body_bytes, told by Content-Length or counted as it arrives (a chunked
  body is never read whole first)."""

  def __init__(self, app: Any, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    declared = dict(scope.get("headers", ())).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.limit:
      await self._refuse(scope, receive, send)
      return
    received = 0

    async def counted() -> dict:
      nonlocal received
      message = await receive()
      if message["type"] == "http.request":
        received += len(message.get("body", b""))
        if received > self.limit:
          raise _TooLarge
      return message

    try:
      await self.app(scope, counted, send)
    except _TooLarge:
      await self._refuse(scope, receive, send)

  async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
    response = error_response(413, f"The request body is larger than serve.max_body_bytes={self.limit}. Fix: "
                              "send a shorter prompt.", code="body_too_large")
    await response(scope, receive, send)


# -- completions -----------------------------------------------------------------------------------------------
def _check_completion(body: CompletionRequest, service: Service):
  """(prompts, engine Settings, prompt ids) of a valid request; ApiError(400 / 404) naming the field."""
  config = service.config
  if body.model is not None and body.model != service.model_name:
    raise ApiError(404, f"The model {body.model!r} does not exist here. Fix: use {service.model_name!r} "
                   "(GET /v1/models).", param="model", code="model_not_found")
  prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
  if not prompts:
    raise ApiError(400, "prompt is an empty list. Fix: send a string or a list of strings.", param="prompt")
  stops = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)
  checks = [
      (1 <= body.max_tokens <= config.max_tokens, "max_tokens", f"must be 1..{config.max_tokens}"),
      (0 <= body.temperature <= 100, "temperature", "must be 0..100 (0: greedy)"),
      (0 < body.top_p <= 1, "top_p", "must be in (0, 1]"),
      (body.top_k >= 0, "top_k", "must be >= 0 (0: off)"),
      (1 <= body.n <= config.max_n, "n", f"must be 1..{config.max_n}"),
      (len(prompts) * body.n <= config.max_batch, "n",
       f"times the {len(prompts)} prompts must be at most serve.max_batch={config.max_batch} sequences"),
      (len(stops) <= config.max_stop and all(stops), "stop", f"must be at most {config.max_stop} non-empty strings"),
      (body.logprobs is None or 0 <= body.logprobs <= 5, "logprobs", "must be 0..5"),
      (body.seed is None or 0 <= body.seed < 2**63, "seed", "must be 0..2**63-1"),
  ]
  for ok, field, rule in checks:
    if not ok:
      raise ApiError(400, f"{field}={getattr(body, field)!r} {rule}.", param=field)
  for field, texts in (("prompt", prompts), ("stop", stops)):
    if any(_SURROGATE.search(text) for text in texts):
      raise ApiError(400, f"{field} holds an unpaired surrogate escape (\\ud800-\\udfff), which is no character. "
                     "Fix: send the text as UTF-8.", param=field)
  room = service.max_len - body.max_tokens + 1
  prompt_ids = []
  for index, prompt in enumerate(prompts):
    where = "prompt" if isinstance(body.prompt, str) else f"prompt.{index}"
    try:
      ids = service.encode(prompt)
    except Exception:  # pylint: disable=broad-except  (a tokenizer's own error types)
      raise ApiError(400, f"{where} cannot be encoded by this model's tokenizer. Fix: send plain UTF-8 text.",
                     param=where) from None
    if len(ids) == 0:
      raise ApiError(400, f"{where} encodes to no tokens. Fix: send at least one character.", param=where)
    if len(ids) > room:
      raise ApiError(400, f"{where} has {len(ids)} tokens; with max_tokens={body.max_tokens} at most {room} fit "
                     f"in the model's context of {service.max_len}. Fix: shorten the prompt or lower max_tokens.",
                     param=where)
    prompt_ids.append(ids)
  settings = engine_lib.Settings(max_tokens=body.max_tokens, temperature=float(body.temperature),
                                 top_p=float(body.top_p), top_k=body.top_k, n=body.n, stop=tuple(stops),
                                 seed=body.seed, logprobs=body.logprobs is not None)
  return prompts, settings, prompt_ids


def _feedback_address(completion_id: str, prompts: list[str], n: int, index: int) -> dict[str, Any]:
  """The (id, choice) /v1/feedback takes for choice `index`: one stored completion per prompt."""
  if len(prompts) == 1:
    return {"id": completion_id, "choice": index}
  return {"id": f"{completion_id}/{index // n}", "choice": index % n}


async def _next_event(queue: asyncio.Queue, deadline: float) -> engine_lib.Event:
  remaining = deadline - time.perf_counter()
  if remaining <= 0:
    raise asyncio.TimeoutError
  return await asyncio.wait_for(queue.get(), timeout=remaining)


def _timeout_error(config: Any) -> ApiError:
  return ApiError(504, f"The completion took longer than serve.request_timeout={config.request_timeout:g} s. Fix: "
                  "ask for fewer tokens, or retry when the server is less busy.", kind="timeout_error",
                  code="timeout")


async def _events(service: Service, queue: asyncio.Queue, deadline: float, arrived: float):
  """A request's engine events until its "done" or "error" (TimeoutError past the deadline), recording its
  time to first token."""
  first = True
  while True:
    event = await _next_event(queue, deadline)
    if event.kind == "text" and first:
      service.metrics.time_to_first_token.observe(time.perf_counter() - arrived)
      first = False
    yield event
    if event.kind in ("done", "error"):
      return


async def _collect(service: Service, request: engine_lib.Request, queue: asyncio.Queue, deadline: float,
                   arrived: float):
  count = len(request.prompts) * request.settings.n
  texts, tokens, logprobs = [""] * count, [[] for _ in range(count)], [[] for _ in range(count)]
  reasons: list[str | None] = [None] * count
  try:
    async for event in _events(service, queue, deadline, arrived):
      if event.kind == "text":
        texts[event.choice] += event.text
        tokens[event.choice].extend(event.tokens)
        logprobs[event.choice].extend(event.logprobs)
      elif event.kind == "finish":
        reasons[event.choice] = event.finish_reason
      elif event.kind == "error":
        raise ApiError(500, f"The server failed on this request: {event.text}.", kind="server_error")
    return texts, tokens, logprobs, reasons
  except asyncio.TimeoutError:
    request.cancelled = True
    raise _timeout_error(service.config) from None
  except asyncio.CancelledError:
    request.cancelled = True
    raise


async def _record(service: Service, completion_id: str, prompts: list[str], settings: engine_lib.Settings,
                  texts: list[str], version: Any, created: int) -> None:
  """Stores the prompts and their choices (one stored completion per prompt), committed before the answer."""
  n = settings.n
  stored = {"max_tokens": settings.max_tokens, "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k, "n": n, "stop": list(settings.stop), "seed": settings.seed}
  for index, prompt in enumerate(prompts):
    await run_in_threadpool(service.store.record_completion,
                            completion_id=_feedback_address(completion_id, prompts, n, index * n)["id"],
                            prompt=prompt, texts=texts[index * n:(index + 1) * n], model_version=version.id,
                            settings=stored, created=float(created))


async def _stream(service: Service, request: engine_lib.Request, queue: asyncio.Queue, prompts: list[str],
                  body: CompletionRequest, completion_id: str, created: int, arrived: float, deadline: float,
                  http_request: fastapi.Request):
  """Server-sent events: a chunk per piece of text, a chunk per finished choice, then `data: [DONE]`."""
  count = len(prompts) * request.settings.n
  texts = [""] * count
  generated = 0

  def chunk(choice: int, text: str, reason: str | None, event: engine_lib.Event | None = None) -> str:
    logprobs = ({"tokens": list(event.tokens), "token_logprobs": list(event.logprobs)}
                if event is not None and request.settings.logprobs else None)
    version = request.version
    return "data: " + json.dumps({
        "id": completion_id, "object": "text_completion", "created": created, "model": service.model_name,
        "system_fingerprint": version.id if version is not None else None,
        "choices": [{"index": choice, "text": text, "finish_reason": reason, "logprobs": logprobs,
                     "feedback": _feedback_address(completion_id, prompts, request.settings.n, choice)}]}) + "\n\n"

  try:
    async for event in _events(service, queue, deadline, arrived):
      if event.kind == "text":
        texts[event.choice] += event.text
        generated += len(event.tokens) if event.tokens else 0
        yield chunk(event.choice, event.text, None, event)
      elif event.kind == "finish":
        yield chunk(event.choice, "", event.finish_reason)
      elif event.kind == "error":
        yield "data: " + json.dumps({"error": {"message": f"The server failed on this request: {event.text}.",
                                               "type": "server_error", "param": None, "code": None}}) + "\n\n"
        return
      elif event.kind == "done":
        await _record(service, completion_id, prompts, request.settings, texts, request.version, created)
        service.metrics.tokens.inc(generated or sum(len(service.encode(text)) for text in texts if text))
        yield "data: " + json.dumps({"id": completion_id, "object": "text_completion", "created": created,
                                     "model": service.model_name, "system_fingerprint": request.version.id,
                                     "lm_version": request.version.to_json(), "choices": []}) + "\n\n"
        yield "data: [DONE]\n\n"
        service.metrics.latency.labels("/v1/completions").observe(time.perf_counter() - arrived)
        return
  except asyncio.TimeoutError:
    error = _timeout_error(service.config)
    yield "data: " + json.dumps({"error": {"message": error.message, "type": error.kind, "param": None,
                                           "code": error.code}}) + "\n\n"
  finally:
    # Ended early (a time limit, an error, or the client went away: the stream is cancelled or closed): the
    # engine frees the request's slots at its next step. After "done" this changes nothing.
    request.cancelled = True
    del http_request
