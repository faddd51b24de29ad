"""Errors that reach the user as one line that says what to change."""


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key and the fix."""
