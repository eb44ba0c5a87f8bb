"""`config.head = "sft"`: supervised fine-tuning of a language model on prompt-response records.

Records `{"prompt": ..., "response": ...}` (`.jsonl`, or `.tsv` columns) of
data.source's train and eval splits (`lm.data.pairs`): each is one padded row
of the prompt's and the response's tokens, encoded as the language model was
trained (data.format: sentences add BOS and the response's EOS; windows add
nothing), and the loss is the mean cross-entropy of the response's tokens
only: the prompt is read, never learned. It starts from a language model
(`config.init_from`: a head="lm" run, another SFT run, or `hf:DIR`), whose
tokenizer it takes. Its parameters are a language model's, so everything that
uses one uses it: sampling, serving, export, the online loop (init_from).
Eval: the response tokens' loss, perplexity, and the mean NLL per response.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from lm.core.configs import require
from lm.data import pairs
from lm.data import sentences as sentences_lib
from lm.tasks.lm import LMTask


def validate_records_config(config: ml_collections.ConfigDict, head: str) -> None:
  """What a task on records cannot take: cleaning (it drops documents, not records) and sliding windows."""
  require(not config.data.clean_train, f"config.head={head!r} trains on records, which config.clean does not "
          "clean (it filters documents). Fix: --config.data.clean_train=False.")
  require(not config.data.mixture, f"config.head={head!r} reads one folder of records (data.source); "
          "config.data.mixture mixes token streams. Fix: unset data.mixture.")


class SFTTask(LMTask):
  """The language model, fine-tuned on responses to prompts (module doc)."""

  name = "sft"
  data_formats = ("sentences", "windows")
  init_from_tasks = ("lm", "sft", "dpo")
  requires_init_from = ("config.head='sft' fine-tunes a language model: set config.init_from to a head='lm' run "
                        "(or an sft run, or hf:DIR).")
  supports_online = sliding_eval = synthetic_data = supports_privacy = False  # those train or score token windows
  ab_comparable = True

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
    del mode
    validate_records_config(config, cls.name)

  @property
  def batch_ranks(self) -> dict[str, int]:
    return dict(pairs.SFT_BATCH_RANKS)

  @property
  def document_mask(self) -> bool:
    return False

  def examples(self, source: Any, *, train: bool, stride: int | None = None) -> Any:
    del stride
    examples = pairs.sft_examples(source, self.tokenizer, self.config.seq_len, sentences=self.sentences)
    return examples if train else sentences_lib.PaddedToBatches(examples, self.config.batch_size)
