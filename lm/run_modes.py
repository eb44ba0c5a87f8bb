"""What each `--mode` does, as functions a notebook can call.

  train  -> lm.train.loop.train
  eval   -> evaluate_checkpoint: loss, perplexity, bits per char/byte of the latest checkpoint
  sample -> sample_checkpoint: text from the latest checkpoint
  bench  -> lm.train.bench.benchmark: step time, tokens/s, MFU, compile time, memory
  crossval -> lm.train.crossval.crossval: K models on stratified folds, mean ± std
  ab     -> ab_test: two runs on the same examples, paired bootstrap (and McNemar)
  export -> export_checkpoint: the latest checkpoint as a Hugging Face GPT-2 / Llama folder (lm.interop)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from lm import config as config_lib
from lm import interop
from lm.core import files
from lm.stats import ab

from lm import prompts as prompts_lib
from lm import perplexity
from lm.online.store import is_online_checkpoint
from lm.train import checkpoint as checkpoint_lib
from lm.train.experiment import Experiment, build_experiment, open_eval_split, token_windows, tokenizer_identity
from lm.train.loop import evaluate_rows
from lm.train.experiment import saved_head
from lm.train.metrics import MetricWriter


def load_trained(config: ml_collections.ConfigDict, workdir: str, mode: str) -> tuple[Experiment, Any, int]:
  """Experiment + params of the latest checkpoint in `workdir` (an online run's current model).

  A workdir with no checkpoint whose config has `init_from=hf:DIR` serves the
  imported Hugging Face weights as they are (step 0).
  """
  hf_dir = interop.hf_directory(config.init_from)
  if not checkpoint_lib.has_checkpoint(workdir) and hf_dir is not None and config.head == "lm" and mode != "export":
    experiment, _ = build_experiment(config, workdir, mode)
    logging.info("%s has no checkpoint: --mode %s uses the weights of %s as imported.", workdir, mode,
                 config.init_from)
    params = interop.load_sharded_params(hf_dir, experiment.model_config, experiment.abstract_state.params)
    if mode == "eval":
      os.makedirs(workdir, exist_ok=True)  # eval appends its figures to WORKDIR/metrics.jsonl
    return experiment, params, 0
  if not checkpoint_lib.has_checkpoint(workdir):
    raise checkpoint_lib.CheckpointError(
        f"--mode {mode} needs a checkpoint, and {workdir!r} has none. Train first "
        f"(--mode train --workdir {workdir}) or point --workdir at a trained run.")
  experiment, _ = build_experiment(config, workdir, mode)
  if is_online_checkpoint(workdir):
    # An online run serves its promoted ("current") model, not the latest candidate.
    params, step = checkpoint_lib.restore_params(workdir, experiment.abstract_state.params, item_name="current")
    return experiment, params, step
  state, _, _, step = checkpoint_lib.restore(workdir, experiment.abstract_state, with_data=False)
  return experiment, state.params, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint on a split and appends the metrics to metrics.jsonl.

  The split: `split`, else config.eval.split of config.eval.source (empty:
  config.data.eval_split of config.data.source; `lm.perplexity.eval_split`
  gives the order). Reports loss, perplexity, bits per token, character and
  byte (head="lm") and the tokens scored; config.eval.stride > 0 scores a
  sliding window (`lm.perplexity`). Metrics are named "eval_<split>/..."
  (with eval.source: "eval_<source name>_<split>/...").
  """
  source, split, prefix = perplexity.eval_split(config, split)
  experiment, params, step = load_trained(config, workdir, "eval")
  # Opened as data.source would be (text and label fields, cache), whichever source it is.
  text = open_eval_split(config_lib.apply_overrides(config, {"data.source": source}), split)
  metrics = perplexity.evaluate_split(experiment, params, text, stride=config.eval.stride,
                                      num_batches=config.eval_batches)
  metrics = {key.replace("eval/", prefix, 1): value for key, value in metrics.items()}
  metrics.update(experiment.head.final_report(experiment, params))
  MetricWriter(workdir, tensorboard=False).write(step, metrics)
  return {"step": step, "source": source, "split": split, **metrics}


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str, prompt: str | None = None) -> list[str]:
  """Text from the latest checkpoint, as config.sample says (kind, prompt, temperature, ...).

  continue: `config.sample.num_samples` continuations of the prompt, or of
  every prompt of `config.sample.prompts_file` (when `prompt` is not given),
  prompt by prompt; beam search with `sample.beam_size` > 1 (its num_samples
  best beams); each cut before the first of `sample.stop`. The texts are
  `lm.prompts.Sample`s: strs with prompt_index, prompt, where (file and line)
  and score (see `lm.heads.Head.sample`). With a VAE (head="vae"): prior
  (sentences decoded from z ~ N(0, I)), reconstruct (the prompt through the
  encoder and back), interpolate (prompt -> prompt_b in `interpolation_steps`
  points of latent space).
  """
  prompts = None
  if prompt is None and config.sample.prompts_file:
    config_lib.validate(config, "sample")  # a bad config is named before the file is read
    prompts = prompts_lib.read_prompts_file(config.sample.prompts_file)
  experiment, params, _ = load_trained(config, workdir, "sample")
  with experiment.steps.context():
    if prompts is not None:
      return experiment.head.sample(params, config.sample, prompts=prompts)
    return experiment.head.sample(params, config.sample, prompt)


# -- --mode ab -----------------------------------------------------------------
AB_REPORT_FILE = "ab.json"


def _ab_run_config(config: ml_collections.ConfigDict, metadata: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
  """The run's own config (model, head, tokenizer) with this config's data and evaluation settings,
  so both runs of an A/B pair read the same examples."""
  run = config_lib.config_from_saved(metadata.get("config", {})).to_dict()
  ours = config_lib.to_json_dict(config)
  # What the model is (model, head, vae/gan/classifier groups, the data format and tokenizer) stays the run's;
  # what is evaluated, where and how is this config's.
  kept_data = {key: run["data"][key] for key in ("format", "tokenizer", "tokenizer_vocab_size", "tokenizer_model")}
  for key in ("data", "eval", "mesh", "distributed", "xla_cpu_options"):
    run[key] = ours[key]
  run["data"].update(kept_data)
  for key in ("seq_len", "batch_size", "eval_batches"):
    run[key] = ours[key]
  if metadata.get("classes"):
    run["classifier"]["labels"] = tuple(metadata["classes"])
  # The model keeps its own context length whatever seq_len this evaluation uses.
  run["model"]["max_len"] = metadata.get("model", {}).get("max_len") or run["model"]["max_len"]
  run.update(init_from="", warm_start="", resume=True)
  return config_lib.config_from_saved(run)


def ab_test(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates runs config.ab.a and config.ab.b on the same examples and compares them (lm.stats.ab).

  Language models: per-example loss (each sequence's or sentence's mean token
  loss), B - A with a paired-bootstrap interval and p-value, and the relative
  change the online gate uses. Classifiers: accuracy and macro-F1, B - A with
  intervals and p-values, and McNemar's test. Written to WORKDIR/ab.json and a
  metrics.jsonl row; both runs must share the tokenizer (and classes).
  """
  config_lib.validate(config, "ab")
  split = config.eval.split or config.data.eval_split
  runs = {}
  for name in ("a", "b"):
    directory = config.ab[name]
    if not checkpoint_lib.has_checkpoint(directory):
      raise checkpoint_lib.CheckpointError(
          f"config.ab.{name}={directory!r} holds no checkpoint. Point it at the workdir (or checkpoints folder) "
          "of a trained run.")
    metadata = checkpoint_lib.read_metadata(directory)
    run_config = _ab_run_config(config, metadata)
    experiment, params, step = load_trained(run_config, directory, "eval")
    runs[name] = (experiment, params, step, directory)
  (exp_a, _, step_a, dir_a), (exp_b, _, step_b, dir_b) = runs["a"], runs["b"]
  if exp_a.head.name != exp_b.head.name:
    raise config_lib.ConfigError(f"config.ab.a ({dir_a}) is a head={exp_a.head.name!r} run and config.ab.b ({dir_b}) "
                                 f"a head={exp_b.head.name!r} run; an A/B test compares two runs of one kind.")
  if tokenizer_identity(exp_a.tokenizer) != tokenizer_identity(exp_b.tokenizer):
    raise config_lib.ConfigError(
        f"The runs have different tokenizers ({dir_a}/tokenizer: {exp_a.tokenizer!r}; {dir_b}/tokenizer: "
        f"{exp_b.tokenizer!r}), so their examples and losses do not pair. Compare runs trained with the same "
        "tokenizer (start B with config.init_from=A, or set data.tokenizer_model to one SentencePiece file).")
  if exp_a.config.data.format != exp_b.config.data.format:
    raise config_lib.ConfigError(f"config.ab.a ({dir_a}) was trained on data.format={exp_a.config.data.format!r} "
                                 f"and config.ab.b ({dir_b}) on {exp_b.config.data.format!r}; their examples differ.")
  if exp_a.head.name == "classifier" and exp_a.head.classes != exp_b.head.classes:
    raise config_lib.ConfigError(f"The classifiers have different classes ({exp_a.head.classes} in {dir_a}, "
                                 f"{exp_b.head.classes} in {dir_b}); they cannot be compared example by example.")
  # One tokenizer, one seq_len, the same classes: the examples are built once and fed to both runs.
  examples = token_windows(exp_a, open_eval_split(exp_a.config, split), config.seq_len)
  rows = {name: evaluate_rows(experiment, params, examples, config.eval_batches)
          for name, (experiment, params, _, _) in runs.items()}
  options = dict(confidence=float(config.ab.confidence), samples=int(config.ab.bootstrap_samples),
                 seed=int(config.ab.seed))
  if exp_a.head.name == "classifier":
    a, b = exp_a.head.per_example(rows["a"]), exp_b.head.per_example(rows["b"])
    comparison = ab.compare_classifiers(a["label"], a["prediction"], b["prediction"], len(exp_a.head.classes),
                                        **options)
    headline = {f"ab/{metric}/{key}": comparison[metric][key] for metric in ("accuracy", "macro_f1")
                for key in ("a", "b", "difference", "lower", "upper", "p_value")}
    headline["ab/mcnemar/p_value"] = comparison["mcnemar"]["p_value"]
  else:
    losses = {}
    for name, gathered in rows.items():
      keep = gathered["rows/tokens"] > 0  # padding rows of sentence splits
      losses[name] = gathered["rows/loss_sum"][keep] / gathered["rows/tokens"][keep]
    comparison = ab.compare_language_models(losses["a"], losses["b"], **options)
    headline = {f"ab/loss/{key}": comparison[key] for key in ("a", "b", "difference", "lower", "upper", "p_value",
                                                              "relative_change")}
  report = {"a": {"run": dir_a, "step": step_a}, "b": {"run": dir_b, "step": step_b}, "head": exp_a.head.name,
            "source": config.data.source, "split": split, **comparison}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(os.path.join(workdir, AB_REPORT_FILE), json.dumps(report, indent=2).encode())
    MetricWriter(workdir, tensorboard=False).write(0, headline)
  return report


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes the latest checkpoint of a head="lm" run as a Hugging Face directory (`config.export.dir`).

  The model must have GPT-2's layout (learned positions, LayerNorm, GELU) or
  Llama's (RoPE, RMSNorm, SwiGLU, no biases); lm.interop.export names the field
  that is neither. Beside config.json and the .safetensors weights (shards of
  `config.export.max_shard_size` bytes when > 0): the run's tokenizer as
  tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece) when it is
  one, and always lm's own tokenizer folder `lm_tokenizer/` (char and byte
  tokenizers have no Hugging Face form; `init_from=hf:DIR` reads it back).

  Returns:
    {"step", "dir", "model_type", "parameters", "files"}.
  """
  out_dir = config.export.dir
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise interop.HFError(f"config.export.dir={out_dir!r} is not empty. Fix: export into a new or empty folder "
                          "(nothing is overwritten).")
  if not checkpoint_lib.has_checkpoint(workdir):
    raise checkpoint_lib.CheckpointError(
        f"--mode export writes a checkpoint, and {workdir!r} has none. Train first (--mode train --workdir "
        f"{workdir}) or point --workdir at a trained run.")
  written_by = saved_head(checkpoint_lib.read_metadata(workdir))
  if config.head != "lm" or written_by != "lm":
    raise config_lib.ConfigError(
        f"--mode export writes language models; {workdir} holds a head={written_by!r} run (config.head="
        f"{config.head!r}). Export a head='lm' run, with --config.head=lm.")
  experiment, params, step = load_trained(config, workdir, "export")
  model_config = experiment.model_config
  model_type = interop.export_layout(model_config)  # refuses a model of neither layout before gathering weights
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)
  written: list[str] = []
  if jax.process_index() == 0:
    written = interop.export(params, model_config, out_dir, config.export.max_shard_size,
                             eos_token_id=experiment.tokenizer.eos_id)
    written += interop.write_tokenizer(experiment.tokenizer, out_dir)
  return {"step": step, "dir": out_dir, "model_type": model_type,
          "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(params))), "files": written}
