"""`config.head = "denoise"`: a language model on sentences whose inputs are corrupted, its targets clean.

Each sentence token of the decoder's input is replaced by <mask> with
probability `denoise.rate` (drawn per row), and the model predicts the clean
next token: the sentence VAE's word dropout (Bowman et al. 2016) without the
latent. It is the control that tells how much of a VAE's loss with
`vae.word_dropout > 0` is the dropout's own. Evaluation, sampling and A/B
tests are the plain language model's, on clean inputs, so `eval/loss`
compares with head="lm" on the same sentences.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.models.vae_objectives import word_dropout
from lm.tasks.lm import LMTask, make_loss_fn
from lm.train import step as step_lib

CORRUPTION_STREAM = 0  # the per-row rng stream of the corruption (StepContext.row_keys)


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  del mode
  rate = config.denoise.rate
  require(0 <= rate < 1, f"config.denoise.rate={rate} must be in [0, 1) (Bowman et al. 2016 use 0.25 to 0.5).")


class DenoiseTask(LMTask):
  """The language model, trained on corrupted inputs (module doc)."""

  name = "denoise"
  CONFIG = ConfigPart("lm.tasks.denoise", {"denoise.rate": 0.25}, validate)  # of input tokens replaced by <mask>
  data_formats = ("sentences",)
  init_from_tasks = ("lm", "denoise")
  supports_online = sliding_eval = synthetic_data = supports_privacy = False  # those train or score token windows

  def updates(self) -> Sequence[step_lib.Update]:
    clean_loss, rate, mask = make_loss_fn(self.model), float(self.config.denoise.rate), self.vocab.mask

    def loss_fn(params, batch, ctx):
      inputs = word_dropout(ctx.row_keys(CORRUPTION_STREAM), batch["inputs"], rate, unk_id=mask)  # BOS is kept
      return clean_loss(params, dict(batch, inputs=inputs), ctx)

    return (step_lib.Update(loss_fn),)
