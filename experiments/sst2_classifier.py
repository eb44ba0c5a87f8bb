"""Sentiment classification on SST-2 (binary), a small Transformer trained from scratch on CPU.

Data: `../shared/data/sst2/` (GLUE's SST-2: train.tsv 67,349 labeled phrases and
sentences, dev.tsv 872 sentences, test.tsv 1,821 sentences; columns label, sentence).
train -> dev for model selection (the checkpoint with the best dev accuracy) ->
test, evaluated once after training with those weights. A SentencePiece vocabulary
trained on the training split; BOS + tokens + EOS, at most 64 positions.

Model: 2 layers, 4 heads, width 128 (1.43M parameters, 1.02M of them the embedding table),
bidirectional attention, max-pooled final hidden states -> linear layer; dropout 0.1, label
smoothing 0.1. AdamW 1e-3, 200 warm-up steps, cosine decay over 3,000 steps of batch 64
(2.9 passes over the phrases); eval on every dev sentence every 200 steps.

Expected result (2-core CPU, BENCHMARKS.md "SST-2 classifier"): best dev accuracy 0.806 (step 1,000),
test accuracy 0.808 with those weights, macro-F1 0.806 / 0.808; 5 min 41 s of training
(about 100 ms per step). The issue's target, dev accuracy >= 0.82 within 15 minutes of CPU
training, is NOT met: every variant tried (causal or bidirectional attention, mean or max
pooling, dropout 0.3, token dropout 0.2, width 256, SST-2 LM pre-training then fine-tuning)
peaked between 0.797 and 0.813.

Command:
  python -m lm.main --config experiments/sst2_classifier.py --workdir runs/sst2_classifier
  python -m lm.main --config experiments/sst2_classifier.py --workdir runs/sst2_classifier --mode sample \
      --config.sample.prompt="a gorgeous , witty , seductive movie ."
  python -m lm.main --config experiments/sst2_classifier.py --workdir runs/sst2_cv --mode crossval \
      --config.eval.folds=5 --config.steps=1000
"""

import os

from lm.config import base_config

SST2 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2"))


VARIANTS = ("scratch", "lm", "finetune")


def get_config(variant: str = "scratch"):
  if variant not in VARIANTS:
    raise ValueError(f"experiments/sst2_classifier.py:{variant}: the variant must be one of {VARIANTS}.")
  config = base_config()
  config.head = "lm" if variant == "lm" else "classifier"
  config.steps = 3000
  config.batch_size = 64
  config.seq_len = 64
  config.log_every = 100
  config.eval_every = 200
  config.checkpoint_every = 1000
  config.eval_batches = 0  # every dev sentence

  config.model.variant = "gpt2"
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.width = 128
  config.model.dropout = 0.1

  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-5
  config.optim.warmup_steps = 200
  config.optim.weight_decay = 0.1

  config.data.source = SST2
  config.data.format = "sentences"
  config.data.train_split = "train"
  config.data.eval_split = "validation"  # dev.tsv
  config.data.label_field = "label"
  config.data.tokenizer = "sentencepiece"
  config.data.tokenizer_vocab_size = 8000

  config.classifier.pooling = "max"
  config.classifier.attention = "bidirectional"  # from scratch, every token reads the whole sentence
  config.classifier.label_smoothing = 0.1
  config.classifier.test_split = "test"
  config.sample.prompt = "a gorgeous , witty , seductive movie ."
  if variant == "lm":  # next-token prediction on the training sentences (their labels unused)
    config.model.dropout = 0.1
  if variant == "finetune":
    config.init_from = "runs/sst2_lm"
  return config
