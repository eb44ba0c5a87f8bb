"""The online loop end to end: chunks, quarantine, exactly-once across kills, corrupt checkpoints, disk full."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lm.config import load_config
from lm.data import stream as stream_lib
from lm.app import online as online_loop
from lm.online.step import chunk_learning_rate
from lm.online.store import OnlineCheckpointer
from lm.train import checkpoint as checkpoint_lib
from tests.helpers import ROOT, cli_args, device_env, run_cli, tiny_overrides, train_losses

CONFIG = str(ROOT / "experiments" / "online_shakespeare.py")
SENTENCES = [f"the {adjective} film number {index} was {verdict} and {extra}"
             for index, (adjective, verdict, extra) in enumerate(
                 [(a, v, e) for a in ("bold", "quiet", "long", "short", "odd", "warm", "grim", "bright")
                  for v in ("great", "dull", "fine", "bad", "moving") for e in ("funny", "sad", "slow")])]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
  """A tiny byte-level Shakespeare model (the online loop's starting point)."""
  workdir = tmp_path_factory.mktemp("pretrained") / "run"
  run_cli("--config", str(ROOT / "experiments" / "shakespeare_byte.py"), "--workdir", str(workdir),
          *cli_args(steps=60, eval_every=60, checkpoint_every=60), check=True)
  return workdir


def online_overrides(pretrained: Path, **extra) -> dict:
  overrides = tiny_overrides(log_every=1, keep_checkpoints=5)
  overrides.update({
      "online.init_from": str(pretrained), "online.domain": "", "online.steps_per_chunk": 4, "online.checkpoint_every": 2,
      "online.heldout_max_windows": 8, "online.heldout_fraction": 0.2, "online.replay_capacity": 64,
      "online.gate.bootstrap_samples": 200, "online.settle_seconds": 0.0, "online.poll_interval": 0.05,
      "online.idle_timeout": 0.5, "optim.warmup_steps": 2,
  })
  overrides.update(extra)
  return overrides


def corpus(tmp_path: Path, name: str = "reviews.txt", count: int = len(SENTENCES)) -> Path:
  path = tmp_path / "corpus" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n\n".join(SENTENCES[:count]) + "\n")
  return path


def test_a_watched_folder_is_trained_chunk_by_chunk_and_bad_files_are_quarantined(pretrained, tmp_path):
  watched = tmp_path / "incoming"
  watched.mkdir()
  (watched / "a.txt").write_text("\n\n".join(SENTENCES[:60]))
  (watched / "b.bin.txt").write_bytes(b"caf\xe9 latin-1, not utf-8\n")
  (watched / "c.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES[60:120]))
  (watched / "d.txt.part").write_text("still being written")
  for index, name in enumerate(("a.txt", "b.bin.txt", "c.jsonl")):
    os.utime(watched / name, (1_000_000 + index, 1_000_000 + index))
  workdir = tmp_path / "online"
  config = load_config(CONFIG, online_overrides(pretrained, **{"online.stream": f"dir:{watched}",
                                                                "online.replay_fraction": 0.25}))
  result = online_loop.run_online(config, str(workdir))
  assert result.chunks_done == 2 and result.step == 8
  continual = json.loads((workdir / "continual.json").read_text())
  assert continual["domains"] == ["tiny_shakespeare", "incoming"]
  assert continual["chunks"] == ["initial", "a.txt", "c.jsonl"]
  assert len(continual["R"]) == 3 and all(len(row) == 2 for row in continual["R"][1:])
  assert continual["R"][2][1] < continual["R"][0][1] or continual["R"][2][1] < continual["R"][1][1]
  assert (workdir / online_loop.HEATMAP_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  quarantined = list((workdir / "quarantine").iterdir())
  assert sorted(p.name for p in quarantined) == ["b.bin.txt", "b.bin.txt.reason.txt"]
  assert "UTF-8" in (workdir / "quarantine" / "b.bin.txt.reason.txt").read_text()
  assert (watched / "d.txt.part").exists()  # never taken while it is being written
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))
  chunk_rows = [r for r in rows if "continual/avg_loss" in r]
  assert [r["step"] for r in chunk_rows] == [4, 8] and all("gate/promoted" in r for r in chunk_rows)
  assert all(r["train/replay_rows"] == 2 for r in rows if "train/loss" in r)  # 25 % of 8 rows


def preference_records(count: int, seed: int = 0) -> list[dict]:
  """Pairs whose chosen response ends in "!" and rejected one in "?" after the same words: a preference a
  language model can learn from a few DPO steps."""
  rng = random.Random(seed)
  return [{"prompt": f"{rng.choice(SENTENCES)[:12]} ", "chosen": f"so {word}!", "rejected": f"so {word}?"}
          for word in (rng.choice(("good", "bad", "odd", "fine", "dull")) for _ in range(count))]


def test_preference_chunks_train_dpo_against_the_served_model_between_text_chunks(pretrained, tmp_path):
  watched = tmp_path / "incoming"
  watched.mkdir()
  (watched / "a.txt").write_text("\n\n".join(SENTENCES[:60]))
  # The pretrained model ranks "?" above "!" after these words: DPO turns that around (held-out accuracy 0 -> 1).
  (watched / "feedback-1.preferences.jsonl").write_text(
      "\n".join(json.dumps(record) for record in preference_records(96)))
  too_long = {"prompt": "x" * 40, "chosen": "a", "rejected": "b"}  # 40 bytes: no room in seq_len=32
  (watched / "feedback-2.preferences.jsonl").write_text(json.dumps(too_long) + "\n")
  (watched / "c.tsv").write_text("prompt\tchosen\trejected\n" + "\n".join(  # pairs in a .tsv, under any name
      f"{r['prompt']}\t{r['chosen']}\t{r['rejected']}" for r in preference_records(32, seed=1)))
  names = ("a.txt", "feedback-1.preferences.jsonl", "feedback-2.preferences.jsonl", "c.tsv")
  for index, name in enumerate(names):
    os.utime(watched / name, (1_000_000 + index, 1_000_000 + index))
  workdir = tmp_path / "online"
  per_chunk = 6
  config = load_config(CONFIG, online_overrides(pretrained, **{
      "online.stream": f"dir:{watched}", "online.replay_fraction": 0.25, "online.steps_per_chunk": per_chunk,
      "online.heldout_fraction": 0.25, "online.heldout_max_windows": 64, "optim.lr": 3e-3, "dpo.beta": 0.5}))
  result = online_loop.run_online(config, str(workdir))
  assert result.chunks_done == 3 and result.step == 3 * per_chunk
  continual = json.loads((workdir / "continual.json").read_text())
  assert continual["chunks"] == ["initial", "a.txt", "feedback-1.preferences.jsonl", "c.tsv"]
  assert continual["trained"][2:] == [[], []]  # preference chunks train no domain's text
  reason = (workdir / "quarantine" / "feedback-2.preferences.jsonl.reason.txt").read_text()
  assert "feedback-2.preferences.jsonl:1" in reason and "no room for a response" in reason
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = {r["step"]: r for r in rows if "train/loss" in r}
  # The second chunk's steps are DPO on the first preference chunk: the pairs (6 of 8 rows), replayed text (2 rows).
  dpo_steps = range(per_chunk + 1, 2 * per_chunk + 1)
  assert all(steps[k]["train/replay_rows"] == 2 and "train/accuracy" in steps[k] for k in dpo_steps)
  assert steps[dpo_steps[0]]["train/loss"] == pytest.approx(np.log(2), abs=1e-4)  # the policy starts as its reference
  assert steps[dpo_steps[-1]]["train/loss"] < steps[dpo_steps[0]]["train/loss"]
  chunk_rows = [r for r in rows if "continual/avg_loss" in r]
  assert [r["step"] for r in chunk_rows] == [per_chunk * k for k in (1, 2, 3)]
  # Once pairs are held out, every gate reports the held-out preference accuracy of the candidate and current:
  # the pretrained model ranked "?" first on every held-out pair, the DPO-tuned one "!" (the chosen).
  assert "online/preference_accuracy" not in chunk_rows[0]
  assert (chunk_rows[1]["gate/preference_accuracy_current"], chunk_rows[1]["online/preference_accuracy"]) == (0.0, 1.0)
  assert [r["gate/promoted"] for r in chunk_rows] == [1.0, 1.0, 1.0]
  step = checkpoint_lib.latest_step(str(workdir))
  gate = json.loads((workdir / "checkpoints" / str(step) / "online" / "metadata").read_text())["gate"]
  assert [record["chunk"] for record in gate] == ["a.txt", "feedback-1.preferences.jsonl", "c.tsv"]
  assert "preferences" not in gate[0] and gate[1]["preferences"]["pairs"] > 0
  assert gate[2]["preferences"]["pairs"] > gate[1]["preferences"]["pairs"]  # c's held-out pairs joined the set
  assert "margins" not in gate[1]["preferences"]
  # The served model is the DPO-tuned one: it ranks the chosen response of a held-out pair first.
  served = load_served(config, workdir)
  assert served["!"] > served["?"]


def load_served(config, workdir: Path) -> dict[str, float]:
  """The log-probabilities, under the online run's served model, of "so good" followed by "!" and by "?"."""
  from lm.experiment import load_trained  # pylint: disable=g-import-not-at-top
  from lm.models.preference import sequence_logprobs  # pylint: disable=g-import-not-at-top
  experiment, params, _ = load_trained(config, str(workdir), "eval")
  out = {}
  for end in ("!", "?"):
    ids = np.asarray(experiment.tokenizer.encode(f"{SENTENCES[0][:12]} so good{end}"), np.int32)
    mask = np.zeros(len(ids) - 1, np.int32)
    mask[-1] = 1
    with experiment.steps.context():
      out[end] = float(sequence_logprobs(experiment.model, params, ids[None, :-1], ids[None, 1:], mask[None])[0])
  return out


def test_the_gate_refuses_a_candidate_whose_held_out_preference_accuracy_falls():
  from lm.stats import ab  # pylint: disable=g-import-not-at-top
  current = np.array([2.0, 1.0, 0.5, -1.0])  # 3 of 4 pairs ranked right
  assert ab.preference_gate(np.array([1.0, 0.1, -0.2, -3.0]), current, max_drop=0.0)["passed"] is False
  assert ab.preference_gate(np.array([1.0, 0.1, -0.2, -3.0]), current, max_drop=0.25)["passed"] is True
  rising = ab.preference_gate(np.array([1.0, 0.1, 0.2, 0.3]), current, max_drop=0.0)
  assert rising["passed"] and (rising["current_accuracy"], rising["candidate_accuracy"]) == (0.75, 1.0)
  assert "fell from 0.750 to 0.500" in ab.preference_gate(np.array([1, 1, -1, -1.0]), current, max_drop=0)["reason"]
  with pytest.raises(ValueError, match="same non-empty set"):
    ab.preference_gate(np.zeros(3), current, max_drop=0.0)


def test_the_served_model_is_the_promoted_one(pretrained, tmp_path):
  workdir = tmp_path / "online"
  stream = stream_lib.IterableStream(SENTENCES, domain="reviews", chunk_size=40)
  # max_regression 0 with confidence 0.95: any candidate that is worse anywhere is refused.
  config = load_config(CONFIG, online_overrides(pretrained, **{
      "online.stream": "iterable", "online.max_chunks": 1, "online.gate.max_regression": 0.0,
      "optim.lr": 0.05}))
  online_loop.run_online(config, str(workdir), stream=stream)
  from lm.experiment import load_trained# pylint: disable=g-import-not-at-top
  experiment, served, _ = load_trained(config, str(workdir), "eval")
  initial, _ = checkpoint_lib.restore_params(str(pretrained), experiment.abstract_state.params)
  latest, _ = checkpoint_lib.restore_params(str(workdir), experiment.abstract_state.params)
  gate = _online_item(workdir)["gate"]
  assert gate[0]["promoted"] is False and "tiny_shakespeare" in gate[0]["reasons"][0]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax_leaves(a), jax_leaves(b)))  # noqa: E731
  assert same(served, initial) and not same(latest, initial)  # the candidate is kept, not served


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _online_item(workdir: Path) -> dict:
  step = checkpoint_lib.latest_step(str(workdir))
  return json.loads((workdir / "checkpoints" / str(step) / "online" / "metadata").read_text())


def _run_online_cli(workdir: Path, pretrained: Path, stream: Path, **extra):
  overrides = online_overrides(pretrained, **{"online.stream": str(stream), "online.chunks": 3, **extra})
  return [sys.executable, "-m", "lm.main", "--config", CONFIG, "--workdir", str(workdir), "--mode", "online",
          *[f"--config.{key}={value}" for key, value in overrides.items()]]


@pytest.mark.faults
def test_sigkill_at_seeded_instants_resumes_with_nothing_trained_twice_or_skipped(pretrained, tmp_path):
  # Six kills (SIGKILL, at points of the code named by LM_FAULTS: lm.core.faults), each at an instant drawn
  # (seed 16) after the checkpoint the previous kill left: mid-clean, mid-step, mid-save, mid-evaluation and
  # between a chunk's last checkpoint and the next chunk. 3 chunks of 4 steps, a checkpoint every 2 steps.
  stream = corpus(tmp_path)
  reference = tmp_path / "reference"
  subprocess.run(_run_online_cli(reference, pretrained, stream), cwd=ROOT, check=True, capture_output=True)
  rng = random.Random(16)
  killed = tmp_path / "killed"
  instants = []
  for kind in ("online/clean", "train/step", "checkpoint/save", "online/eval", "online/between_chunks",
               "train/step"):
    step = checkpoint_lib.latest_step(str(killed)) or 0
    done = len(_online_item(killed)["consumed"]) if step else 0
    if kind == "train/step":  # one of the next 3 steps
      index = rng.randint(step + 1, min(step + 3, 12))
    elif kind == "checkpoint/save":  # one of the next 2 saves
      index = rng.choice([s for s in range(step + 1, min(step + 4, 12) + 1) if s % 2 == 0])
    else:
      index = done + 1  # the next chunk's cleaning, evaluation or aftermath
    result = subprocess.run(_run_online_cli(killed, pretrained, stream), cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "LM_FAULTS": f"{kind}@{index}=SIGKILL"})
    assert result.returncode == -9, (kind, index, result.stderr[-3000:])  # the kill landed
    instants.append((step, kind, index))
  assert len({step for step, _, _ in instants}) > 2, instants  # the kills were spread over the run
  subprocess.run(_run_online_cli(killed, pretrained, stream), cwd=ROOT, check=True, capture_output=True)
  ref, got = _online_item(reference), _online_item(killed)
  assert got["consumed"] == ref["consumed"] == [f"reviews-{k:03d}-of-003" for k in (1, 2, 3)]
  assert checkpoint_lib.latest_step(str(killed)) == checkpoint_lib.latest_step(str(reference)) == 12
  np.testing.assert_allclose(np.array(got["matrix"]["R"], float), np.array(ref["matrix"]["R"], float), rtol=1e-5)
  losses, expected = train_losses(killed), train_losses(reference)
  assert sorted(losses) == sorted(expected) == list(range(1, 13))
  for step, loss in expected.items():
    assert losses[step] == pytest.approx(loss, rel=1e-5), step


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(pretrained, tmp_path, caplog):
  stream = corpus(tmp_path)
  workdir = tmp_path / "online"
  subprocess.run(_run_online_cli(workdir, pretrained, stream, **{"online.max_chunks": 1}), cwd=ROOT, check=True,
                 capture_output=True)
  assert checkpoint_lib.latest_step(str(workdir)) == 4
  for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.name != "commit_success.txt":
      path.write_bytes(b"garbage")
  config = load_config(CONFIG, online_overrides(pretrained, **{"online.stream": str(stream), "online.chunks": 3,
                                                                "online.max_chunks": 1}))
  result = online_loop.run_online(config, str(workdir))
  assert "Checkpoint step 4" in caplog.text and "falling back" in caplog.text
  # Resumed from step 2 (inside chunk 1) and trained its steps 3 and 4 once more: the lost work, nothing else.
  assert result.step == 4 and result.chunks_done == 1
  consumed = _online_item(workdir)["consumed"]
  assert consumed == ["reviews-001-of-003"]
  assert (workdir / "unreadable_checkpoints" / "4" / "state").is_dir()  # set aside, not deleted


def test_a_full_disk_keeps_the_previous_checkpoint_usable(small_disk_of):
  # A real 1 MB file system: the first checkpoint (two 400 kB parameter trees) fits, the second does not, and
  # Orbax/TensorStore meet a real ENOSPC part way through writing it.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lm.train.state import TrainState  # pylint: disable=g-import-not-at-top
  disk = small_disk_of("1m")
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(100_000, np.float32))}  # incompressible
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(), rng=jnp.zeros(2, jnp.uint32))
  checkpointer = OnlineCheckpointer(str(disk / "checkpoints"))
  checkpointer.save(1, state, params, {"consumed": ["a"]}, {"x": np.arange(3)}, {})
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"The disk holding .*checkpoints is full .*step 2 was "
                                                           r"not written\. The checkpoint of step 1 is intact"):
    checkpointer.save(2, state, params, {"consumed": ["a", "b"]}, {"x": np.arange(3)}, {})
  assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["1"]  # the partial step 2 is gone
  restored = checkpointer.restore_latest(state, params)
  assert restored[2] == {"consumed": ["a"]} and restored[4] == 1
  np.testing.assert_array_equal(restored[3]["x"], np.arange(3))


def test_the_anchor_and_fisher_items_are_optional(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lm.train.state import TrainState  # pylint: disable=g-import-not-at-top
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, opt_state=(),
                     rng=jnp.zeros(2, jnp.uint32))
  checkpointer = OnlineCheckpointer(str(tmp_path / "checkpoints"))

  def save(step, **items):
    checkpointer.save(step, state, {"w": jnp.ones(3)}, {"step": step}, {"x": np.arange(3)}, {}, **items)

  save(1)  # as at a chunk's end, or before the items existed
  restored = checkpointer.restore_latest(state, {"w": jnp.ones(3)})
  assert restored.step == 1 and restored.anchor is None and restored.fisher is None
  save(2, anchor={"w": jnp.full(3, 2.0)}, fisher={"w": jnp.full(3, 0.5)})
  restored = checkpointer.restore_latest(state, {"w": jnp.ones(3)})
  assert restored.step == 2 and restored.online == {"step": 2}
  np.testing.assert_array_equal(restored.anchor["w"], np.full(3, 2.0))
  assert restored.fisher["w"].dtype == np.float32
  np.testing.assert_array_equal(restored.fisher["w"], np.full(3, 0.5))
  save(3, anchor={"w": jnp.full(3, 3.0)})  # l2_init or distillation: no Fisher
  restored = checkpointer.restore_latest(state, {"w": jnp.ones(3)})
  assert restored.step == 3 and restored.fisher is None
  np.testing.assert_array_equal(restored.anchor["w"], np.full(3, 3.0))
  checkpointer.close()


def test_a_vanished_stream_folder_stops_with_a_clear_message(pretrained, tmp_path):
  watched = tmp_path / "incoming"
  watched.mkdir()
  (watched / "a.txt").write_text("\n\n".join(SENTENCES[:60]))
  args = [f"--config.{k}={v}" for k, v in online_overrides(pretrained, **{"online.stream": f"dir:{watched}",
                                                                           "online.idle_timeout": 30}).items()]
  process = subprocess.Popen([sys.executable, "-m", "lm.main", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
                              "--mode", "online", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.monotonic() + 240
  while checkpoint_lib.latest_step(str(tmp_path / "w")) != 4 and process.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.05)
  shutil.rmtree(watched)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 2, stderr[-2000:]
  assert "error:" in stderr and "no longer exists" in stderr
  assert checkpoint_lib.latest_step(str(tmp_path / "w")) == 4  # the work done is kept


def test_online_mode_without_a_model_to_continue_is_refused(tmp_path):
  result = run_cli("--config", CONFIG, "--workdir", str(tmp_path / "w"), "--mode", "online",
                   "--config.online.init_from=")
  assert result.returncode == 2 and "config.online.init_from is empty" in result.stderr
  assert not (tmp_path / "w").exists()


def test_rewarm_and_constant_schedules():
  kwargs = dict(lr=1.0, min_lr=0.1, warmup_steps=2)
  rewarm = [chunk_learning_rate(k, 10, 1, schedule="rewarm", **kwargs) for k in range(10)]
  assert rewarm[:2] == [0.5, 1.0] and rewarm[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))
  assert all(a >= b for a, b in zip(rewarm[1:], rewarm[2:]))
  assert [chunk_learning_rate(k, 10, 0, schedule="constant", **kwargs) for k in (0, 1, 5)] == [0.5, 1.0, 1.0]
  assert chunk_learning_rate(0, 10, 3, schedule="constant", **kwargs) == 1.0  # warms up only once


def test_all_regularizers_train_together_and_are_logged(pretrained, tmp_path):
  stream = stream_lib.IterableStream(SENTENCES, domain="reviews", chunk_size=60)
  config = load_config(CONFIG, online_overrides(pretrained, **{
      "online.stream": "iterable", "online.max_chunks": 1, "online.replay_fraction": 0.25,
      "online.l2_init": 0.1, "online.ewc": 0.1, "online.ewc_batches": 2, "online.distill": 0.5}))
  result = online_loop.run_online(config, str(tmp_path / "online"), stream=stream)
  assert result.chunks_done == 1
  rows = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert train_rows[0]["train/l2_init"] == 0.0  # the first step starts at the anchor
  assert train_rows[-1]["train/l2_init"] > 0 and train_rows[-1]["train/ewc"] > 0
  assert all(r["train/distill"] >= 0 for r in train_rows)
  for r in train_rows:
    expected = r["train/loss"] + 0.1 * r["train/l2_init"] + 0.1 * r["train/ewc"] + 0.5 * r["train/distill"]
    assert r["train/total_loss"] == pytest.approx(expected, rel=1e-5)
  # Mid-chunk checkpoints carry the anchor and the Fisher (a resumed chunk keeps them); chunk ends need neither.
  checkpoints = tmp_path / "online" / "checkpoints"
  assert _steps(checkpoints) == [0, 2, 4]
  assert {"anchor", "fisher"} <= _items(checkpoints, 2)
  assert not {"anchor", "fisher"} & (_items(checkpoints, 0) | _items(checkpoints, 4))


def _steps(checkpoints: Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _items(checkpoints: Path, step: int) -> set[str]:
  return {p.name for p in (checkpoints / str(step)).iterdir() if p.is_dir()}


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
@pytest.mark.parametrize("regularizer", ["l2_init", "ewc", "distill"])
def test_a_chunk_resumed_mid_way_keeps_its_regularizer_anchor(pretrained, tmp_path, regularizer):
  """Resuming from a mid-chunk checkpoint equals the uninterrupted run: same anchor (and Fisher), same losses."""
  overrides = online_overrides(pretrained, **{
      "online.stream": str(corpus(tmp_path)), "online.chunks": 3, "online.max_chunks": 1,
      "online.replay_fraction": 0.25, "online.ewc_batches": 2, f"online.{regularizer}": 0.5})
  reference = tmp_path / "reference"
  online_loop.run_online(load_config(CONFIG, overrides), str(reference))
  checkpoints = reference / "checkpoints"
  assert _steps(checkpoints) == [0, 2, 4]
  assert _items(checkpoints, 2) & {"anchor", "fisher"} == ({"anchor", "fisher"} if regularizer == "ewc" else {"anchor"})
  assert not {"anchor", "fisher"} & (_items(checkpoints, 0) | _items(checkpoints, 4))
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  reader = ocp.PyTreeCheckpointer()
  anchor, start = reader.restore(checkpoints / "2" / "anchor"), reader.restore(checkpoints / "0" / "state")["params"]
  assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(anchor), jax_leaves(start)))  # the chunk's start
  # The workdir as a kill right after the mid-chunk checkpoint of step 2 leaves it.
  resumed = tmp_path / "resumed"
  shutil.copytree(reference, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  (resumed / "metrics.jsonl").unlink()
  (resumed / "continual.json").unlink()
  result = online_loop.run_online(load_config(CONFIG, overrides), str(resumed))
  assert result.chunks_done == 1 and result.step == 4
  ref, got = ([r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
               if "train/loss" in r and r["step"] > 2] for workdir in (reference, resumed))
  assert [r["step"] for r in got] == [r["step"] for r in ref] == [3, 4]
  for name in ("train/loss", "train/total_loss", f"train/{regularizer}"):
    assert [r[name] for r in got] == pytest.approx([r[name] for r in ref], rel=1e-5), name
  assert ref[0][f"train/{regularizer}"] > 0  # the anchor is the chunk's start, not the resumed weights
  continual = lambda workdir: np.array(json.loads((workdir / "continual.json").read_text())["R"], float)  # noqa: E731
  np.testing.assert_allclose(continual(resumed), continual(reference), rtol=1e-5)


def test_sigterm_saves_the_chunk_in_progress_and_exits_zero(pretrained, tmp_path):
  stream = corpus(tmp_path)
  workdir = tmp_path / "online"
  command = _run_online_cli(workdir, pretrained, stream, **{"online.steps_per_chunk": 10_000,
                                                             "online.checkpoint_every": 1_000, "online.l2_init": 0.1})
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count("train/loss") >= 3) and process.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  step = checkpoint_lib.latest_step(str(workdir))
  progress = _online_item(workdir)["in_progress"]
  assert step >= 3 and progress["id"] == "reviews-001-of-003" and progress["step_in_chunk"] == step
  assert "anchor" in _items(workdir / "checkpoints", step)  # a regularizer no longer keeps SIGTERM from saving


def test_a_chunk_too_small_to_hold_out_a_window_still_trains(pretrained, tmp_path):
  stream = stream_lib.IterableStream(SENTENCES[:3] + SENTENCES[3:120], domain="reviews", chunk_size=3)
  config = load_config(CONFIG, online_overrides(pretrained, **{"online.stream": "iterable", "online.max_chunks": 2}))
  result = online_loop.run_online(config, str(tmp_path / "online"), stream=stream)
  assert result.chunks_done == 2 and result.step == 8
  continual = json.loads((tmp_path / "online" / "continual.json").read_text())
  assert continual["chunks"] == ["initial", "reviews-00001", "reviews-00002"]


def test_train_and_online_workdirs_are_not_mixed_up(pretrained, tmp_path):
  from tests.helpers import snapshot  # pylint: disable=g-import-not-at-top
  before = snapshot(pretrained)
  result = run_cli("--config", CONFIG, "--workdir", str(pretrained), "--mode", "online",
                   *[f"--config.{k}={v}" for k, v in online_overrides(pretrained).items()])
  assert result.returncode == 2 and "holds checkpoints of a --mode train run" in result.stderr
  assert f"--config.online.init_from={pretrained}" in result.stderr
  assert snapshot(pretrained) == before  # nothing moved aside or written
  online = tmp_path / "online"
  config = load_config(CONFIG, online_overrides(pretrained, **{"online.stream": "iterable", "online.max_chunks": 1}))
  online_loop.run_online(config, str(online), stream=stream_lib.IterableStream(SENTENCES, domain="r", chunk_size=60))
  result = run_cli("--config", str(ROOT / "experiments" / "shakespeare_byte.py"), "--workdir", str(online),
                   *cli_args(steps=20))
  assert result.returncode == 2 and "holds checkpoints of an online run" in result.stderr


PRIVATE = {"privacy.enabled": True, "privacy.sampling": "poisson", "privacy.expected_batch_size": 6.0,
           "privacy.delta": 1e-5, "privacy.clip_norm": 1.0, "privacy.noise_multiplier": 1.0}


def test_a_private_online_run_accounts_every_chunk_and_stops_at_its_budget(pretrained, tmp_path):
  """DP-SGD in the online loop (lm.online.privacy): each chunk's draw joins the saved ledger and its epsilon is
  reported; a preference chunk is quarantined; the run cannot be resumed without privacy; a budget stops it."""
  from lm.online import privacy as online_privacy  # pylint: disable=g-import-not-at-top
  from tests.helpers import snapshot  # pylint: disable=g-import-not-at-top
  watched = tmp_path / "incoming"
  watched.mkdir()
  (watched / "a.txt").write_text("\n\n".join(SENTENCES[:60]))
  (watched / "feedback.preferences.jsonl").write_text("\n".join(json.dumps(r) for r in preference_records(16)))
  (watched / "c.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES[60:120]))
  for index, name in enumerate(("a.txt", "feedback.preferences.jsonl", "c.jsonl")):
    os.utime(watched / name, (1_000_000 + index, 1_000_000 + index))
  overrides = online_overrides(pretrained, **{"online.stream": f"dir:{watched}", "online.replay_fraction": 0.25,
                                              "online.l2_init": 0.1, **PRIVATE})
  workdir = tmp_path / "online"
  result = online_loop.run_online(load_config(CONFIG, overrides), str(workdir))
  assert result.chunks_done == 2 and result.step == 8
  reason = (workdir / "quarantine" / "feedback.preferences.jsonl.reason.txt").read_text()
  assert "which a private online run does not train on" in reason
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "train/loss" in r]
  assert len(steps) == 8 and all(1 <= r["train/dp_rows"] <= 8 and "train/clip_fraction" in r for r in steps)
  chunks = [r for r in rows if "privacy/epsilon" in r]
  assert [r["step"] for r in chunks] == [4, 8] and [r["privacy/steps"] for r in chunks] == [4.0, 8.0]
  first, second = (r["privacy/epsilon"] for r in chunks)
  assert 0 < first < second < math.inf
  saved = _online_item(workdir)["privacy"]
  assert saved["enabled"] and [d["chunk"] for d in saved["draws"]] == ["a.txt", "c.jsonl"]
  assert all((d["new_rows"], d["replay_rows"]) == (6, 2) for d in saved["draws"])  # the buffer holds Shakespeare
  assert online_privacy.Ledger.from_json(saved["draws"]).epsilon(1e-5) == second == result.privacy["privacy/epsilon"]
  # Windows without overlap: the new windows of a.txt are its training tokens cut into seq_len pieces.
  assert saved["draws"][0]["new_windows"] < 60 * 60 / 32
  # Resuming the private run without DP-SGD is refused, and nothing in it changes.
  before = snapshot(workdir)
  refused = run_cli("--config", CONFIG, "--workdir", str(workdir), "--mode", "online",
                    *[f"--config.{k}={v}" for k, v in {**overrides, "privacy.enabled": False}.items()])
  assert refused.returncode == 2
  assert "error: config.privacy.enabled=False, but the online run in" in refused.stderr, refused.stderr[-1500:]
  assert snapshot(workdir) == before
  # A budget between the two chunks' epsilons: a new run, on a mesh of 4 devices (2 of the 8 rows each), trains
  # a.txt as the one-device run did (the same draws and noise), stops before c.jsonl and says why.
  budgeted = tmp_path / "budgeted"
  result = run_cli("--config", CONFIG, "--workdir", str(budgeted), "--mode", "online", *[
      f"--config.{k}={v}" for k, v in {**overrides, "online.max_epsilon": (first + second) / 2}.items()],
      env=device_env(4))
  assert result.returncode == 0, result.stderr[-1500:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["chunks"] == 1 and summary["privacy/epsilon"] == pytest.approx(first)
  assert summary["stopped"].startswith("chunk c.jsonl would take epsilon from")
  assert _online_item(budgeted)["consumed"] == ["a.txt"]
  on_mesh = [json.loads(line) for line in (budgeted / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/loss"] for r in on_mesh if "train/loss" in r] == pytest.approx(
      [r["train/loss"] for r in steps[:4]], rel=1e-4)
