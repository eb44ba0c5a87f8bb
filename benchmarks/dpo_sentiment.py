r"""DPO's controlled sentiment generation (Rafailov et al. 2023, §6.1, Figure 2 left): the reward-KL frontier.

  python benchmarks/dpo_sentiment.py [--out runs/dpo_sentiment] [--quick]

The whole study in one process, every run a variant of experiments/dpo_sentiment.py trained in --out with
`lm.app.train.train` (a run that is already finished there is reused, not trained again):

1. reward: the SST-2 classifier (:reward); the reward of a sample is p(positive) (class "1") of the text
   prompt + " " + the continuation's text (the sentence its preference record stands for).
2. lm: the sentence LM of SST-2 (:lm), the reference and every policy's start.
3. prompts: the first 2-4 words (seeded) of SST-2 sentences, at most 7 tokens (so 6 prompt lengths, each
   decoding program compiled once): train.tsv's (at least 8 words) to make the preference data, dev.tsv's and
   test.tsv's (at least 6 words) held out for the evaluation.
4. pairs: 4 reference samples per train prompt (temperature 1, ending at EOS), scored by the reward; the best
   and the worst (different texts) make a {"prompt", "chosen", "rejected"} record, the best alone a
   {"prompt", "response"} record; 5 % of the prompts are the runs' validation split. A response is the text of
   the sample's new ids (EOS dropped), which lm.data.pairs encodes back as BOS + prompt + response + EOS.
5. policies: DPO at each --betas (:dpo), and "preferred-FT" (:sft, SFT on the best samples), each evaluated at
   every checkpoint on the held-out prompts: one sample per prompt (temperature 1, the same seed at every
   checkpoint), its mean reward, and KL(pi || ref) estimated on those samples: the mean over samples of
   log pi(y|x) - log ref(y|x), summed over the response's tokens and its EOS (what lm.tasks.dpo.sampled_kl
   computes). The reference itself is the point (0, its mean reward over 16 samples per prompt).
6. best-of-N: the best (by the same reward, so an oracle) of the first N of the 16 reference samples of each
   held-out prompt; its KL is the analytic log N - (N - 1) / N (Stiennon et al. 2020; Beirami et al. 2024
   show it is an upper bound), not a sampled estimate.
7. verdicts, computed: the frontier of a method is the upper envelope of its points and the reference point
   (the best reward reached at KL <= k, linear between its corners); DPO's (all betas together) is compared
   with preferred-FT's at every KL of either's points where both are defined (margins beyond "noise", two
   standard errors of a difference of two points' mean rewards, counted apart), and with each best-of-N point.

Writes --json (every figure: settings, runtimes, the runs' own metrics, all points, the verdicts) and --figure
(reward against KL), by default benchmarks/figures/dpo_sentiment.{json,png}; with --quick (tiny runs on the
first 4,000 rows of train.tsv, a few prompts: about a minute; notebooks/preference_tuning.ipynb runs it) both go
into --out.
Prints Markdown tables. Fixed seeds: the same command gives the same figures (bit-identical on one machine).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "experiments" / "dpo_sentiment.py")
SST2 = ROOT.parent / "shared" / "data" / "sst2"
POSITIVE = "1"  # SST-2's label of a positive sentence
PAIR_SAMPLES, EVAL_REFERENCE_SAMPLES = 4, 16
PAIR_SEED, REFERENCE_SEED, POLICY_SEED, PROMPT_SEED = 1, 2, 3, 0
ROWS = 128  # rows decoded together: every decoding batch has this many (one compilation per prompt length)
SCORE_ROWS = 256  # rows scored together (the reward, the log-ratios)
MAX_PROMPT_TOKENS = 7  # prompts of 2-4 words and at most 7 tokens: 6 prompt lengths with BOS, 6 compilations

SCALES = {
    # classifier, LM, DPO/SFT steps; checkpoints evaluated per policy; train prompts (pairs), held-out prompts.
    "full": dict(reward_steps=1000, lm_steps=1500, policy_steps=300, checkpoints=6, train_prompts=2000,
                 eval_prompts=600, betas=(0.1, 0.5, 2.0), best_of=(4, 16), kl_prompts=64),
    "quick": dict(reward_steps=20, lm_steps=30, policy_steps=6, checkpoints=2, train_prompts=48, eval_prompts=16,
                  betas=(0.1,), best_of=(4, 16), kl_prompts=0),
}


# -- data ------------------------------------------------------------------------------------------
def read_sentences(split: str) -> list[str]:
  """The sentences of SST-2's split (train.tsv's column is "sentence", dev's and test's "content")."""
  with open(SST2 / f"{split}.tsv", newline="") as file:
    rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [(row.get("sentence") or row.get("content") or "").strip() for row in rows]


def make_prompts(sentences: Sequence[str], count: int, *, min_words: int, seed: int, tokens: Any) -> list[str]:
  """`count` distinct prompts: the first 2, 3 or 4 words (seeded) of sentences of at least `min_words` words,
  of at most MAX_PROMPT_TOKENS tokens (`tokens(text)`: how many)."""
  rng = random.Random(seed)
  order = list(range(len(sentences)))
  rng.shuffle(order)
  prompts, seen = [], set()
  for index in order:
    words = sentences[index].split()
    if len(words) < min_words:
      continue
    prompt = " ".join(words[:rng.choice((2, 3, 4))])
    if prompt not in seen and tokens(prompt) <= MAX_PROMPT_TOKENS:
      seen.add(prompt)
      prompts.append(prompt)
      if len(prompts) == count:
        break
  return prompts


def write_quick_sst2(folder: Path, rows: int = 4000) -> Path:
  """The first `rows` lines of SST-2's train.tsv and 200 of dev.tsv (--quick's data)."""
  folder.mkdir(parents=True, exist_ok=True)
  for split, count in (("train", rows), ("dev", 200)):
    lines = (SST2 / f"{split}.tsv").read_text().splitlines(keepends=True)
    (folder / f"{split}.tsv").write_text("".join(lines[:count + 1]))
  return folder


def write_jsonl(path: Path, records: Sequence[dict[str, str]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(record) + "\n" for record in records))


# -- models ----------------------------------------------------------------------------------------
class Judge:
  """The reward: p(positive) of texts under the trained classifier (its own tokenizer reads the text)."""

  def __init__(self, experiment: Any, params: Any):
    self.experiment, self.params = experiment, params
    self.positive = experiment.task.classes.index(POSITIVE)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    rewards = []
    with self.experiment.steps.context():
      for start in range(0, len(texts), SCORE_ROWS):
        chunk = list(texts[start:start + SCORE_ROWS])
        padded = chunk + ["."] * (SCORE_ROWS - len(chunk))  # one batch shape: one compilation
        for label, probability in self.experiment.task.classify_texts(self.params, padded)[:len(chunk)]:
          positive = label == self.experiment.task.classes[self.positive]
          rewards.append(probability if positive else 1.0 - probability)
    return np.asarray(rewards, np.float64)


class Sampler:
  """Samples continuations of prompts from a policy, and the log-ratio to the reference of given samples."""

  def __init__(self, experiment: Any, reference: Any):
    from lm.data import pairs  # pylint: disable=g-import-not-at-top
    self.experiment, self.reference = experiment, reference
    self.model, self.tokenizer = experiment.task.model, experiment.tokenizer
    self.encoder = pairs.SequenceEncoder(self.tokenizer, int(experiment.config.seq_len), sentences=True)
    self.vocab = self.encoder.vocab

  def prompt_ids(self, prompts: Sequence[str]) -> list[np.ndarray]:
    return [self.encoder.prompt_ids(prompt, f"prompt {index}") for index, prompt in enumerate(prompts)]

  def sample(self, params: Any, prompt_ids: Sequence[np.ndarray], count: int, seed: int) -> list[list[np.ndarray]]:
    """`count` continuations per prompt (new ids, with the EOS they stopped at), temperature 1.

    `decode_batched` decodes the prompts of one length in batches of min(rows, ROWS) rows; a length with
    fewer than ROWS rows is given copies of its first prompt (their samples dropped), so that every batch
    has ROWS rows and each prompt length compiles once for the whole study.
    """
    from lm.inference import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
    padded = list(prompt_ids)
    for length in sorted({len(ids) for ids in prompt_ids}):
      members = [ids for ids in prompt_ids if len(ids) == length]
      padded += [members[0]] * max(0, -(-ROWS // count) - len(members))
    with self.experiment.steps.context():
      outs = prompts_lib.decode_batched(self.model, params, padded, count=count, rows_per_batch=ROWS,
                                        max_new_tokens=self.encoder.seq_len, temperature=1.0,
                                        stop_tokens=(self.vocab.eos,), pad_id=self.vocab.pad, seed=seed)
    return [[np.asarray(out.tokens, np.int32) for out in row] for row in outs[:len(prompt_ids)]]

  def response_text(self, new: np.ndarray) -> str:
    """The text of a sample's new ids (cut at EOS, specials dropped): what a preference record holds."""
    return self.vocab.decode(self.tokenizer, new)

  def sentence(self, prompt: str, new: np.ndarray) -> str:
    """What the reward reads: the prompt, a space and the response's text (the sentence a record stands for)."""
    response = self.response_text(new)
    return f"{prompt} {response}" if response.strip() else prompt

  def round_trips(self, new: np.ndarray) -> bool:
    """Whether the response's text encodes back to the sampled ids (EOS aside), as lm.data.pairs will encode it."""
    ids = self.vocab.sentence_ids(new)
    return np.array_equal(np.asarray(self.tokenizer.encode(self.response_text(new))).reshape(-1), ids)

  def log_ratios(self, policy: Any, prompt_ids: Sequence[np.ndarray], news: Sequence[np.ndarray]) -> np.ndarray:
    """log pi(y|x) - log ref(y|x) of each (prompt, sampled ids): the response's tokens and its EOS."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from lm.data import pairs  # pylint: disable=g-import-not-at-top
    rows = [self.encoder.encode_ids(ids, new) for ids, new in zip(prompt_ids, news)]
    out = []
    with self.experiment.steps.context():
      for start in range(0, len(rows), SCORE_ROWS):
        chunk = rows[start:start + SCORE_ROWS]
        chunk = chunk + [self.encoder.empty()] * (SCORE_ROWS - len(chunk))
        batch = {key: jnp.asarray(np.stack([row[key] for row in chunk])) for key in pairs.SEQUENCE_KEYS}
        out.append(np.asarray(_log_ratio(self.model, policy, self.reference, batch))[:len(rows) - start])
    return np.concatenate(out).astype(np.float64)


@functools.lru_cache(maxsize=None)
def _jitted_log_ratio():
  import jax  # pylint: disable=g-import-not-at-top
  from lm.models.preference import sequence_logprobs  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnums=0)
  def log_ratio(model, policy, reference, batch):
    return (sequence_logprobs(model, policy, batch["inputs"], batch["targets"], batch["mask"])
            - sequence_logprobs(model, reference, batch["inputs"], batch["targets"], batch["mask"]))

  return log_ratio


def _log_ratio(model, policy, reference, batch):
  return _jitted_log_ratio()(model, policy, reference, batch)


# -- runs ------------------------------------------------------------------------------------------
def train_run(variant: str, workdir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
  """Trains experiments/dpo_sentiment.py:variant in workdir (a finished run is reused); its timing and metrics."""
  from lm.app.train import train  # pylint: disable=g-import-not-at-top
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  from lm.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  config = load_config(f"{EXPERIMENT}:{variant}", overrides)
  reused = checkpoint_lib.has_checkpoint(str(workdir)) and checkpoint_lib.latest_step(str(workdir)) == config.steps
  started = time.perf_counter()
  train(config, str(workdir))
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  step_times = [m["perf/step_time_ms"] for m in metrics if "perf/step_time_ms" in m]
  return {"config": config, "seconds": round(time.perf_counter() - started, 1), "reused": reused,
          "steps": int(config.steps), "median_step_ms": round(float(np.median(step_times)), 1) if step_times else None,
          "metrics": metrics}


def load(variant: str, workdir: Path, overrides: dict[str, Any]) -> tuple[Any, Any]:
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  from lm.experiment import load_trained  # pylint: disable=g-import-not-at-top
  experiment, params, _ = load_trained(load_config(f"{EXPERIMENT}:{variant}", overrides), str(workdir), "eval")
  return experiment, params


def checkpoint_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(path.name) for path in folder.iterdir() if path.name.isdigit())


def restore_policy(workdir: Path, abstract: Any, step: int, dpo: bool) -> Any:
  """The language model of a run's checkpoint: an SFT run's params, a DPO run's "policy" part (read alone)."""
  from lm.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  if dpo:
    restored, _ = checkpoint_lib.restore_params(str(workdir), {"policy": abstract}, step=step)
    return restored["policy"]
  return checkpoint_lib.restore_params(str(workdir), abstract, step=step)[0]


# -- the reward-KL plane ---------------------------------------------------------------------------
def mean_stderr(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  """The upper envelope of (KL, reward) points: its corners (the points that no point of no larger KL beats in
  reward), by KL, and a last corner at the largest KL of all, flat: the best reward reached at KL <= k."""
  corners, best = [], -math.inf
  for kl, reward in sorted(points, key=lambda point: (point[0], -point[1])):
    if reward > best:
      corners.append((kl, reward))
      best = reward
  reach = max(kl for kl, _ in points)
  if corners and reach > corners[-1][0]:
    corners.append((reach, corners[-1][1]))
  return corners


def frontier_at(corners: Sequence[tuple[float, float]], kl: float) -> float | None:
  """The envelope's reward at `kl` (linear between corners); None outside the KLs its points span."""
  if not corners or kl < corners[0][0] - 1e-12 or kl > corners[-1][0] + 1e-12:
    return None
  for (k0, r0), (k1, r1) in zip(corners, corners[1:]):
    if k0 <= kl <= k1:
      return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(r0, r1)
  return corners[-1][1]


def kl_to_reach(corners: Sequence[tuple[float, float]], reward: float) -> float | None:
  """The smallest KL at which the envelope reaches `reward` (linear between corners); None if it never does."""
  for (k0, r0), (k1, r1) in zip(corners, corners[1:]):
    if r0 >= reward:
      return k0
    if r1 >= reward:
      return k0 + (k1 - k0) * (reward - r0) / (r1 - r0)
  return corners[-1][0] if corners and corners[-1][1] >= reward else None


Points = Sequence[tuple[float, float]]  # (KL, mean reward)


def compare_frontiers(a: Points, b: Points, reference: tuple[float, float], noise: float) -> dict[str, Any]:
  """A's envelope against B's (each with the reference point) at every KL > 0 of either's points where both are
  defined; how many of B's points some point of A dominates (no larger KL, higher reward); and at how many KLs
  the margin is beyond `noise` (two standard errors of a difference of two points' mean rewards) either way."""
  front_a, front_b = frontier([reference, *a]), frontier([reference, *b])
  rows = []
  for kl in sorted({kl for kl, _ in [*a, *b] if kl > 0}):
    ra, rb = frontier_at(front_a, kl), frontier_at(front_b, kl)
    if ra is not None and rb is not None:
      rows.append({"kl": round(kl, 4), "a": round(ra, 4), "b": round(rb, 4), "a_minus_b": round(ra - rb, 4)})
  dominated = sum(any(ka <= kb and ra_ > rb_ for ka, ra_ in a) for kb, rb_ in b)
  return {"compared_at": rows, "a_higher_everywhere": bool(rows) and all(row["a_minus_b"] > 0 for row in rows),
          "overlap": [rows[0]["kl"], rows[-1]["kl"]] if rows else None, "b_points_dominated_by_an_a_point": dominated,
          "b_points": len(b), "noise": round(noise, 4),
          "a_higher_beyond_noise": sum(row["a_minus_b"] > noise for row in rows),
          "a_lower_beyond_noise": sum(row["a_minus_b"] < -noise for row in rows)}


def best_of_n_kl(n: int) -> float:
  return math.log(n) - (n - 1) / n


# -- the study -------------------------------------------------------------------------------------
def policy_points(name: str, run: dict[str, Any], workdir: Path, sampler: Sampler, judge: Judge,
                  eval_prompts: list[str], abstract: Any, dpo: bool) -> list[dict[str, Any]]:
  """One point per checkpoint: mean reward and sampled KL of one sample per held-out prompt."""
  task_metrics = {m["step"]: m for m in run["metrics"] if "eval/loss" in m}
  eval_ids = sampler.prompt_ids(eval_prompts)
  points = []
  for step in checkpoint_steps(workdir):
    policy = restore_policy(workdir, abstract, step, dpo)
    news = [row[0] for row in sampler.sample(policy, eval_ids, 1, POLICY_SEED)]
    rewards = judge([sampler.sentence(prompt, new) for prompt, new in zip(eval_prompts, news)])
    kls = sampler.log_ratios(policy, eval_ids, news)
    reward, reward_se = mean_stderr(rewards)
    kl, kl_se = mean_stderr(kls)
    point = {"method": name, "step": step, "kl": kl, "kl_stderr": kl_se, "reward": reward, "reward_stderr": reward_se,
             "mean_new_tokens": float(np.mean([len(sampler.vocab.sentence_ids(new)) for new in news])),
             "example": sampler.sentence(eval_prompts[0], news[0])}
    metrics = task_metrics.get(step, {})
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/kl"):
      if key in metrics:
        point["task_" + key.replace("/", "_")] = metrics[key]
    points.append(point)
  return points


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/dpo_sentiment", help="the runs and the preference data")
  parser.add_argument("--quick", action="store_true", help="tiny runs and few prompts (about a minute): a smoke test")
  parser.add_argument("--betas", type=float, nargs="+", help="DPO's betas (default: 0.1 0.5 2; --quick: 0.1)")
  parser.add_argument("--json", help="default: benchmarks/figures/dpo_sentiment.json (--quick: OUT/dpo_sentiment.json)")
  parser.add_argument("--figure", help="default: benchmarks/figures/dpo_sentiment.png (--quick: OUT/dpo_sentiment.png)")
  args = parser.parse_args(argv)
  os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
  started = time.perf_counter()
  load_start = os.getloadavg()
  scale = dict(SCALES["quick" if args.quick else "full"])
  if args.betas:
    scale["betas"] = tuple(args.betas)
  out = (ROOT / args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  figures_dir = out if args.quick else ROOT / "benchmarks" / "figures"
  json_path = Path(args.json) if args.json else figures_dir / "dpo_sentiment.json"
  figure_path = Path(args.figure) if args.figure else figures_dir / "dpo_sentiment.png"
  seconds: dict[str, float] = {}
  # --quick: the first rows of SST-2 (reading all 67k phrases through the data pipeline takes half a minute).
  data = {"data.source": str(write_quick_sst2(out / "sst2_quick")), "data.tokenizer_vocab_size": 1000,
          "eval_batches": 2} if args.quick else {}

  def lap(name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - since, 1)
    print(f"[{time.perf_counter() - started:7.1f} s] {name}: {seconds[name]:.1f} s", flush=True)
    return now

  # 1-2. the reward and the reference.
  t = time.perf_counter()
  reward_overrides = {"steps": scale["reward_steps"], **data}
  if args.quick:
    reward_overrides.update({"eval_every": scale["reward_steps"], "checkpoint_every": scale["reward_steps"],
                             "classifier.test_split": ""})
  reward_run = train_run("reward", out / "reward", reward_overrides)
  t = lap("train reward classifier", t)
  lm_overrides = {"steps": scale["lm_steps"], **data}
  if args.quick:
    lm_overrides.update(eval_every=scale["lm_steps"], checkpoint_every=scale["lm_steps"], log_every=10)
  lm_run = train_run("lm", out / "lm", lm_overrides)
  t = lap("train reference LM", t)
  judge = Judge(*load("reward", out / "reward", reward_overrides))
  lm_experiment, reference = load("lm", out / "lm", lm_overrides)
  sampler = Sampler(lm_experiment, reference)
  abstract = lm_experiment.abstract_state.params

  # 3. prompts.
  tokens = lambda text: len(sampler.tokenizer.encode(text))  # noqa: E731
  train_prompts = make_prompts(read_sentences("train"), scale["train_prompts"], min_words=8, seed=PROMPT_SEED,
                               tokens=tokens)
  eval_prompts = make_prompts(read_sentences("dev") + read_sentences("test"), scale["eval_prompts"], min_words=6,
                              seed=PROMPT_SEED + 1, tokens=tokens)
  eval_ids = sampler.prompt_ids(eval_prompts)

  # 4. preference pairs from reference samples.
  train_ids = sampler.prompt_ids(train_prompts)
  samples = sampler.sample(reference, train_ids, PAIR_SAMPLES, PAIR_SEED)
  t = lap("sample pairs", t)
  texts = [[sampler.response_text(new) for new in row] for row in samples]
  rewards = judge([sampler.sentence(prompt, new) for prompt, row in zip(train_prompts, samples)
                   for new in row]).reshape(len(train_prompts), PAIR_SAMPLES)
  t = lap("score pairs", t)
  preference, sft, dropped, chosen_rewards, rejected_rewards = [], [], 0, [], []
  for prompt, row_texts, row_rewards in zip(train_prompts, texts, rewards):
    usable = [i for i, text in enumerate(row_texts) if text.strip()]
    best = max(usable, key=lambda i: row_rewards[i], default=None)
    worst = min(usable, key=lambda i: row_rewards[i], default=None)
    if best is None or row_texts[best] == row_texts[worst] or row_rewards[best] <= row_rewards[worst]:
      dropped += 1
      continue
    preference.append({"prompt": prompt, "chosen": row_texts[best], "rejected": row_texts[worst]})
    sft.append({"prompt": prompt, "response": row_texts[best]})
    chosen_rewards.append(row_rewards[best])
    rejected_rewards.append(row_rewards[worst])
  held = max(2, len(preference) // 20)  # the validation split: the last 5 % of the (shuffled) prompts
  write_jsonl(out / "pairs" / "train.jsonl", preference[:-held])
  write_jsonl(out / "pairs" / "validation.jsonl", preference[-held:])
  write_jsonl(out / "sft" / "train.jsonl", sft[:-held])
  write_jsonl(out / "sft" / "validation.jsonl", sft[-held:])
  all_samples = [new for row in samples for new in row]
  pairs_summary = {
      "prompts": len(train_prompts), "pairs": len(preference), "train": len(preference) - held, "validation": held,
      "dropped": dropped, "samples_per_prompt": PAIR_SAMPLES,
      "chosen_reward": float(np.mean(chosen_rewards)), "rejected_reward": float(np.mean(rejected_rewards)),
      "sample_reward": float(rewards.mean()),
      "round_trip": float(np.mean([sampler.round_trips(new) for new in all_samples])),
      "ended_at_eos": float(np.mean([len(new) > 0 and new[-1] == sampler.vocab.eos for new in all_samples])),
      "example": preference[0] if preference else None}

  # 5. the reference on the held-out prompts: the KL-0 point, and best-of-N.
  reference_samples = sampler.sample(reference, eval_ids, EVAL_REFERENCE_SAMPLES, REFERENCE_SEED)
  reference_rewards = judge([sampler.sentence(prompt, new) for prompt, row in zip(eval_prompts, reference_samples)
                             for new in row]).reshape(len(eval_ids), EVAL_REFERENCE_SAMPLES)
  ref_reward, ref_se = mean_stderr(reference_rewards.mean(axis=1))
  self_kl = sampler.log_ratios(reference, eval_ids, [row[0] for row in reference_samples])
  reference_point = {"method": "reference", "step": 0, "kl": 0.0, "kl_stderr": 0.0, "reward": ref_reward,
                     "reward_stderr": ref_se, "samples_per_prompt": EVAL_REFERENCE_SAMPLES,
                     "mean_new_tokens": float(np.mean([len(sampler.vocab.sentence_ids(new))
                                                       for row in reference_samples for new in row])),
                     "self_kl_check": float(np.abs(self_kl).max())}
  best_of = []
  for n in scale["best_of"]:
    reward, se = mean_stderr(reference_rewards[:, :n].max(axis=1))
    best_of.append({"method": f"best-of-{n}", "n": n, "kl": best_of_n_kl(n), "kl_stderr": 0.0, "reward": reward,
                    "reward_stderr": se, "kl_kind": "analytic log N - (N-1)/N"})
  t = lap("reference and best-of-N", t)

  # 6. the policies.
  common = {"init_from": str(out / "lm"), "steps": scale["policy_steps"],
            "eval_every": scale["policy_steps"] // scale["checkpoints"],
            "checkpoint_every": scale["policy_steps"] // scale["checkpoints"],
            "keep_checkpoints": scale["checkpoints"] + 1, **({"eval_batches": 2} if args.quick else {})}
  runs, points = {}, [reference_point]
  for beta in scale["betas"]:
    name = f"DPO beta={beta:g}"
    workdir = out / f"dpo_{beta:g}"
    runs[name] = train_run("dpo", workdir, {**common, "data.source": str(out / "pairs"), "dpo.beta": beta,
                                            "dpo.kl_prompts": scale["kl_prompts"]})
    t = lap(f"train {name}", t)
    points += [dict(p, beta=beta) for p in policy_points(name, runs[name], workdir, sampler, judge, eval_prompts,
                                                         abstract, dpo=True)]
    t = lap(f"evaluate {name}", t)
  name = "preferred-FT"
  runs[name] = train_run("sft", out / "sft_run", {**common, "data.source": str(out / "sft")})
  t = lap(f"train {name}", t)
  points += policy_points(name, runs[name], out / "sft_run", sampler, judge, eval_prompts, abstract, dpo=False)
  t = lap(f"evaluate {name}", t)

  # 7. verdicts.
  xy = lambda rows: [(p["kl"], p["reward"]) for p in rows]  # noqa: E731
  dpo_points = [p for p in points if p["method"].startswith("DPO")]
  sft_points = [p for p in points if p["method"] == name]
  ref_xy = (0.0, ref_reward)
  noise = 2 * math.sqrt(2) * float(np.median([p["reward_stderr"] for p in dpo_points + sft_points]))
  versus_sft = compare_frontiers(xy(dpo_points), xy(sft_points), ref_xy, noise)
  dpo_front = frontier([ref_xy, *xy(dpo_points)])
  versus_best_of = []
  for point in best_of:
    at = frontier_at(dpo_front, point["kl"])
    dominating = [p for p in dpo_points if p["kl"] <= point["kl"] and p["reward"] > point["reward"]]
    match = kl_to_reach(dpo_front, point["reward"])
    versus_best_of.append({"n": point["n"], "kl": round(point["kl"], 4), "best_of_n_reward": round(point["reward"], 4),
                           "dpo_frontier_reward": None if at is None else round(at, 4),
                           "dpo_above": None if at is None else bool(at > point["reward"]),
                           "dpo_points_dominating": len(dominating),
                           "dpo_kl_to_match": None if match is None else round(match, 4)})
  verdicts = {
      "dpo_dominates_preferred_ft": versus_sft["a_higher_everywhere"],
      "dpo_vs_preferred_ft": versus_sft,
      "dpo_vs_best_of_n": versus_best_of,
      "dpo_frontier": [[round(kl, 4), round(r, 4)] for kl, r in dpo_front],
      "preferred_ft_frontier": [[round(kl, 4), round(r, 4)] for kl, r in frontier([ref_xy, *xy(sft_points)])],
  }
  verdicts["text"] = verdict_text(versus_sft, versus_best_of, dpo_points)

  total = round(time.perf_counter() - started, 1)
  result = {
      "study": "DPO controlled sentiment generation (Rafailov et al. 2023, §6.1, Figure 2 left)",
      "command": " ".join(["python benchmarks/dpo_sentiment.py", *(sys.argv[1:] if argv is None else argv)]),
      "quick": bool(args.quick), "settings": {**scale, "betas": list(scale["betas"]), "best_of": list(scale["best_of"]),
                                             "pair_samples": PAIR_SAMPLES,
                                             "reference_samples_per_eval_prompt": EVAL_REFERENCE_SAMPLES,
                                             "seeds": {"prompts": PROMPT_SEED, "pairs": PAIR_SEED,
                                                       "reference": REFERENCE_SEED, "policy": POLICY_SEED}},
      "machine": machine(), "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
      "runtime_s": {"total": total, **seconds},
      "reward_model": {**run_summary(reward_run), **final_metrics(reward_run, ("eval/accuracy", "final_eval/accuracy",
                                                                               "final_test/accuracy"))},
      "reference_lm": {**run_summary(lm_run), **final_metrics(lm_run, ("eval/loss", "eval/nll_per_sentence"))},
      "policies": {key: run_summary(run) for key, run in runs.items()},
      "pairs": pairs_summary,
      "prompts": {"train": len(train_prompts), "held_out": len(eval_prompts), "held_out_examples": eval_prompts[:5]},
      "points": points, "best_of_n": best_of, "verdicts": verdicts,
  }
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(result, indent=1, default=float) + "\n")
  draw(figure_path, points, best_of, result)
  print_tables(result)
  print(f"\nwrote {json_path} and {figure_path}; {total:.0f} s in all")
  return result


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
  return {key: run[key] for key in ("steps", "seconds", "median_step_ms", "reused")}


def final_metrics(run: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
  found = {}
  for metrics in run["metrics"]:
    for key in keys:
      if key in metrics:
        found[key] = metrics[key]  # the last value written
  return found


def machine() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  return {"cpu": cpu, "cores": os.cpu_count(), "devices": str(jax.devices()),
          "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                       "numpy": np.__version__}}


def verdict_text(versus_sft: dict[str, Any], versus_best_of: list[dict[str, Any]], dpo_points: list[dict]) -> list[str]:
  lines = []
  if versus_sft["compared_at"]:
    worst = min(versus_sft["compared_at"], key=lambda row: row["a_minus_b"])
    lines.append(
        f"DPO vs preferred-FT: DPO's frontier is {'above' if versus_sft['a_higher_everywhere'] else 'NOT above'} "
        f"preferred-FT's at every compared KL ({len(versus_sft['compared_at'])} KLs in "
        f"[{versus_sft['overlap'][0]:.3f}, {versus_sft['overlap'][1]:.3f}] nats; smallest margin "
        f"{worst['a_minus_b']:+.3f} at KL {worst['kl']:.3f}); beyond noise (+-{versus_sft['noise']:.3f}, two "
        f"standard errors of a difference) DPO is higher at {versus_sft['a_higher_beyond_noise']} and lower at "
        f"{versus_sft['a_lower_beyond_noise']} of them; {versus_sft['b_points_dominated_by_an_a_point']} of "
        f"{versus_sft['b_points']} preferred-FT points are dominated by a DPO point.")
  else:
    lines.append("DPO vs preferred-FT: no KL where both frontiers are defined.")
  for row in versus_best_of:
    if row["dpo_frontier_reward"] is None:
      reach = max((p["kl"] for p in dpo_points), default=0.0)
      lines.append(f"best-of-{row['n']} (KL {row['kl']:.3f}, reward {row['best_of_n_reward']:.3f}): DPO's points "
                   f"reach KL {reach:.3f} only; {row['dpo_points_dominating']} DPO points have a higher reward at a "
                   "lower KL.")
    else:
      lines.append(f"best-of-{row['n']} (KL {row['kl']:.3f}, reward {row['best_of_n_reward']:.3f}): DPO's frontier "
                   f"there {row['dpo_frontier_reward']:.3f}, {'above' if row['dpo_above'] else 'below'} it; "
                   f"{row['dpo_points_dominating']} DPO points have a higher reward at a lower KL.")
    lines[-1] += (" DPO never reaches that reward." if row["dpo_kl_to_match"] is None else
                  f" DPO's frontier reaches that reward at KL {row['dpo_kl_to_match']:.3f}.")
  return lines


def print_tables(result: dict[str, Any]) -> None:
  print(f"\nmachine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"load average {result['load_average']['start'][0]:.2f} -> {result['load_average']['end'][0]:.2f}")
  print("\n| policy | step | KL(pi‖ref) nats | mean reward p(positive) | new tokens |")
  print("|---|---|---|---|---|")
  for p in result["points"] + result["best_of_n"]:
    kl = (f"{p['kl']:.3f} (analytic)" if p["method"].startswith("best-of") else
          f"{p['kl']:.3f} ± {p['kl_stderr']:.3f}")
    print(f"| {p['method']} | {p.get('step', '')} | {kl} | {p['reward']:.3f} ± {p['reward_stderr']:.3f} | "
          f"{p.get('mean_new_tokens', float('nan')):.1f} |")
  pairs = result["pairs"]
  print(f"\npairs: {pairs['pairs']} of {pairs['prompts']} prompts ({pairs['dropped']} dropped), chosen reward "
        f"{pairs['chosen_reward']:.3f}, rejected {pairs['rejected_reward']:.3f}, "
        f"all samples {pairs['sample_reward']:.3f}")
  print("\n" + "\n".join(result["verdicts"]["text"]))


def draw(path: Path, points: list[dict], best_of: list[dict], result: dict[str, Any]) -> None:
  """Reward against KL: every run's checkpoints as a path from the reference, best-of-N, DPO's frontier; the
  right panel is the low-KL corner (where preferred-FT and best-of-N are) enlarged."""
  from lm.core import files  # pylint: disable=g-import-not-at-top
  figure = files.new_figure((13.0, 5.2), 110)
  reference = points[0]
  methods = list(dict.fromkeys(p["method"] for p in points[1:]))
  colors = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b"]
  zoom = 1.25 * max([b["kl"] for b in best_of] + [p["kl"] for p in points if p["method"] == "preferred-FT"])
  for panel in (1, 2):
    axes = figure.add_subplot(1, 2, panel)
    for index, method in enumerate(methods):
      rows = [reference] + sorted((p for p in points if p["method"] == method), key=lambda p: p["step"])
      color = "#d62728" if method == "preferred-FT" else colors[index % len(colors)]
      axes.errorbar([p["kl"] for p in rows], [p["reward"] for p in rows], xerr=[p["kl_stderr"] for p in rows],
                    yerr=[p["reward_stderr"] for p in rows], marker="o" if method != "preferred-FT" else "s",
                    markersize=4, linewidth=1, elinewidth=0.5, capsize=0, color=color,
                    label=f"{method} (steps {', '.join(str(p['step']) for p in rows[1:])})")
    for point in best_of:
      axes.errorbar([point["kl"]], [point["reward"]], yerr=[point["reward_stderr"]], marker="*", markersize=11,
                    linestyle="none", color="#ff7f0e", elinewidth=0.5)
      axes.annotate(f"best-of-{point['n']}", (point["kl"], point["reward"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    axes.plot([0], [reference["reward"]], marker="o", color="black", linestyle="none", label="reference (KL 0)")
    front = result["verdicts"]["dpo_frontier"]
    axes.plot([kl for kl, _ in front], [r for _, r in front], color="#1f77b4", alpha=0.25, linewidth=6,
              label="DPO frontier (all betas)")
    axes.set_xlabel("KL(pi || ref), nats per sequence (sampled; best-of-N: log N - (N-1)/N)")
    axes.grid(alpha=0.3)
    if panel == 1:
      axes.set_ylabel("mean reward: p(positive) of the SST-2 classifier")
      held = result["prompts"]["held_out"]
      axes.set_title(f"Controlled sentiment: {held} held-out SST-2 prompts, 1 sample each"
                     + (" (--quick)" if result["quick"] else ""), fontsize=10)
      axes.legend(fontsize=7, loc="lower right")
    else:
      low = [p["reward"] - p["reward_stderr"] for p in points if p["kl"] <= zoom]
      high = [p["reward"] + p["reward_stderr"] for p in points + best_of if p["kl"] <= zoom]
      axes.set_xlim(-0.05 * zoom, zoom)
      axes.set_ylim(min(low) - 0.01, max(high) + 0.01)
      axes.set_title(f"the same, KL <= {zoom:.2f} nats", fontsize=10)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  files.save_png(figure, path)


if __name__ == "__main__":
  main()
