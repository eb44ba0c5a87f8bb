"""`--mode sample`: text from a trained run's latest checkpoint, as config.sample says.

The task decodes (`Task.sample`): a language model continues prompts
(sampling, beam search, stop strings, a prompts file); a VAE decodes from its
latent space (prior, reconstruct, interpolate); a GAN writes from noise; a
classifier labels the prompt.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from lm.experiment import load_trained, quantize_trained
from lm.experiment.config import validate
from lm.inference import prompts as prompts_lib


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str, prompt: str | None = None) -> list[str]:
  """Text from the latest checkpoint, as config.sample says (kind, prompt, temperature, ...).

  continue: `config.sample.num_samples` continuations of the prompt, or of
  every prompt of `config.sample.prompts_file` (when `prompt` is not given),
  prompt by prompt; beam search with `sample.beam_size` > 1 (its num_samples
  best beams); each cut before the first of `sample.stop`. The texts are
  `lm.inference.prompts.Sample`s: strs with prompt_index, prompt, where (file
  and line) and score (see `lm.tasks.lm.LMTask.sample`). With a VAE (head="vae"): prior
  (sentences decoded from z ~ N(0, I)), reconstruct (the prompt through the
  encoder and back), interpolate (prompt -> prompt_b in `interpolation_steps`
  points of latent space). config.sample.quantize=int8 decodes with int8
  matmul weights (lm.models.quantize; the bytes are logged).
  """
  prompts = None
  if prompt is None and config.sample.prompts_file:
    validate(config, "sample")  # a bad config is named before the file is read
    prompts = prompts_lib.read_prompts_file(config.sample.prompts_file)
  experiment, params, _ = load_trained(config, workdir, "sample")
  experiment, params, _ = quantize_trained(experiment, params, config.sample.quantize, "sample.quantize")
  with experiment.steps.context():
    if prompts is not None:
      return experiment.task.sample(params, config.sample, prompts=prompts)
    return experiment.task.sample(params, config.sample, prompt)


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode sample: each sample under a header naming its prompt (and beam score)."""
  for index, text in enumerate(sample_checkpoint(config, workdir)):
    about = []
    if config.sample.prompts_file and hasattr(text, "prompt_index"):
      about.append(f"prompt {text.prompt_index}, {text.where}")
    if getattr(text, "score", None) is not None:
      about.append(f"score {text.score:.4f}")
    report(f"--- sample {index}{' (' + '; '.join(about) + ')' if about else ''} ---\n{text}")
  return 0
