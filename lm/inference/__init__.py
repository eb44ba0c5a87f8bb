"""Decoding: functions of (model, params, tokenizer), not of a run.

  sample   the KV-cache decoder: greedy, temperature, top-k, top-p, stop tokens, beam search, the no-cache
           baseline and the decode benchmark
  prompts  --mode sample's prompts: prompts files, stop strings, many prompts batched by token length
  config   the `sample` part of the run config
"""
