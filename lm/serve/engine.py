"""Continuous batching: `max_batch` decode slots over one jitted KV-cache step, refilled between steps.

Each slot holds one sequence (one of a request's `n` choices) with its own
batch-1 KV cache; the decode step is `jax.vmap` of the model's cached step
over the slots, so every slot sits at its own position (the model's cache has
one position per batch, `lm.models.TransformerLM`). Between two steps the
engine thread

  * admits queued requests into free slots: the prompt is prefilled once
    (padded to a length bucket, so prefills compile once per bucket) and its
    cache copied into a slot per choice;
  * runs one step over all slots (free slots compute and are ignored);
  * hands each sequence its new token, ends those that stopped (the model's
    end of document, a stop string, max_tokens) and frees their slots at once;
  * swaps in a new model when one is waiting: admission pauses, the sequences
    in flight finish on the model they started with, then the parameters are
    replaced (an argument of the jitted step, so nothing recompiles) and the
    waiting requests start on the new one. A swap waits at most for the
    longest request in flight (bounded by max_tokens and serve.request_timeout).

Compiles: one prefill per bucket, one first-token choice, one slot insert and
one decode step; `warm_up` makes all of them before the first request, and
`compile_counts` lets a test check that nothing compiles afterwards.

Tokens are chosen by `lm.inference.sample.choose_tokens_per_row` (each slot its
own temperature, top-k, top-p and key); temperature 0 is the same argmax as
`--mode sample`'s greedy decoding.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.inference import sample as sample_lib
from lm.models.transformer import TransformerLM

_log = logging.getLogger(__name__)
_REPLACEMENT = "\ufffd"  # what a decoder shows for a character whose bytes are not all there yet


class QueueFullError(Exception):
  """More requests are waiting than serve.max_queue allows (the API answers 429)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How one request decodes (the OpenAI fields of the same names, checked by the API)."""

  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  n: int = 1
  stop: tuple[str, ...] = ()
  seed: int | None = None
  logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class Event:
  """What a request's listener receives: text of one choice (kind "text"), a choice's end ("finish", with
  finish_reason), the request's end ("done"), or an error ("error", message in text)."""

  kind: str
  choice: int = 0
  text: str = ""
  tokens: tuple[str, ...] = ()
  logprobs: tuple[float, ...] = ()
  finish_reason: str | None = None


class Request:
  """One completion request: its prompts' ids, settings and a listener called (on the engine thread) per Event.

  Each prompt has `settings.n` choices; choice `p * n + c` is prompt p's c-th. All of them start together
  (on one model version), so a request needs len(prompts) * n free slots at once.
  """

  def __init__(self, prompt_ids: Sequence[np.ndarray] | np.ndarray, settings: Settings,
               listener: Callable[[Event], None], *, request_id: str = "", seed: int = 0):
    self.id = request_id
    if isinstance(prompt_ids, np.ndarray) and prompt_ids.ndim == 1:
      prompt_ids = [prompt_ids]
    self.prompts = [np.asarray(ids, np.int32).reshape(-1) for ids in prompt_ids]
    self.settings = settings
    self.listener = listener
    self.seed = seed
    self.version: Any = None  # the model version it decodes with, set when admitted
    self.cancelled = False  # set by the API (client gone, time limit): its slots are freed at the next step
    self.submitted = time.monotonic()
    self.remaining = len(self.prompts) * settings.n  # choices still decoding

  @property
  def slots_needed(self) -> int:
    return len(self.prompts) * self.settings.n


class _Sequence:
  """One choice of a request, decoding in a slot."""

  def __init__(self, request: Request, prompt_ids: np.ndarray, choice: int,
               text_of: Callable[[np.ndarray, np.ndarray], str], token_text: Callable[[int], str]):
    self.request, self.prompt_ids, self.choice = request, prompt_ids, choice
    self.text_of, self.token_text = text_of, token_text
    self.tokens: list[int] = []
    self.logprobs: list[float] = []
    self.sent = ""  # text already handed to the listener
    self.sent_tokens = 0

  def remaining(self, max_len: int) -> int:
    """Tokens it may still make: up to max_tokens, and within the context (the last one is not fed back)."""
    return min(self.request.settings.max_tokens, max_len + 1 - len(self.prompt_ids)) - len(self.tokens)

  def add(self, token: int, logprob: float, end_ids: Sequence[int], max_len: int) -> str | None:
    """Records a new token; returns the finish reason if the sequence ends here (else None)."""
    settings = self.request.settings
    if token in end_ids:
      return "stop"
    self.tokens.append(token)
    self.logprobs.append(logprob)
    text = self.text_of(self.prompt_ids, np.asarray(self.tokens, np.int32))
    if any(stop in text for stop in settings.stop):
      return "stop"
    if len(self.tokens) >= settings.max_tokens or len(self.prompt_ids) + len(self.tokens) >= max_len + 1:
      return "length"
    return None

  def flush(self, finished: bool) -> None:
    """Hands the listener the text that is certain: all of it at the end; before, what a stop string or a
    character still missing bytes cannot change."""
    settings = self.request.settings
    text = self.text_of(self.prompt_ids, np.asarray(self.tokens, np.int32))
    cut = min((i for i in (text.find(stop) for stop in settings.stop) if i >= 0), default=len(text))
    text = text[:cut]
    if not finished:
      hold = max((len(stop) for stop in settings.stop), default=1) - 1
      text = text[:len(text) - hold] if hold else text
      text = text.rstrip(_REPLACEMENT)
    if not text.startswith(self.sent) or (text == self.sent and not finished):
      return
    tokens = self.tokens[self.sent_tokens:]
    event = Event("text", self.choice, text[len(self.sent):],
                  tuple(self.token_text(token) for token in tokens) if settings.logprobs else (),
                  tuple(self.logprobs[self.sent_tokens:]) if settings.logprobs else ())
    self.sent, self.sent_tokens = text, len(self.tokens)
    if event.text or event.tokens:
      self.request.listener(event)


class SlotModel:
  """The jitted functions of continuous batching over one model architecture (any parameters of it)."""

  def __init__(self, model: TransformerLM, max_batch: int, buckets: Sequence[int], block: int = 32):
    self.model, self.max_batch, self.block = model, max_batch, block
    self.buckets = tuple(sorted(set(int(bucket) for bucket in buckets)))
    self.widths = tuple(w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if w < max_batch) + (max_batch,)
    single = jax.eval_shape(lambda: model.init_cache(1))
    # Made by jit, like every later version of the slots, so the jitted functions see one kind of array.
    self.empty_slots = jax.jit(lambda: jax.tree.map(lambda leaf: jnp.zeros((max_batch,) + leaf.shape, leaf.dtype),
                                                    single))
    self.prefill = jax.jit(self._prefill)
    self.choose = jax.jit(self._choose)
    self.insert = jax.jit(self._insert, donate_argnums=0)
    self.step = jax.jit(self._step, donate_argnums=1, static_argnames=("width",))

  def width(self, busy_up_to: int) -> int:
    """The fewest leading slots a step computes to cover slots 0 .. busy_up_to - 1."""
    return next(width for width in self.widths if width >= busy_up_to)

  def bucket(self, length: int) -> int:
    for bucket in self.buckets:
      if length <= bucket:
        return bucket
    raise ValueError(f"a prompt of {length} tokens is longer than the largest bucket {self.buckets[-1]}")

  def _prefill(self, params: Any, tokens: jax.Array, length: jax.Array) -> tuple[Any, jax.Array]:
    """tokens [1, bucket] (the prompt, padded after its `length` tokens) -> (its cache, positions past the
    prompt marked free; logits [vocab] after the prompt's last token)."""
    logits, variables = self.model.apply({"params": params, "cache": self.model.init_cache(1)}, tokens,
                                         decode=True, mutable=["cache"])

    def at_length(path, leaf):
      # The padding's keys sit past `length`: with the write positions set back to `length`, the next tokens
      # overwrite them and the causal mask hides them until then.
      name = getattr(path[-1], "key", None)
      return jnp.full_like(leaf, length) if name in ("position", "cache_index") else leaf

    cache = jax.tree_util.tree_map_with_path(at_length, variables["cache"])
    return cache, jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=False)

  @staticmethod
  def _choose(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """One token from logits [vocab] and its log-probability under the model."""
    token = sample_lib.choose_tokens_per_row(logits[None], key[None], temperature[None], top_k[None],
                                             top_p[None])[0]
    return token, jax.nn.log_softmax(logits)[token]

  @staticmethod
  def _insert(slots: Any, single: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda many, one: jax.lax.dynamic_update_index_in_dim(many, one, slot, axis=0),
                        slots, single)

  def _step(self, params: Any, slots: Any, tokens: jax.Array, keys: jax.Array, counters: jax.Array,
            temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, steps: jax.Array, *, width: int
            ) -> tuple[Any, jax.Array, jax.Array]:
    """`steps` (<= block) cached steps of the first `width` slots, in one call: tokens [max_batch] (each slot's
    last token) -> (caches, new tokens [block, width], their log-probs; rows past `steps` unused). A slot's
    key for the token made at `counters[slot] + t` is fold_in(its sequence's key, counters[slot] + t)."""

    def one(cache, token):
      logits, variables = self.model.apply({"params": params, "cache": cache}, token[None, None], decode=True,
                                           mutable=["cache"])
      return variables["cache"], logits[0, -1]

    head = jax.tree.map(lambda leaf: leaf[:width], slots)
    base = jax.random.wrap_key_data(keys[:width])
    settings = temperature[:width], top_k[:width], top_p[:width]

    def body(carry):
      index, cache, last, out_tokens, out_logprobs = carry
      cache, logits = jax.vmap(one)(cache, last)
      step_keys = jax.vmap(jax.random.fold_in)(base, counters[:width] + index)
      chosen = sample_lib.choose_tokens_per_row(logits, step_keys, *settings)
      logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
      return (index + 1, cache, chosen, out_tokens.at[index].set(chosen), out_logprobs.at[index].set(logprobs))

    carry = (jnp.asarray(0, jnp.int32), head, tokens[:width], jnp.zeros((self.block, width), jnp.int32),
             jnp.zeros((self.block, width), jnp.float32))
    _, head, _, out_tokens, out_logprobs = jax.lax.while_loop(lambda carry: carry[0] < steps, body, carry)
    slots = jax.tree.map(lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0), slots, head)
    return slots, out_tokens, out_logprobs

  def compile_counts(self) -> dict[str, int]:
    """How many programs each jitted function has compiled (constant after warm-up)."""
    return {name: getattr(self, name)._cache_size() for name in ("prefill", "choose", "insert", "step")}


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Prompt lengths a prefill compiles for: powers of two from `smallest`, and max_len."""
  buckets, bucket = [], smallest
  while bucket < max_len:
    buckets.append(bucket)
    bucket *= 2
  return tuple(buckets) + (max_len,)


class Engine:
  """Runs continuous batching on a thread of its own; `submit` queues a request, its listener gets Events."""

  def __init__(self, model: TransformerLM, params: Any, version: Any, *, max_batch: int, max_queue: int,
               text_of: Callable[[np.ndarray, np.ndarray], str], token_text: Callable[[int], str],
               end_ids: Sequence[int] = (), buckets: Sequence[int] | None = None,
               context: Callable[[], Any] | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
               block: int = 32):
    self.slots_model = SlotModel(model, max_batch, buckets or length_buckets(model.config.max_len), block)
    self.max_len = model.config.max_len
    self.max_batch, self.max_queue = max_batch, max_queue
    self.params, self.version = params, version
    self.text_of, self.token_text, self.end_ids = text_of, token_text, tuple(int(i) for i in end_ids)
    self.context = context
    self.on_step = on_step or (lambda stats: None)
    self._queue: collections.deque[Request] = collections.deque()
    self._lock = threading.Condition()
    self._pending_model: tuple[Any, Any] | None = None
    self._running = False
    self._thread: threading.Thread | None = None
    self._sequences: list[_Sequence | None] = [None] * max_batch
    self._settings = _SlotSettings(max_batch)
    self._held = 0
    self.swaps = 0

  # -- the API's side ---------------------------------------------------------------------------------------
  def submit(self, request: Request) -> None:
    """Queues `request`; QueueFullError when serve.max_queue requests already wait, ValueError when it needs
    more slots than there are."""
    if request.slots_needed > self.max_batch:
      raise ValueError(f"the request needs {request.slots_needed} decode slots (prompts x n), more than the "
                       f"{self.max_batch} there are")
    with self._lock:
      if len(self._queue) >= self.max_queue:
        raise QueueFullError(f"{len(self._queue)} requests are already waiting")
      self._queue.append(request)
      self._lock.notify()

  def swap(self, params: Any, version: Any) -> None:
    """Serves `params` from the next admission on, once the sequences in flight have finished (module doc)."""
    with self._lock:
      self._pending_model = (params, version)
      self._lock.notify()

  @contextlib.contextmanager
  def hold(self) -> Iterator[None]:
    """Admits nothing while held (requests queue; those in flight go on): to drain the slots before
    maintenance, or to fill the queue on purpose (the tests of 429 and 504)."""
    with self._lock:
      self._held += 1
    try:
      yield
    finally:
      with self._lock:
        self._held -= 1
        self._lock.notify()

  @property
  def queue_depth(self) -> int:
    return len(self._queue)

  @property
  def busy_slots(self) -> int:
    return sum(sequence is not None for sequence in self._sequences)

  def start(self) -> None:
    self._running = True
    self._thread = threading.Thread(target=self._run, name="lm-serve-engine", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    with self._lock:
      self._running = False
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout=30)

  def warm_up(self) -> None:
    """Compiles every bucket's prefill, the choice, the insert and the step before the first request."""
    with self._context():
      slots = self.slots_model.empty_slots()
      for bucket in self.slots_model.buckets:
        cache, logits = self.slots_model.prefill(self.params, jnp.zeros((1, bucket), jnp.int32),
                                                 jnp.asarray(1, jnp.int32))
        self.slots_model.choose(logits, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1))
      slots = self.slots_model.insert(slots, cache, jnp.asarray(0, jnp.int32))
      for width in self.slots_model.widths:
        slots = self._step_all(slots, width, 1)[0]
      jax.block_until_ready(slots)

  # -- the engine thread ------------------------------------------------------------------------------------
  def _context(self):
    return self.context() if self.context is not None else _nothing()

  def _run(self) -> None:
    with self._context():
      slots = self.slots_model.empty_slots()
      while True:
        with self._lock:
          while self._running and (not self._queue or self._held) and self.busy_slots == 0 and (
              self._pending_model is None):
            self._lock.wait(timeout=0.5)
          if not self._running:
            break
        try:
          slots = self._swap_when_idle(slots)
          slots = self._admit(slots)
          if self.busy_slots:
            slots = self._decode(slots)
        except Exception as error:  # pylint: disable=broad-except  (a bug must end requests, not the server)
          _log.exception("The decode loop failed; the requests in flight end with an error.")
          self._fail_all(f"the server failed while decoding: {type(error).__name__}")
          slots = self.slots_model.empty_slots()
      self._fail_all("the server is shutting down")

  def _swap_when_idle(self, slots: Any) -> Any:
    with self._lock:
      if self._pending_model is None or self.busy_slots:
        return slots
      self.params, self.version = self._pending_model
      self._pending_model = None
    self.swaps += 1
    _log.info("Now serving %s.", self.version)
    return slots

  def _admit(self, slots: Any) -> Any:
    while True:
      with self._lock:
        if self._pending_model is not None or not self._queue or self._held:
          return slots  # a waiting model is swapped in before anything new starts
        request = self._queue[0]
        free = [slot for slot, sequence in enumerate(self._sequences) if sequence is None]
        if request.cancelled:
          self._queue.popleft()
          continue
        if len(free) < request.slots_needed:
          return slots
        self._queue.popleft()
      slots = self._start(request, free[:request.slots_needed], slots)

  def _start(self, request: Request, free: list[int], slots: Any) -> Any:
    request.version = self.version
    settings = request.settings
    free = iter(free)
    for index, prompt in enumerate(request.prompts):
      length = len(prompt)
      padded = np.zeros((1, self.slots_model.bucket(length)), np.int32)
      padded[0, :length] = prompt
      cache, logits = self.slots_model.prefill(self.params, jnp.asarray(padded), jnp.asarray(length, jnp.int32))
      for choice in range(index * settings.n, (index + 1) * settings.n):
        slot = next(free)
        key = jax.random.fold_in(jax.random.key(request.seed), choice)
        token, logprob = self.slots_model.choose(logits, jax.random.fold_in(key, 0),
                                                 jnp.float32(settings.temperature), jnp.int32(settings.top_k),
                                                 jnp.float32(settings.top_p))
        slots = self.slots_model.insert(slots, cache, jnp.asarray(slot, jnp.int32))
        self._sequences[slot] = _Sequence(request, prompt, choice, self.text_of, self.token_text)
        self._settings.set(slot, key, settings)
        self._take(slot, [int(token)], [float(logprob)])
    return slots

  def _step_all(self, slots: Any, width: int, steps: int) -> tuple[Any, jax.Array, jax.Array]:
    settings = self._settings
    return self.slots_model.step(self.params, slots, settings.last, settings.keys, settings.counters,
                                 settings.temperature, settings.top_k, settings.top_p, np.int32(steps), width=width)

  def _decode(self, slots: Any) -> Any:
    """One block: as many steps as the nearest sequence to its end still needs (at most the block), over the
    fewest leading slots that hold every busy one; then each sequence takes its new tokens."""
    started = time.perf_counter()
    busy = [slot for slot, sequence in enumerate(self._sequences) if sequence is not None]
    steps = min(min(self._sequences[slot].remaining(self.max_len) for slot in busy), self.slots_model.block)
    slots, tokens, logprobs = self._step_all(slots, self.slots_model.width(busy[-1] + 1), max(steps, 1))
    tokens, logprobs = np.asarray(tokens)[:steps], np.asarray(logprobs)[:steps]
    self._settings.counters[:tokens.shape[1]] += steps
    for slot in busy:
      self._take(slot, tokens[:, slot].tolist(), logprobs[:, slot].tolist())
    self.on_step({"busy": len(busy), "steps": steps, "seconds": time.perf_counter() - started,
                  "queue": len(self._queue)})
    return slots

  def _take(self, slot: int, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
    """Gives slot's sequence its new tokens; ends it (and frees the slot) if it stopped or was cancelled."""
    sequence = self._sequences[slot]
    request = sequence.request
    if request.cancelled:
      self._sequences[slot] = None
      return
    reason = None
    for token, logprob in zip(tokens, logprobs):
      reason = sequence.add(int(token), float(logprob), self.end_ids, self.max_len)
      self._settings.last[slot] = token
      if reason is not None:
        break
    sequence.flush(finished=reason is not None)
    if reason is None:
      return
    self._sequences[slot] = None
    request.listener(Event("finish", sequence.choice, finish_reason=reason))
    request.remaining -= 1
    if request.remaining == 0:
      request.listener(Event("done"))

  def _fail_all(self, message: str) -> None:
    with self._lock:
      requests = {id(s.request): s.request for s in self._sequences if s is not None}
      requests.update({id(r): r for r in self._queue})
      self._queue.clear()
      self._sequences = [None] * self.max_batch
    for request in requests.values():
      request.listener(Event("error", text=message))


class _SlotSettings:
  """Each slot's sampling settings and last token, as the step's array arguments."""

  def __init__(self, slots: int):
    self.keys = np.array(jax.random.key_data(jax.random.split(jax.random.key(0), slots)))  # raw uint32 keys, writable
    self.counters = np.zeros(slots, np.int32)
    self.last = np.zeros(slots, np.int32)
    self.temperature = np.zeros(slots, np.float32)
    self.top_k = np.zeros(slots, np.int32)
    self.top_p = np.ones(slots, np.float32)

  def set(self, slot: int, key: jax.Array, settings: Settings) -> None:
    self.keys[slot] = np.asarray(jax.random.key_data(key))
    self.counters[slot] = 1
    self.temperature[slot] = settings.temperature
    self.top_k[slot] = settings.top_k
    self.top_p[slot] = settings.top_p


class _nothing:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

