"""L3: the pieces of continual learning that `--mode online` (`lm.app.online`) puts together.

  config       the `online` part of the run config
  step         the online loss (L2-init, EWC, distillation) on the engine's step; the per-chunk learning rate
  regularizers the penalties themselves (pure JAX)
  replay       the replay buffer of past sequences, mixed into every batch
  run_state    what an online checkpoint holds besides the weights (stream cursor, R, gate history, ...)
  store        the online checkpoints (Orbax), and telling an online workdir from a training one
"""
