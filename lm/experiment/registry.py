"""The task registry: the one place that maps `config.head` to a task.

A new task is a module in `lm/tasks/` (a `lm.tasks.base.Task` subclass with
its config group), one line in `TASKS`, and an experiment config.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.data import sources
from lm.data.tokenizers import Tokenizer
from lm.models.config import TransformerConfig
from lm.tasks.base import Task
from lm.tasks.classifier import ClassifierTask
from lm.tasks.denoise import DenoiseTask
from lm.tasks.distill import DistillTask
from lm.tasks.dpo import DPOTask
from lm.tasks.gan import GANTask
from lm.tasks.lm import LMTask
from lm.tasks.sft import SFTTask
from lm.tasks.vae import VAETask

TASKS: dict[str, type[Task]] = {
    "lm": LMTask,
    "vae": VAETask,
    "gan": GANTask,
    "classifier": ClassifierTask,
    "denoise": DenoiseTask,
    "sft": SFTTask,
    "dpo": DPOTask,
    "distill": DistillTask,
}


def task_class(name: str) -> type[Task]:
  """The task `config.head` names; ConfigError listing the names otherwise."""
  require(name in TASKS, f"config.head={name!r} is not one of {tuple(TASKS)}: 'lm' trains the language model, "
          "'vae' a sentence VAE (config.vae), 'gan' a text GAN (config.gan), 'classifier' a sequence classifier "
          "(config.classifier), 'denoise' a language model on corrupted inputs (config.denoise), 'sft' a language model "
          "fine-tuned on prompt-response records, 'dpo' one tuned on preference records (config.dpo), 'distill' a "
          "student trained on a teacher's soft targets (config.distill).")
  return TASKS[name]


def make_task(config: ml_collections.ConfigDict, model_config: TransformerConfig, tokenizer: Tokenizer, *,
              train_split: Callable[[], sources.TextSource] | None = None) -> Task:
  """The task of `config.head`, built for this model and tokenizer."""
  return task_class(config.head)(config, model_config, tokenizer, train_split=train_split)


def tasks_with(capability: str) -> tuple[str, ...]:
  """The names of the tasks whose class has `capability` (a `Task` attribute) set."""
  return tuple(name for name, cls in TASKS.items() if getattr(cls, capability))


def _heads(names: tuple[str, ...]) -> str:
  return f"config.head={names[0]!r}" if len(names) == 1 else f"config.head in {names}"


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """What the config asks of the task `config.head` names, checked against the task's capabilities
  (`lm.tasks.base.Task`); the message names the tasks that can do it. Then the task's own checks."""
  cls = task_class(config.head)
  data, sample = config.data, config.sample
  require(data.format in cls.data_formats, f"config.head={cls.name!r} trains on data.format in {cls.data_formats}, "
          f"not {data.format!r}: set --config.data.format={cls.data_formats[0]} (sentences: one record per "
          "sentence, e.g. the sentence column of a .tsv).")
  if data.source == "synthetic":
    require(cls.synthetic_data, "config.data.source='synthetic' is random token ids for a language model's "
            f"throughput: it needs {_heads(tasks_with('synthetic_data'))} (this is config.head={cls.name!r}).")
  if mode == "online":
    require(cls.supports_online and data.format == "windows", "--mode online trains a language model on token "
            f"windows: it needs {_heads(tasks_with('supports_online'))} and data.format='windows' (this is "
            f"config.head={cls.name!r}, data.format={data.format!r}).")
  if mode == "serve":
    require(cls.continues_prompts and data.format == "windows", "--mode serve continues prompts with a language "
            f"model trained on token windows: it needs {_heads(tasks_with('continues_prompts'))} and "
            f"data.format='windows' (this is config.head={cls.name!r}, data.format={data.format!r}). Fix: serve "
            "the run of a language model, e.g. experiments/shakespeare_char.py.")
  if mode == "sample":
    kind_tasks = tuple(name for name, other in TASKS.items() if sample.kind in other.sample_kinds)
    require(sample.kind in cls.sample_kinds, f"config.sample.kind={sample.kind!r} is not what config.head="
            f"{cls.name!r} samples ({', '.join(cls.sample_kinds)}); it needs {_heads(kind_tasks)} (prior, reconstruct "
            "and interpolate decode from a VAE's latent space, continue continues a prompt).")
    if sample.prompts_file or sample.beam_size > 1 or sample.stop:
      require(cls.continues_prompts, "config.sample.prompts_file, beam_size > 1 and stop continue prompts with a "
              f"language model ({_heads(tasks_with('continues_prompts'))}, sample.kind='continue'); this is "
              f"config.head={cls.name!r}, kind={sample.kind!r}. Unset them.")
  for field, quantize_mode in (("eval.quantize", "eval"), ("sample.quantize", "sample")):
    group, name = field.split(".")
    if mode == quantize_mode and config[group][name] != "none":
      require(cls.language_model, f"config.{field}={config[group][name]!r} quantizes a Transformer language "
              f"model's projections: it needs {_heads(tasks_with('language_model'))} (this is config.head="
              f"{cls.name!r}). Fix: set --config.{field}=none.")
  if config.eval.stride:
    require(cls.sliding_eval and data.format == "windows", f"config.eval.stride={config.eval.stride} slides a window "
            f"over a token stream: it needs {_heads(tasks_with('sliding_eval'))} and data.format='windows' (this is "
            f"config.head={cls.name!r}, data.format={data.format!r}); set eval.stride=0.")
  cls.validate_config(config, mode)


# What is trained on the Transformer: lm | vae | gan | classifier | denoise | sft | dpo | distill (TASKS); each task's
# own group (config.vae, config.gan, config.classifier, config.denoise, config.dpo, config.distill) comes with it.
CONFIG = ConfigPart("lm.experiment.registry", {"head": "lm"}, validate)
TASK_CONFIGS: tuple[ConfigPart, ...] = tuple(cls.CONFIG for cls in TASKS.values() if cls.CONFIG is not None)


def saved_task(metadata: dict[str, Any]) -> str:
  """The task a checkpoint was written by (checkpoints from before tasks existed are language models)."""
  return metadata.get("head") or metadata.get("config", {}).get("head") or "lm"
