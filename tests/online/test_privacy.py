"""DP-SGD in the online loop (lm.online.privacy): each chunk's Poisson draws, the ledger's epsilon, bad configs.

The loop end to end (a private run over a watched folder, its budget, its resume rules) is in test_loop.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import TruncatedSubsampledGaussianDpEvent as ChunkEvent
from dp_accounting.pld import PLDAccountant

from lm.config import ConfigError, load_config, validate
from lm.online import privacy
from lm.online.replay import ReplayBuffer
from lm.online.step import Regularization, make_online_step
from lm.train import optim
from lm.train import privacy as train_privacy
from lm.train.state import TrainState
from tests.helpers import ROOT, SHARED, tiny_overrides


def _draw(chunk="a", steps=10, noise=1.0, new=400, replay=1000, batch=64, replay_rows=16, expected=48.0):
  return privacy.plan(chunk, steps=steps, noise_multiplier=noise, new_windows=new, replay_windows=replay,
                      batch_size=batch, replay_rows=replay_rows, expected_batch_size=expected)


def test_a_chunks_draw_splits_the_expected_batch_as_the_rows_and_caps_rates_at_one():
  draw = _draw()
  assert (draw.new_rows, draw.replay_rows) == (48, 16)
  assert draw.new_rate == pytest.approx(48.0 * 48 / 64 / 400) and draw.replay_rate == pytest.approx(48.0 * 16 / 64 / 1000)
  assert draw.expected_rows == pytest.approx(48.0)
  small = _draw(new=20, replay=0)  # no replay yet: every row is new data; 20 windows < b: each in every batch
  assert (small.new_rows, small.replay_rows, small.new_rate, small.replay_rate) == (64, 0, 1.0, 0.0)
  assert small.expected_rows == 20.0
  assert privacy.ChunkDraw.from_json(draw.to_json()) == draw
  with pytest.raises(ValueError, match="expected batch 65 must be in"):
    _draw(expected=65.0)


def _windows(count: int, start: int, window: int = 5) -> np.ndarray:
  return (start + np.arange(count)[:, None] * 10 + np.arange(window)[None]).astype(np.int32)


def test_private_batches_draw_each_window_independently_at_its_rate_pad_and_repeat():
  new = _windows(50, 0)
  buffer = ReplayBuffer(capacity=40, window=5, seed=0)
  buffer.add("old", _windows(30, 100_000))
  buffer.add("older", _windows(10, 200_000))
  draw = privacy.plan("c", steps=1, noise_multiplier=1.0, new_windows=50, replay_windows=40, batch_size=16,
                      replay_rows=4, expected_batch_size=12.0)
  counts_new, counts_replay, rows = np.zeros(50), np.zeros(40), []
  stored = np.concatenate([buffer.stored("old"), buffer.stored("older")])
  for step in range(4000):
    batch = privacy.private_batch(new, buffer, draw, step=step, seed=3)
    real, replay = batch["dp_real"].astype(bool), batch["is_replay"]
    assert list(replay) == [False] * 12 + [True] * 4 and batch["inputs"].shape == (16, 4)
    whole = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    # Drawn rows first within each source; their windows are distinct and come from that source.
    new_rows, replay_rows = whole[real & ~replay], whole[real & replay]
    assert list(real[:12]) == sorted(real[:12], reverse=True) and list(real[12:]) == sorted(real[12:], reverse=True)
    counts_new[new_rows[:, 0] // 10] += 1
    counts_replay[[int(np.flatnonzero((stored == row).all(1))[0]) for row in replay_rows]] += 1
    assert len(np.unique(new_rows[:, 0])) == len(new_rows)
    rows.append((len(new_rows), len(replay_rows)))
  # Every window's frequency is its source's rate (binomial, 4000 draws: 5 standard deviations).
  for counts, rate in ((counts_new, draw.new_rate), (counts_replay, draw.replay_rate)):
    assert np.all(np.abs(counts / 4000 - rate) < 5 * math.sqrt(rate * (1 - rate) / 4000))
  drawn = np.asarray(rows)
  assert drawn[:, 0].mean() == pytest.approx(50 * draw.new_rate, rel=0.03)
  assert drawn[:, 1].max() <= 4 and np.any(drawn[:, 1] == 4)  # truncated to the replay rows, and reached
  again = privacy.private_batch(new, buffer, draw, step=17, seed=3)
  assert all(np.array_equal(value, privacy.private_batch(new, buffer, draw, step=17, seed=3)[key])
             for key, value in again.items())
  buffer.add("old", _windows(1, 300_000))
  with pytest.raises(ValueError, match="keep the buffer fixed while training on a chunk"):
    privacy.private_batch(new, buffer, draw, step=0, seed=3)


def test_replay_take_indexes_every_domain_in_order():
  buffer = ReplayBuffer(capacity=8, window=5, seed=0)
  buffer.add("a", _windows(3, 0))
  buffer.add("b", _windows(5, 1000))
  union = np.concatenate([buffer.stored("a"), buffer.stored("b")])
  indices = np.asarray([7, 0, 3, 2, 2])
  assert np.array_equal(buffer.take(indices), union[indices])
  with pytest.raises(ValueError, match=r"indices must be in \[0, 8\)"):
    buffer.take(np.asarray([8]))


def _accountant_epsilon(events: list[tuple[ChunkEvent, int]], delta: float) -> float:
  accountant = PLDAccountant(value_discretization_interval=1e-3)
  for event, steps in events:
    accountant.compose(event, steps)
  return accountant.get_epsilon(delta)


def _events(draw: privacy.ChunkDraw, source: str) -> list:
  size, rate, rows = ((draw.new_windows, draw.new_rate, draw.new_rows) if source == "new"
                      else (draw.replay_windows, draw.replay_rate, draw.replay_rows))
  if not rows:
    return []
  return [(ChunkEvent(dataset_size=size, sampling_probability=rate, truncated_batch_size=rows,
                      noise_multiplier=draw.noise_multiplier), draw.steps)]


def test_the_ledger_is_the_worst_class_of_examples_each_composed_by_the_accountant():
  """Three chunks: the run's epsilon is the largest of four compositions made here with dp_accounting's own
  PLD accountant: the pretraining windows (replay in every chunk) and each chunk's (new, then replay)."""
  delta = 1e-5
  draws = [_draw("a", steps=30, new=300, replay=500), _draw("b", steps=20, new=120, replay=800, noise=1.2),
           _draw("c", steps=40, new=900, replay=900)]
  classes = [sum((_events(d, "replay") for d in draws), [])]
  for i, draw in enumerate(draws):
    classes.append(_events(draw, "new") + sum((_events(d, "replay") for d in draws[i + 1:]), []))
  want = [_accountant_epsilon(events, delta) for events in classes]
  got = privacy.Ledger(draws).epsilon(delta)
  assert got == pytest.approx(max(want), rel=1e-9)
  classes = privacy.Ledger(draws).class_epsilons(delta)
  assert list(classes) == ["pretraining", "a", "b", "c"] and list(classes.values()) == pytest.approx(want, rel=1e-9)
  assert max(want) > min(want) * 1.5  # the classes differ: the maximum is a real choice
  # With no replay, one chunk's epsilon is the accountant's truncated-Poisson epsilon of its steps alone.
  alone = _draw("a", steps=50, new=2000, replay=0)
  assert privacy.Ledger([alone]).epsilon(delta) == pytest.approx(_accountant_epsilon(_events(alone, "new"), delta),
                                                                 rel=1e-9)
  # The train mode's accounting of the same steps is the same distribution.
  assert train_privacy.epsilon_truncated_poisson(1.0, 2000, alone.new_rate, 64, 50, delta) == pytest.approx(
      privacy.Ledger([alone]).epsilon(delta), rel=1e-9)
  # More chunks never lower it; no noise is no privacy; nothing trained is epsilon 0.
  ledger = privacy.Ledger(draws[:1])
  assert ledger.epsilon(delta) <= ledger.epsilon(delta, draws[:2]) <= got
  assert privacy.Ledger([_draw(noise=0.0)]).epsilon(delta) == math.inf and privacy.Ledger().epsilon(delta) == 0.0
  assert privacy.Ledger.from_json(privacy.Ledger(draws).to_json()) == privacy.Ledger(draws)
  metrics = privacy.Ledger(draws).metrics(delta, clip_norm=1.0)
  assert metrics["privacy/steps"] == 90.0 and metrics["privacy/chunks"] == 3.0
  assert metrics["privacy/epsilon"] == got and metrics["privacy/noise_multiplier"] == 1.0


def test_the_online_dp_step_without_noise_or_clip_is_the_ordinary_online_step():
  """The online loss (cross-entropy + L2-init) per example, no noise, no clip, every row real and the divisor
  the batch: the same update as the non-private online step, within float32 rounding."""
  from lm.models.config import TransformerConfig  # pylint: disable=g-import-not-at-top
  from lm.models.transformer import TransformerLM  # pylint: disable=g-import-not-at-top
  model = TransformerLM(TransformerConfig(vocab_size=64, num_layers=1, num_heads=2, width=32, max_len=16))
  tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
  params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
  anchor = jax.tree.map(lambda x: x + 0.01, params)
  direction = optim.make_update_direction(load_config(str(ROOT / "experiments" / "online_shakespeare.py")).optim)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=direction.init(params),
                     rng=jax.random.key_data(jax.random.key(1)))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "is_replay": np.arange(8) >= 6}
  inputs = {"lr": np.float32(1e-2), "anchor": anchor, "fisher": ()}
  reg = Regularization(l2_init=0.5)
  plain, _ = jax.jit(make_online_step(model, direction, reg))(state, batch, inputs)
  dp = train_privacy.DpSgd(clip_norm=math.inf, noise_multiplier=0.0, expected_rows_from_inputs=True)
  private, metrics = jax.jit(make_online_step(model, direction, reg, privacy=dp))(
      state, {**batch, "dp_real": np.ones(8, np.int32)}, {**inputs, "dp_expected_rows": np.float32(8.0)})
  for got, want in zip(jax.tree.leaves(private.params), jax.tree.leaves(plain.params)):
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-6 * max(float(jnp.max(jnp.abs(want))), 1.0)
  assert float(metrics["train/dp_rows"]) == 8.0


ONLINE = {"privacy.enabled": True, "privacy.sampling": "poisson", "privacy.expected_batch_size": 6.0,
          "privacy.delta": 1e-5, "online.stream": str(SHARED / "data" / "ptb")}


@pytest.mark.parametrize("extra,match", [
    ({"privacy.sampling": "shuffle", "privacy.expected_batch_size": None},
     "config.privacy.sampling='shuffle': the online loop draws each private batch by Poisson sampling"),
    ({"privacy.target_epsilon": 8.0}, "config.privacy.target_epsilon=8.0: an online run does not know how many"),
    ({"privacy.delta": None}, "config.privacy.delta is unset: an online run's data grows with every chunk"),
    ({"online.ewc": 0.5}, "config.online.ewc=0.5: EWC's Fisher is computed from replayed windows"),
    ({"online.max_epsilon": -1.0}, "config.online.max_epsilon=-1.0 must be >= 0"),
])
def test_private_online_configs_the_accountant_cannot_cover_are_refused(extra, match):
  config = load_config(str(ROOT / "experiments" / "online_shakespeare.py"), tiny_overrides(**{**ONLINE, **extra}))
  with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
    validate(config, "online")
