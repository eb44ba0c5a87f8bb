"""The `sample` part of the run config: what `--mode sample` decodes, and how.

Which of these a task can use (a VAE's kinds, a language model's prompts
file, beam search and stop strings) is the task's check (`lm.tasks.base`).
"""

from __future__ import annotations

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.models.quantize import check_choice

# continue: continue sample.prompt (a language model); with a VAE: prior (z ~ N(0, I)), reconstruct
# (sample.prompt), interpolate (from sample.prompt to sample.prompt_b in sample.interpolation_steps points).
SAMPLE_KINDS = ("continue", "prior", "reconstruct", "interpolate")

FIELDS = {
    "sample.kind": "continue",
    "sample.prompt": "\n",
    "sample.prompt_b": "",
    "sample.interpolation_steps": 5,
    "sample.max_tokens": 256,
    "sample.temperature": 0.8,
    "sample.top_k": 0,  # 0: off
    "sample.top_p": 1.0,  # 1.0: off
    "sample.num_samples": 1,
    "sample.seed": 0,
    "sample.beam_size": 1,  # > 1: beam search (deterministic; temperature/top-k/top-p unused)
    "sample.length_penalty": 0.6,  # beam search: GNMT's alpha (0: raw log-probability)
    "sample.stop": (),  # strings that end a sample (cut before them), e.g. ("\n\n",)
    "sample.prompts_file": "",  # one prompt per line (.txt) or per {"prompt": ...} line (.jsonl)
    "sample.quantize": "none",  # int8: decode with int8 matmul weights, per-channel scales (docs/quantization.md)
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  sample = config.sample
  require(sample.kind in SAMPLE_KINDS, f"config.sample.kind={sample.kind!r} is not one of {SAMPLE_KINDS}.")
  if mode == "sample" and sample.kind == "interpolate":
    require(bool(sample.prompt.strip()) and bool(sample.prompt_b.strip()), "config.sample.kind='interpolate' "
            "goes from config.sample.prompt to config.sample.prompt_b: set both to a sentence.")
  require(sample.interpolation_steps >= 2, "config.sample.interpolation_steps must be >= 2.")
  require(sample.temperature >= 0, "config.sample.temperature must be >= 0 (0 means greedy).")
  require(0 < sample.top_p <= 1, "config.sample.top_p must be in (0, 1].")
  require(sample.top_k >= 0 and sample.max_tokens > 0 and sample.num_samples > 0,
          "config.sample.top_k must be >= 0; max_tokens and num_samples must be > 0.")
  require(isinstance(sample.beam_size, int) and sample.beam_size >= 1,
          f"config.sample.beam_size={sample.beam_size!r} must be an integer >= 1 (1: sampling, > 1: beam search).")
  require(sample.beam_size == 1 or sample.num_samples <= sample.beam_size,
          f"config.sample.num_samples={sample.num_samples} best beams asked of beam_size={sample.beam_size}: "
          "beam search returns at most beam_size per prompt; raise beam_size or lower num_samples.")
  require(sample.length_penalty >= 0, f"config.sample.length_penalty={sample.length_penalty} must be >= 0 "
          "(GNMT's alpha: 0 ranks beams by log-probability, larger values favour longer outputs).")
  require(all(isinstance(stop, str) and stop for stop in sample.stop),
          f"config.sample.stop={tuple(sample.stop)!r} must be non-empty strings, e.g. "
          "--config.sample.stop='(\"\\n\\n\", \"THE END\")'.")
  check_choice("sample.quantize", sample.quantize)


CONFIG = ConfigPart("lm.inference", FIELDS, validate)
