"""The error every data boundary raises for bad input."""


class DataError(ValueError):
  """Bad data input: the message names the problem and the fix."""
