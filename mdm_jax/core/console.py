"""What a run prints: our own lines by default, the libraries' INFO lines on request.

A tiny run used to print about 150 lines, most of them INFO records of Orbax, JAX and
absl that buried the progress line.  ``configure(verbosity)`` installs a filter and a
formatter on absl's handler (which every Python logger reaches through the root logger):

* ``verbosity=0`` (default): records logged from ``mdm_jax`` at INFO and above, printed as
  plain sentences (``warning: ...`` / ``error: ...`` for the higher levels), and the
  libraries' WARNING and ERROR records in absl's usual format.  Orbax's reports of a failed
  background save are dropped, because ``mdm_jax.trainers.checkpoint`` raises that error
  itself, as one line, at the next step; so are the "Event loop is closed" tracebacks of
  TensorStore writes that complete after such a failure (reported through
  ``sys.unraisablehook``) and asyncio's "Future exception was never retrieved" records of
  its futures.
* ``verbosity=1``: also every library INFO record.
* ``verbosity>=2``: DEBUG records as well.

The command lines take absl's own ``--verbosity`` flag and call this from ``main``.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Orbax logs the error of a failed background save from several threads, each with a
# traceback; Checkpointer re-raises it as one line, so these are noise at verbosity 0.
_ORBAX_BACKGROUND_ERRORS = ("raised an exception", "Failed to run", "thread (save_finalize) failed",
                            "Save Finalize thread")


def is_ours(record: std_logging.LogRecord) -> bool:
  """Whether a log record was written by code in the ``mdm_jax`` package."""
  return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


class _Filter(std_logging.Filter):

  def __init__(self, verbosity: int):
    super().__init__()
    self.verbosity = verbosity

  def filter(self, record: std_logging.LogRecord) -> bool:
    if self.verbosity >= 1 or is_ours(record):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    if "/orbax/" in record.pathname and record.levelno == std_logging.ERROR:
      msg = record.getMessage()
      return not any(s in msg for s in _ORBAX_BACKGROUND_ERRORS)
    if record.name == "asyncio" and record.exc_info and _through_orbax(record.exc_info[2]):
      return False   # "Future exception was never retrieved" of the same failed save
    return True


class _Formatter(std_logging.Formatter):
  """Our records as plain sentences; the libraries' in absl's format."""

  def __init__(self):
    super().__init__()
    self._absl = logging.PythonFormatter()

  def format(self, record: std_logging.LogRecord) -> str:
    if not is_ours(record):
      return self._absl.format(record)
    msg = record.getMessage()
    if record.exc_info:
      msg += "\n" + self.formatException(record.exc_info)
    if record.levelno >= std_logging.ERROR:
      return f"error: {msg}"
    if record.levelno >= std_logging.WARNING:
      return f"warning: {msg}"
    return msg


def configure(verbosity: int = 0) -> None:
  """Sets what reaches the console (see the module docstring).  Idempotent."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  verbosity = int(verbosity)
  # absl maps its --verbosity flag to a logging level (1 = DEBUG) again when app.run starts;
  # the flag is set to the level this module wants, and the user's value picks the filter.
  if "verbosity" in flags.FLAGS and flags.FLAGS.is_parsed():
    flags.FLAGS.verbosity = 1 if verbosity >= 2 else 0
  logging.set_verbosity(logging.DEBUG if verbosity >= 2 else logging.INFO)
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, _Filter)]:
    handler.removeFilter(f)
  handler.addFilter(_Filter(verbosity))
  handler.setFormatter(_Formatter())
  # Python loggers of the libraries (jax, orbax's std loggers) reach absl's handler through
  # the root logger; their own level must not hide WARNINGs either.
  logging.use_absl_handler()
  _install_unraisable_hook(verbosity)


def _through_orbax(tb) -> bool:
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
  """TensorStore completing a write after Orbax closed its asyncio loop (a failed save)."""
  if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
    return False
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_filename.endswith(
      os.path.join("asyncio", "base_events.py"))


def _install_unraisable_hook(verbosity: int) -> None:
  """Drops those tracebacks at verbosity 0 (TensorStore reports them as unraisable)."""
  import sys  # pylint: disable=import-outside-toplevel
  previous = getattr(sys.unraisablehook, "_mdm_previous", sys.unraisablehook)

  def hook(unraisable):
    if verbosity < 1 and _is_closed_loop_callback(unraisable.exc_type, unraisable.exc_value,
                                                  unraisable.exc_traceback):
      return
    previous(unraisable)

  hook._mdm_previous = previous  # type: ignore[attr-defined]
  sys.unraisablehook = hook
