"""L0: what every layer of lm may use and that imports nothing of lm.

  errors   the user-facing error types (`lm.main` prints them as one `error:` line, exit code 2)
  files    atomic file writes, whole-line appends, PNG figures, recognising a full disk
  configs  ConfigDict helpers: the parts packages contribute to the config, dotted overrides, saved configs
  workdir_lock  one run per workdir: WORKDIR/run.lock, an flock held for the life of a run
  faults   named points where LM_FAULTS makes a process signal itself (the fault-tolerance tests)
  malloc   glibc keeps the memory XLA:CPU's steps free (config.cpu_malloc), so it is not faulted in every step
"""
