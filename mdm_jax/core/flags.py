"""Command-line helpers shared by every program that takes ``--config``."""

from __future__ import annotations

import sys
from typing import Callable, List

from mdm_jax.core import console, host_env
from mdm_jax.core.config import resolve_config_path
from mdm_jax.core.errors import ConfigError


def last_override_wins(argv: List[str], config_flag: str = "config") -> List[str]:
  """Drops every ``--config.KEY=VALUE`` that a later one for the same KEY repeats.

  absl keeps the last value of a repeated scalar flag, but ml_collections appends the
  values of a repeated tuple field (``--config.mesh.shape=(2,1,1)`` twice gives a
  6-tuple).  Launch scripts that append overrides to a base command repeat keys, so
  every repeated override resolves the absl way: the last one wins.  Only the ``=``
  form is recognised; ``--config.KEY VALUE`` (space-separated) passes through as is.
  """
  prefix = f"--{config_flag}."
  keys = [a.split("=", 1)[0] if a.startswith(prefix) and "=" in a else None for a in argv]
  last = {k: i for i, k in enumerate(keys) if k}
  return [a for i, (a, k) in enumerate(zip(argv, keys)) if k is None or last[k] == i]


def resolve_config_flag(argv: List[str], config_flag: str = "config") -> List[str]:
  """Rewrites ``--config=NAME[:ARGS]`` (a packaged config) to the file's path.

  ``--config`` then takes ``shakespeare_prime``, ``shakespeare_prime:tiny``, a path, or
  ``configs/NAME.py`` from any directory (see ``mdm_jax.core.config.resolve_config_path``).
  """
  out, i = [], 0
  flag = f"--{config_flag}"
  while i < len(argv):
    a = argv[i]
    if a.startswith(flag + "="):
      out.append(flag + "=" + resolve_config_path(a.split("=", 1)[1]))
    elif a == flag and i + 1 < len(argv):
      out += [flag, resolve_config_path(argv[i + 1])]
      i += 1
    else:
      out.append(a)
    i += 1
  return out


def flags_parser(usage: str, config_flag: str = "config") -> Callable[[List[str]], List[str]]:
  """An absl ``flags_parser`` for ``app.run`` that turns a bad ``--config`` file or
  ``--config.KEY`` into one ``error:`` line, the usage line and exit status 2.

  ml_collections raises KeyError/AttributeError (unknown key) or ValueError/TypeError (a value
  of the wrong type, an unknown config variant) from deep inside flag parsing; the user should
  see what to change, not a traceback.  Every command line that takes ``--config`` uses this,
  so it is also where a host without a TPU chip stops JAX from probing libtpu
  (``host_env.skip_absent_tpu``).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    print(f"usage: {usage}", file=sys.stderr)
    sys.exit(2)

  def parse(argv: List[str]) -> List[str]:
    host_env.skip_absent_tpu()
    try:
      argv = resolve_config_flag(last_override_wins(argv, config_flag), config_flag)
    except ConfigError as e:
      fail(str(e))
    try:
      args = flags.FLAGS(argv)
      console.configure(max(0, int(flags.FLAGS.verbosity)) if "verbosity" in flags.FLAGS else 0)
      if config_flag in flags.FLAGS and flags.FLAGS[config_flag].value is not None:
        _ = list(flags.FLAGS[config_flag].value.keys())   # a bad file raises when first read
      return args
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
      # A config file that raised carries its whole traceback in the message: keep the last line.
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      msg = lines[-1] if lines else type(e).__name__
      if isinstance(e, (KeyError, AttributeError)):
        msg = f"unknown config key {msg.strip(chr(34) + chr(39))!r}"
      flag = lines[0].split(":", 1)[0] if lines and lines[0].startswith("flag --") else ""
      if flag and msg.startswith(flag):
        flag = ""
      overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith(f"--{config_flag}.")]
      hint = ""
      if isinstance(e, (KeyError, AttributeError)) and overrides:
        hint = (f" (overrides given: {', '.join(overrides)}; a key must already exist in the "
                "config, see docs/reference.md or configs/base.py)")
      fail(f"{flag + ': ' if flag else ''}{msg}{hint}")

  return parse
