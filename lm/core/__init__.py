"""L0: what every layer of lm may use and that imports nothing of lm.

  errors   the user-facing error types (`lm.main` prints them as one `error:` line, exit code 2)
  files    atomic file writes and PNG figures (no reader ever sees a half-written report)
  configs  ConfigDict helpers: the parts packages contribute to the config, dotted overrides, saved configs
"""
