"""The `online` part of the run config: `--mode online` keeps training a model on newly streamed data.

The online phase's learning rate is optim.lr / min_lr / warmup_steps, per chunk (`lm.online.step`).
"""

from __future__ import annotations

import ml_collections

from lm.core.configs import ConfigPart, require

LR_SCHEDULES = ("rewarm", "constant")

FIELDS = {
    "online.stream": "",  # dir:PATH (a watched folder) | tfds:NAME[:SPLIT] | a .txt/.jsonl/.tsv file or folder
    "online.domain": "",  # the stream's domain name; empty: from the stream (folder or dataset name)
    "online.split": "train",  # the split of a fixed corpus to stream
    "online.chunks": 5,  # a fixed corpus is cut into this many ordered chunks
    "online.max_chunks": 0,  # stop after this many chunks in this run (0: when the stream ends, or never)
    "online.steps_per_chunk": 200,
    "online.epochs_per_chunk": 0.0,  # > 0: the budget is this many passes over a chunk's tokens instead
    "online.init_from": "",  # workdir (or checkpoints folder) of the model to start from
    "online.pretrain_domain": "",  # name of that model's data (held out: data.source's eval split); empty: derived
    "online.heldout_fraction": 0.05,  # of each chunk's documents, held out by a hash of their text
    "online.heldout_max_windows": 256,  # per domain, evaluated after every chunk
    "online.replay_fraction": 0.0,  # of every batch, drawn from the replay buffer of past sequences
    "online.replay_capacity": 4096,  # windows kept per domain (reservoir sampling)
    "online.lr_schedule": "rewarm",  # rewarm: warmup + cosine decay every chunk | constant: warm up once
    "online.l2_init": 0.0,  # weight of the pull toward the weights before the chunk
    "online.ewc": 0.0,  # weight of EWC (diagonal Fisher on replay data, normalized to mean 1)
    "online.ewc_batches": 8,
    "online.distill": 0.0,  # weight of distillation toward the previous model on replay rows (LwF)
    "online.distill_temperature": 1.0,
    # DP-SGD (config.privacy.enabled; lm.online.privacy): stop before a chunk that would take the run's epsilon
    # (at privacy.delta) past this budget (0: no budget; epsilon is reported after every chunk either way).
    "online.max_epsilon": 0.0,
    "online.checkpoint_every": 100,  # steps within a chunk (0: only at chunk ends)
    "online.poll_interval": 2.0,  # seconds between looks at a watched folder
    "online.idle_timeout": 0.0,  # stop after this many seconds without a new chunk (0: wait forever)
    "online.settle_seconds": 2.0,  # a file is complete once its size and mtime held this long
    "online.gate.max_regression": 0.02,  # relative loss increase allowed on any old domain
    "online.gate.confidence": 0.95,
    "online.gate.bootstrap_samples": 1000,
    # Once preference chunks have held out pairs: the largest fall of the candidate's accuracy on them (the share
    # of pairs it gives the chosen response the higher likelihood) below the current model's that is promoted.
    "online.gate.max_preference_drop": 0.0,
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  online = config.online
  if mode == "online":
    require(bool(online.stream), "config.online.stream is empty: set it to dir:PATH (a watched folder), "
            "tfds:NAME[:SPLIT] or a path to a .txt/.jsonl/.tsv corpus.")
  require(online.chunks >= 1 and online.max_chunks >= 0, "config.online.chunks must be >= 1, max_chunks >= 0.")
  require(online.steps_per_chunk >= 1 or online.epochs_per_chunk > 0,
          "config.online.steps_per_chunk must be >= 1 (or set epochs_per_chunk > 0).")
  require(0.0 <= online.replay_fraction < 1.0,
          f"config.online.replay_fraction must be in [0, 1) (got {online.replay_fraction}).")
  require(0.0 < online.heldout_fraction < 1.0 and online.heldout_max_windows >= 1,
          "config.online.heldout_fraction must be in (0, 1) and heldout_max_windows >= 1.")
  require(online.lr_schedule in LR_SCHEDULES,
          f"config.online.lr_schedule={online.lr_schedule!r} is not one of {LR_SCHEDULES}.")
  require(min(online.l2_init, online.ewc, online.distill) >= 0 and online.distill_temperature > 0,
          "config.online.l2_init, ewc and distill must be >= 0 and distill_temperature > 0.")
  require(online.replay_capacity >= 1 and online.ewc_batches >= 1, "config.online.replay_capacity and "
          "ewc_batches must be >= 1.")
  require(0 <= online.gate.max_preference_drop <= 1, "config.online.gate.max_preference_drop must be in [0, 1] "
          f"(a fall of held-out preference accuracy; got {online.gate.max_preference_drop}).")
  require(online.gate.max_regression >= 0 and 0.5 <= online.gate.confidence < 1,
          "config.online.gate.max_regression must be >= 0 and gate.confidence in [0.5, 1).")
  require(online.max_epsilon >= 0, f"config.online.max_epsilon={online.max_epsilon} must be >= 0 (0: no budget).")
  if mode == "online" and config.privacy.enabled:
    _validate_private(config)


def _validate_private(config: ml_collections.ConfigDict) -> None:
  """What a private online run needs (lm.online.privacy): Poisson draws, a fixed delta, no EWC."""
  privacy, online = config.privacy, config.online
  require(privacy.sampling == "poisson", f"config.privacy.sampling={privacy.sampling!r}: the online loop draws "
          "each private batch by Poisson sampling of the chunk's windows and the replay buffer (shuffled epochs "
          "do not fit a stream). Fix: --config.privacy.sampling=poisson.")
  require(privacy.target_epsilon is None, f"config.privacy.target_epsilon={privacy.target_epsilon}: an online run "
          "does not know how many chunks will come, so no noise can be calibrated to it. Fix: set "
          "--config.privacy.noise_multiplier, and --config.online.max_epsilon=EPSILON to stop before a chunk "
          "that would spend more.")
  require(privacy.delta is not None, "config.privacy.delta is unset: an online run's data grows with every "
          "chunk, so delta cannot default to 1 / (training examples). Fix: --config.privacy.delta=1e-6 (below 1 / "
          "the windows you expect to train on).")
  require(not online.ewc, f"config.online.ewc={online.ewc}: EWC's Fisher is computed from replayed windows "
          "without clipping or noise, outside DP-SGD's guarantee. Fix: --config.online.ewc=0 (l2_init, distill "
          "and replay are private: their terms are in each example's clipped gradient).")


CONFIG = ConfigPart("lm.online", FIELDS, validate)
