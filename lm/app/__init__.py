"""L5: one module per `--mode`, each a function a notebook calls and a `run(config, workdir, report)` the CLI calls.

  train     train(config, workdir): build, start (resume / warm-start / init-from), fit with hooks, report
  prepare   prepare_data: the run's corpora tokenized once into token caches (Apache Beam)
  online    run_online(config, workdir): keep training on streamed chunks, gate, promote (lm.online)
  eval      evaluate_checkpoint: a trained run on any split (sliding windows, bits per byte, the task's report)
  sample    sample_checkpoint: text from a trained run
  serve     start_server: the current model behind an OpenAI-compatible API, hot-swapping, learning from feedback
  bench     benchmark / compile_memory: step time, tokens/s, MFU, memory per device, decoding
  crossval  crossval: K models on stratified folds, mean ± std
  ab        ab_test: two runs on the same examples, paired bootstrap (and McNemar)
  export    export_checkpoint: a trained LM as a Hugging Face GPT-2 / Llama folder
  reports   what a task's after-training report is handed (lm.tasks.base.ReportContext)
  lock      run_lock: the workdir lock of train / online / crossval, taken once per multi-process job

`lm.main` maps `--mode NAME` to `lm.app.NAME.run`.
"""
