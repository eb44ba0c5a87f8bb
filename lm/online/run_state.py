"""The online run's bookkeeping: what its checkpoint holds besides the weights.

`OnlineRun` keeps the stream cursor (consumed chunk ids, the chunk in progress
and the step within it), the continual-learning matrix, gate decisions,
cleaning counts, quarantined chunks, each domain's held-out windows, the
replay buffer and the dedup index; `to_json`/`arrays`/`load` are its exact
round trip through an online checkpoint (`lm.online.store`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import ml_collections
import numpy as np

from lm.data import clean as clean_lib
from lm.core.errors import DataError
from lm.data import pipeline
from lm.data.tokenizers import Tokenizer
from lm.stats.continual import ContinualMatrix
from lm.online import privacy as privacy_lib
from lm.online import replay as replay_lib

_HELDOUT_BUCKETS = 1_000_000


def stable_seed(*parts: Any) -> int:
  return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=4).digest(), "little")


def is_heldout(document: str, fraction: float) -> bool:
  """Deterministic held-out membership of a (normalized) document, by a hash of its text."""
  digest = hashlib.blake2b(document.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") % _HELDOUT_BUCKETS < fraction * _HELDOUT_BUCKETS


class OnlineRun:
  """The state of an online run between chunks (what the checkpoint holds besides the weights)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.online = config.online
    self.consumed: list[str] = []
    self.in_progress: dict[str, Any] | None = None  # {"id", "step_in_chunk", "steps", "index"}
    self.matrix: ContinualMatrix | None = None
    self.gate_history: list[dict[str, Any]] = []
    self.clean_counts: Counter = Counter()
    self.quarantined: list[dict[str, str]] = []
    self.heldout: dict[str, np.ndarray] = {}  # domain -> [n, seq_len + 1] windows
    # Held-out preference pairs of every preference chunk so far, encoded (lm.data.pairs keys -> [n, seq_len]).
    self.preference_heldout: dict[str, np.ndarray] = {}
    self.cleaner = clean_lib.Cleaner(clean_lib.CleanConfig.from_mapping(self.config.clean.to_dict()))
    seq_len = self.config.seq_len
    self.replay = replay_lib.ReplayBuffer(int(self.online.replay_capacity), seq_len + 1, seed=int(self.config.seed))
    # DP-SGD (lm.online.privacy): whether the run trains privately (fixed at its start) and every chunk's draw.
    self.private = bool(self.config.privacy.enabled)
    self.ledger = privacy_lib.Ledger()

  # -- checkpoint contents ---------------------------------------------------
  def to_json(self) -> dict[str, Any]:
    return {"consumed": self.consumed, "in_progress": self.in_progress,
            "matrix": self.matrix.to_json() if self.matrix else None, "gate": self.gate_history,
            "clean_counts": dict(self.clean_counts), "quarantined": self.quarantined,
            "privacy": {"enabled": self.private, "draws": self.ledger.to_json()}}

  def arrays(self) -> dict[str, np.ndarray]:
    out = {f"replay/{k}": v for k, v in self.replay.to_arrays().items()}
    out.update({f"dedup/{k}": v for k, v in self.cleaner.index.to_arrays().items()})
    names = sorted(self.heldout)
    out["heldout/domains"] = np.frombuffer(json.dumps(names).encode(), np.uint8).copy()
    for index, name in enumerate(names):
      out[f"heldout/{index}"] = self.heldout[name]
    out.update({f"preference_heldout/{key}": value for key, value in self.preference_heldout.items()})
    return out

  def load(self, online: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    self.consumed = list(online["consumed"])
    self.in_progress = online["in_progress"]
    self.matrix = ContinualMatrix.from_json(online["matrix"]) if online["matrix"] else None
    self.gate_history = list(online["gate"])
    self.clean_counts = Counter(online["clean_counts"])
    self.quarantined = list(online.get("quarantined", []))
    privacy = online.get("privacy") or {"enabled": False, "draws": []}  # none before private online runs
    self.private = bool(privacy["enabled"])
    self.ledger = privacy_lib.Ledger.from_json(privacy["draws"])
    group = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
    self.replay = replay_lib.ReplayBuffer.from_arrays(group("replay/"))
    self.cleaner = clean_lib.Cleaner(self.cleaner.config, clean_lib.DedupIndex.from_arrays(group("dedup/")))
    names = json.loads(arrays["heldout/domains"].tobytes().decode())
    self.heldout = {name: arrays[f"heldout/{index}"] for index, name in enumerate(names)}
    self.preference_heldout = group("preference_heldout/")  # none in checkpoints from before preference chunks

  @property
  def preference_pairs(self) -> int:
    return len(self.preference_heldout.get("chosen_mask", ()))

  def add_preference_heldout(self, rows: dict[str, np.ndarray], limit: int) -> None:
    """Appends held-out pairs (each key [n, seq_len]), keeping at most `limit` in all."""
    room = limit - self.preference_pairs
    if room <= 0 or not len(rows["chosen_mask"]):
      return
    for key, value in rows.items():
      kept = value[:room]
      self.preference_heldout[key] = (np.concatenate([self.preference_heldout[key], kept])
                                      if key in self.preference_heldout else kept)


class Documents(list):
  """A list of documents with the `name` that `pipeline.tokenize_split` reports in errors."""

  def __init__(self, documents: list[str], name: str):
    super().__init__(documents)
    self.name = name


def tokens_of(tokenizer: Tokenizer, documents: list[str], name: str = "held-out documents") -> np.ndarray:
  return pipeline.tokenize_split(Documents(documents, name), tokenizer)


def windows_of(tokenizer: Tokenizer, seq_len: int, documents: list[str], name: str,
               stride: int) -> pipeline.Windows | None:
  """Training windows over a chunk's documents; None if there is too little text for one."""
  if not documents:
    return None
  try:
    return pipeline.Windows(tokens_of(tokenizer, documents, name), seq_len, stride, name=name)
  except DataError:
    return None
