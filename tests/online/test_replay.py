"""The replay buffer: reservoir sampling, determinism, sampling shares, persistence, mixed batches."""

from __future__ import annotations

import numpy as np
import pytest

from lm.data import pipeline
from lm.online import replay as replay_lib
from lm.online.replay import ReplayBuffer, mixed_batch

WINDOW = 5


def rows(values) -> np.ndarray:
  """Windows [n, WINDOW] whose first token is the value (so a kept window is identified by it)."""
  values = np.asarray(values, np.int32)
  return values[:, None] + np.zeros((1, WINDOW), np.int32)


def kept(buffer: ReplayBuffer, domain: str = "a") -> np.ndarray:
  return np.sort(buffer.stored(domain)[:, 0])


def test_reservoir_keeps_capacity_distinct_offered_windows():
  buffer = ReplayBuffer(capacity=100, window=WINDOW)
  buffer.add("a", rows(range(40)))
  assert (buffer.size("a"), buffer.seen("a"), len(buffer)) == (40, 40, 40)
  np.testing.assert_array_equal(kept(buffer), np.arange(40))  # not full yet: everything
  buffer.add("a", rows(range(40, 1000)))
  assert (buffer.size("a"), buffer.seen("a"), len(buffer)) == (100, 1000, 100)
  values = kept(buffer)
  assert len(np.unique(values)) == 100 and values.min() >= 0 and values.max() < 1000
  assert values.max() >= 100  # later windows do replace earlier ones
  np.testing.assert_array_equal(buffer.stored("a")[:, 1:], buffer.stored("a")[:, :1] + np.zeros((1, WINDOW - 1)))


def test_reservoir_is_uniform_over_everything_offered():
  # A uniform sample of 0..9999 has mean 4999.5 and a standard error of
  # ~91 * sqrt(0.9) for 1000 kept; averaged over 8 seeds ~30. Keeping the
  # first items gives ~500, the last ~9500, a bias towards recent ones more.
  means = []
  for seed in range(8):
    buffer = ReplayBuffer(capacity=1000, window=WINDOW, seed=seed)
    for start in range(0, 10_000, 2_500):
      buffer.add("a", rows(range(start, start + 2_500)))
    means.append(kept(buffer).mean())
    # Each quarter of the stream should hold ~250 of the kept windows.
    quarters = np.bincount(kept(buffer) // 2_500, minlength=4)
    assert np.all(np.abs(quarters - 250) < 75), quarters
  assert abs(np.mean(means) - 4999.5) < 150, means


def test_content_does_not_depend_on_how_offers_are_batched():
  whole = ReplayBuffer(capacity=60, window=WINDOW, seed=3)
  whole.add("a", rows(range(150)))
  split = ReplayBuffer(capacity=60, window=WINDOW, seed=3)
  split.add("a", rows(range(100)))
  split.add("a", rows(range(100, 150)))
  pieces = ReplayBuffer(capacity=60, window=WINDOW, seed=3)
  for start in range(0, 150, 7):
    pieces.add("a", rows(range(start, min(start + 7, 150))))
  np.testing.assert_array_equal(whole.stored("a"), split.stored("a"))  # slot by slot, not just the set
  np.testing.assert_array_equal(whole.stored("a"), pieces.stored("a"))


def test_content_is_deterministic_and_depends_on_seed_and_domain():
  def build(seed, domain="a"):
    buffer = ReplayBuffer(capacity=50, window=WINDOW, seed=seed)
    buffer.add(domain, rows(range(500)))
    return buffer.stored(domain)

  np.testing.assert_array_equal(build(1), build(1))
  assert not np.array_equal(build(1), build(2))
  assert not np.array_equal(build(1, "a"), build(1, "b"))


def test_domains_are_kept_separately_in_order_of_appearance():
  buffer = ReplayBuffer(capacity=10, window=WINDOW)
  buffer.add("web", rows(range(1000)))
  buffer.add("code", rows(range(5000, 5003)))
  buffer.add("empty", rows([]))  # an empty offer registers nothing
  assert buffer.domains == ["web", "code"]
  assert (buffer.size("web"), buffer.size("code"), buffer.size("empty"), len(buffer)) == (10, 3, 0, 13)


def test_accepts_a_windows_object_and_reads_only_what_it_keeps():
  tokens = np.arange(3000, dtype=np.int32)
  windows = pipeline.Windows(tokens, seq_len=WINDOW - 1, stride=1)
  reads = []

  class Counting:
    def __len__(self):
      return len(windows)

    def __getitem__(self, index):
      reads.append(index)
      return windows[index]

  lazy = ReplayBuffer(capacity=20, window=WINDOW, seed=5)
  lazy.add("a", Counting())
  eager = ReplayBuffer(capacity=20, window=WINDOW, seed=5)
  eager.add("a", np.stack([windows[i] for i in range(len(windows))]))
  np.testing.assert_array_equal(lazy.stored("a"), eager.stored("a"))
  assert len(reads) < 200  # ~20 * (1 + ln(2996 / 20)) items ever enter the reservoir


def test_invalid_arguments_say_how_to_fix_them():
  with pytest.raises(ValueError, match="capacity >= 1"):
    ReplayBuffer(capacity=0, window=WINDOW)
  with pytest.raises(ValueError, match="seq_len \\+ 1"):
    ReplayBuffer(capacity=4, window=1)
  buffer = ReplayBuffer(capacity=4, window=WINDOW)
  with pytest.raises(ValueError, match="not \\[n, 5\\]"):
    buffer.add("a", np.zeros((3, WINDOW + 1), np.int32))
  with pytest.raises(ValueError, match="integer"):
    buffer.add("a", np.zeros((3, WINDOW), np.float32))


def two_domain_buffer(seed=0) -> ReplayBuffer:
  buffer = ReplayBuffer(capacity=200, window=WINDOW, seed=seed)
  buffer.add("a", rows(range(0, 1000)))
  buffer.add("b", rows(range(10_000, 10_050)))  # a much smaller domain gets the same share
  return buffer


def test_sample_gives_domains_equal_shares_uniformly():
  buffer = two_domain_buffer()
  batch = buffer.sample(7, step=0)
  assert batch.shape == (7, WINDOW) and batch.dtype == np.int32
  from_b = batch[:, 0] >= 10_000
  np.testing.assert_array_equal(from_b, [False, True] * 3 + [False])  # round robin, remainder to "a"
  stored = {tuple(r) for r in buffer.stored("a")} | {tuple(r) for r in buffer.stored("b")}
  assert all(tuple(r) in stored for r in batch)
  many = buffer.sample(20_000, step=1)[1::2, 0]  # domain "b": 50 windows, ~200 draws each
  counts = np.bincount(many - 10_000, minlength=50)
  assert counts.min() > 120 and counts.max() < 280, counts


def test_sample_is_a_function_of_step_and_seed():
  buffer = two_domain_buffer()
  np.testing.assert_array_equal(buffer.sample(16, step=3), two_domain_buffer().sample(16, step=3))
  assert not np.array_equal(buffer.sample(16, step=3), buffer.sample(16, step=4))
  assert not np.array_equal(buffer.sample(16, step=3, seed=0), buffer.sample(16, step=3, seed=1))


def test_sample_edge_cases():
  empty = ReplayBuffer(capacity=4, window=WINDOW)
  assert empty.sample(0, step=0).shape == (0, WINDOW)
  with pytest.raises(ValueError, match="empty replay buffer.*add windows first"):
    empty.sample(2, step=0)


def test_arrays_round_trip_exactly():
  buffer = two_domain_buffer(seed=9)
  arrays = buffer.to_arrays()
  assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
  restored = ReplayBuffer.from_arrays(arrays)
  assert restored.domains == buffer.domains and (restored.capacity, restored.window, restored.seed) == (200, WINDOW, 9)
  for domain in buffer.domains:
    np.testing.assert_array_equal(restored.stored(domain), buffer.stored(domain))
    assert restored.seen(domain) == buffer.seen(domain)
  # Continuing after the round trip stores what continuing the original does.
  buffer.add("a", rows(range(1000, 1500)))
  restored.add("a", rows(range(1000, 1500)))
  np.testing.assert_array_equal(restored.stored("a"), buffer.stored("a"))
  np.testing.assert_array_equal(restored.sample(9, step=2), buffer.sample(9, step=2))


def test_save_load_round_trip_and_atomicity(tmp_path):
  buffer = two_domain_buffer(seed=4)
  path = tmp_path / "replay.npz"
  buffer.save(path)
  buffer.save(path)  # overwriting works
  assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]  # no temporary file left
  restored = ReplayBuffer.load(path)
  assert restored.domains == ["a", "b"]
  for domain in buffer.domains:
    np.testing.assert_array_equal(restored.stored(domain), buffer.stored(domain))
    assert restored.seen(domain) == buffer.seen(domain)


def test_corrupt_file_error_names_the_file_and_the_fix(tmp_path):
  path = tmp_path / "replay.npz"
  two_domain_buffer().save(path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # truncated, as by a crash without the atomic rename
  with pytest.raises(ValueError, match=f"{path}.*corrupt.*earlier checkpoint"):
    ReplayBuffer.load(path)
  path.write_bytes(b"not a zip file at all")
  with pytest.raises(ValueError, match=str(path)):
    ReplayBuffer.load(path)
  arrays = two_domain_buffer().to_arrays()
  del arrays["windows_1"]
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=str(path)):
    ReplayBuffer.load(path)


def new_chunk(count=50, seq_len=WINDOW - 1) -> pipeline.Windows:
  return pipeline.Windows(np.arange(100_000, 100_000 + count + seq_len, dtype=np.int32), seq_len=seq_len, stride=1)


@pytest.mark.parametrize("batch_size", [16, 20])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25])
def test_mixed_batch_has_the_requested_replay_rows(batch_size, fraction):
  batch = mixed_batch(new_chunk(), two_domain_buffer(), batch_size=batch_size, replay_fraction=fraction,
                      step=2, seed=0)
  expected = {(16, 0.0): 0, (16, 0.1): 2, (16, 0.25): 4, (20, 0.0): 0, (20, 0.1): 2, (20, 0.25): 5}
  num_replay = expected[batch_size, fraction]
  assert batch["inputs"].shape == batch["targets"].shape == (batch_size, WINDOW - 1)
  assert batch["is_replay"].dtype == bool and batch["is_replay"].sum() == num_replay
  from_new = batch["inputs"][:, 0] >= 100_000
  np.testing.assert_array_equal(from_new, ~batch["is_replay"])
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])  # targets are shifted inputs


def test_mixed_batch_without_stored_windows_uses_only_new_rows():
  for replay in (None, ReplayBuffer(capacity=4, window=WINDOW)):
    batch = mixed_batch(new_chunk(), replay, batch_size=8, replay_fraction=0.5, step=0, seed=0)
    assert not batch["is_replay"].any()


def test_mixed_batch_is_a_function_of_seed_and_step():
  def batch(step, seed=0):
    return mixed_batch(new_chunk(), two_domain_buffer(), batch_size=16, replay_fraction=0.25, step=step, seed=seed)

  for key in ("inputs", "targets", "is_replay"):
    np.testing.assert_array_equal(batch(5)[key], batch(5)[key])
  assert not np.array_equal(batch(5)["inputs"], batch(6)["inputs"])
  assert not np.array_equal(batch(5)["inputs"], batch(5, seed=1)["inputs"])
  # Replay rows change with the step too, not only the new rows.
  assert not np.array_equal(batch(5)["inputs"][-4:], batch(6)["inputs"][-4:])


def test_new_rows_cover_every_window_before_repeating():
  chunk = new_chunk(count=50)
  starts = []
  for step in range(13):  # 13 * 12 new rows = 3 epochs of 50 and 6 more rows
    batch = mixed_batch(chunk, two_domain_buffer(), batch_size=16, replay_fraction=0.25, step=step, seed=1)
    starts.extend(batch["inputs"][~batch["is_replay"], 0] - 100_000)
  starts = np.asarray(starts)
  for epoch in range(3):
    np.testing.assert_array_equal(np.sort(starts[epoch * 50:(epoch + 1) * 50]), np.arange(50))
  assert not np.array_equal(starts[:50], starts[50:100])  # each epoch is a fresh shuffle
  assert not np.array_equal(starts[:50], np.arange(50))  # and shuffled


def test_mixed_batch_validates_its_arguments():
  for fraction in (-0.1, 1.0):
    with pytest.raises(ValueError, match="\\[0, 1\\)"):
      mixed_batch(new_chunk(), None, batch_size=8, replay_fraction=fraction, step=0, seed=0)
  with pytest.raises(ValueError, match="lower replay_fraction"):
    mixed_batch(new_chunk(), two_domain_buffer(), batch_size=2, replay_fraction=0.9, step=0, seed=0)
  assert replay_lib.replay_rows(16, 0.25, None) == 0
