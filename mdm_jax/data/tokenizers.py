"""Tokenizers: character, byte, locally trained byte-level BPE, and GPT-2 BPE.

Every tokenizer maps text to an int32 id array with ids in ``[0, vocab_size)``
and back.  ``decode`` accepts any integer sequence: ids outside the vocabulary
(a mask token, a Prime code with no token) are rendered as U+FFFD.

``build_tokenizer`` builds the one named by ``config.data.tokenizer`` and, given
a cache directory, saves it there (``tokenizer.json`` + ``tokenizer_meta.json``)
or loads the saved one, so that resumed runs and sampling jobs decode with
exactly the same vocabulary.
"""

import abc
import base64
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from mdm_jax.core import paths
import mdm_jax.data.token_order as token_order_lib

REPLACEMENT_CHAR = "\ufffd"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
# Key identifying mdm_jax's own JSON formats (char, byte, gpt2). A file without it
# is taken to be a Hugging Face `tokenizers` JSON (bpe).
_FORMAT_KEY = "mdm_jax_tokenizer"

# sha256 of OpenAI's r50k_base.tiktoken (= GPT-2's BPE), as pinned by tiktoken.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
_GPT2_HINT = ("The file `gpt2.tiktoken` (OpenAI's r50k_base/GPT-2 BPE ranks) ships with the "
              "PyPI package openai-whisper: `pip install --no-deps openai-whisper==20250625` "
              "installs it as <site-packages>/whisper/assets/gpt2.tiktoken (found automatically "
              "when data.gpt2_bpe_path is empty), or pass "
              "--config.data.gpt2_bpe_path=/path/to/gpt2.tiktoken.")

IdsLike = Union[Sequence[int], np.ndarray, Any]


def atomic_write(path: str, data: Union[str, bytes]) -> None:
  """Writes ``data`` to ``path`` via a unique temporary file and an atomic rename.

  Several processes may write the same (identical) file concurrently.  A bucket path
  (``gs://``) is written as one whole object (``mdm_jax.core.paths.atomic_write``).
  """
  paths.atomic_write(path, data)


def _as_id_array(ids: IdsLike) -> np.ndarray:
  return np.asarray(ids).astype(np.int64).reshape(-1)


class Tokenizer(abc.ABC):
  """Text <-> int32 ids over a vocabulary of ``vocab_size`` ids."""

  name: str = ""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids; every id returned by ``encode`` is below it."""

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Text -> 1-D int32 array of ids."""

  @abc.abstractmethod
  def _decode_valid(self, ids: np.ndarray) -> str:
    """Decodes ids that are all in ``[0, vocab_size)``."""

  @abc.abstractmethod
  def to_json(self) -> str:
    """The serialised tokenizer (what ``save`` writes)."""

  def decode(self, ids: IdsLike) -> str:
    """Ids (list, numpy or jax array) -> text; out-of-vocabulary ids become U+FFFD."""
    ids = _as_id_array(ids)
    bad = (ids < 0) | (ids >= self.vocab_size)
    if not bad.any():
      return self._decode_valid(ids)
    parts: List[str] = []
    start = 0
    for pos in np.flatnonzero(bad):
      if pos > start:
        parts.append(self._decode_valid(ids[start:pos]))
      parts.append(REPLACEMENT_CHAR)
      start = pos + 1
    if start < len(ids):
      parts.append(self._decode_valid(ids[start:]))
    return "".join(parts)

  def save(self, path: str) -> None:
    """Writes the tokenizer to the JSON file ``path`` (read back by ``load_tokenizer``)."""
    atomic_write(path, self.to_json())

  def fingerprint(self) -> str:
    """sha256 of the serialised tokenizer: equal fingerprints encode identically."""
    return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ------------------------------------------------------------------ char
class CharTokenizer(Tokenizer):
  """One id per character of the training corpus, plus U+FFFD for unknown characters.

  Ids follow code-point order of the sorted character set, so they are
  reproducible from the corpus alone.
  """

  name = "char"

  def __init__(self, chars: Sequence[str]):
    chars = sorted(set(chars) | {REPLACEMENT_CHAR})
    if any(len(c) != 1 for c in chars):
      raise ValueError("CharTokenizer vocabulary entries must be single characters.")
    self._chars: Tuple[str, ...] = tuple(chars)
    self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
    self.unk_id = self._chars.index(REPLACEMENT_CHAR)

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls(set(text))

  @property
  def chars(self) -> Tuple[str, ...]:
    return self._chars

  @property
  def vocab_size(self) -> int:
    return len(self._chars)

  def encode(self, text: str) -> np.ndarray:
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    idx = np.minimum(np.searchsorted(self._codepoints, cps), len(self._codepoints) - 1)
    known = self._codepoints[idx] == cps
    return np.where(known, idx, self.unk_id).astype(np.int32)

  def _decode_valid(self, ids: np.ndarray) -> str:
    return self._codepoints[ids].tobytes().decode("utf-32-le")

  def to_json(self) -> str:
    return json.dumps({_FORMAT_KEY: self.name, "chars": "".join(self._chars)})

  @classmethod
  def from_json_dict(cls, d: Dict[str, Any]) -> "CharTokenizer":
    return cls(list(d["chars"]))


# ------------------------------------------------------------------ byte
class ByteTokenizer(Tokenizer):
  """UTF-8 bytes; vocabulary 256. Invalid UTF-8 decodes to U+FFFD."""

  name = "byte"

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def _decode_valid(self, ids: np.ndarray) -> str:
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def to_json(self) -> str:
    return json.dumps({_FORMAT_KEY: self.name})

  @classmethod
  def from_json_dict(cls, d: Dict[str, Any]) -> "ByteTokenizer":
    del d
    return cls()


# ------------------------------------------------------------------ bpe
# Whitespace-led words. Byte-level pre-tokens never span a non-space -> space
# boundary, so encoding these pieces separately gives exactly the encoding of
# the whole text, and repeated words are encoded once.
_PIECE_RE = re.compile(r"\s*\S+|\s+")


class BPETokenizer(Tokenizer):
  """Byte-level BPE (GPT-2 style) trained locally with Hugging Face ``tokenizers``.

  Lossless on any text (the 256 bytes are always in the vocabulary); no
  special tokens.
  """

  name = "bpe"

  def __init__(self, hf_tokenizer):
    self._tok = hf_tokenizer

  @classmethod
  def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
    """Trains a byte-level BPE with ``vocab_size`` ids (256 bytes + merges) on ``text``."""
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if vocab_size < 256:
      raise ValueError(
          f"data.bpe_vocab_size={vocab_size} must be at least 256 (the byte alphabet).")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    # Chunks end at line breaks; chunking does not change the pre-tokens (see _PIECE_RE).
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 2000]) for i in range(0, len(lines), 2000)]
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    out = cls(tok)
    if out.vocab_size < vocab_size:
      logging.warning("BPE training stopped at %d ids (< data.bpe_vocab_size=%d): the corpus has "
                      "too few repeated pairs.", out.vocab_size, vocab_size)
    return out

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    pieces = _PIECE_RE.findall(text)
    if not pieces:
      return np.zeros((0,), np.int32)
    index: Dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(p, len(index)) for p in pieces), dtype=np.int64,
                          count=len(pieces))
    encodings = self._tok.encode_batch_fast(list(index), add_special_tokens=False)
    lens = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                       count=int(lens.sum()))
    starts = np.cumsum(lens) - lens
    out_lens = lens[inverse]
    out_starts = np.cumsum(out_lens) - out_lens
    gather = np.repeat(starts[inverse] - out_starts, out_lens) + np.arange(int(out_lens.sum()))
    return flat[gather]

  def _decode_valid(self, ids: np.ndarray) -> str:
    return self._tok.decode(ids.tolist(), skip_special_tokens=False)

  def to_json(self) -> str:
    return self._tok.to_str()

  @classmethod
  def from_json_str(cls, s: str) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
    return cls(HFTokenizer.from_str(s))


# ------------------------------------------------------------------ gpt2
def find_gpt2_tiktoken(path: str = "") -> str:
  """Path of GPT-2's ``gpt2.tiktoken``: ``path`` if given, else openai-whisper's copy.

  Raises:
    FileNotFoundError: with instructions to get the file.
  """
  if path:
    if not os.path.isfile(os.path.expanduser(path)):
      raise FileNotFoundError(f"data.gpt2_bpe_path={path!r} does not exist. {_GPT2_HINT}")
    return os.path.expanduser(path)
  try:
    spec = importlib.util.find_spec("whisper")   # locates the package without importing it
  except (ImportError, ValueError):
    spec = None
  for location in (spec.submodule_search_locations or []) if spec else []:
    candidate = pathlib.Path(location) / "assets" / "gpt2.tiktoken"
    if candidate.is_file():
      return str(candidate)
  raise FileNotFoundError(f"tokenizer='gpt2' needs the GPT-2 BPE file and none was found. "
                          f"{_GPT2_HINT}")


def _parse_tiktoken_ranks(contents: str) -> Dict[bytes, int]:
  ranks = {}
  for line in contents.splitlines():
    if line.strip():
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  return ranks


class GPT2Tokenizer(Tokenizer):
  """GPT-2's BPE (tiktoken ``r50k_base``), built offline from ``gpt2.tiktoken``; vocab 50257.

  ``<|endoftext|>`` (id 50256) is never produced by ``encode``: text is encoded
  as ordinary text.
  """

  name = "gpt2"

  def __init__(self, ranks_file_contents: str):
    import tiktoken  # pylint: disable=import-outside-toplevel
    from tiktoken_ext import openai_public  # pylint: disable=import-outside-toplevel
    digest = hashlib.sha256(ranks_file_contents.encode("utf-8")).hexdigest()
    if digest != GPT2_TIKTOKEN_SHA256:
      raise ValueError(f"The GPT-2 BPE file has sha256 {digest}, not r50k_base's "
                       f"{GPT2_TIKTOKEN_SHA256}. {_GPT2_HINT}")
    self._contents = ranks_file_contents
    self._enc = tiktoken.Encoding(
        "gpt2", pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=_parse_tiktoken_ranks(ranks_file_contents),
        special_tokens={"<|endoftext|>": GPT2_EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)

  @classmethod
  def from_file(cls, path: str = "") -> "GPT2Tokenizer":
    """From ``path`` (or openai-whisper's copy when empty); see ``find_gpt2_tiktoken``."""
    return cls(pathlib.Path(find_gpt2_tiktoken(path)).read_text(encoding="utf-8"))

  @property
  def vocab_size(self) -> int:
    return GPT2_VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

  def _decode_valid(self, ids: np.ndarray) -> str:
    return self._enc.decode(ids.tolist(), errors="replace")

  def to_json(self) -> str:
    # Self-contained: the ranks travel with the workdir (about 0.8 MB).
    return json.dumps({_FORMAT_KEY: self.name, "tiktoken_bpe": self._contents})

  @classmethod
  def from_json_dict(cls, d: Dict[str, Any]) -> "GPT2Tokenizer":
    return cls(d["tiktoken_bpe"])


# ------------------------------------------------------------------ reordered
class ReorderedTokenizer(Tokenizer):
  """Another tokenizer with its vocabulary renumbered (``data.token_order``).

  New id ``i`` is the base tokenizer's id ``order[i]``; the text each id stands
  for is unchanged, so encode/decode round trips are the base tokenizer's.
  """

  def __init__(self, base: Tokenizer, order: Sequence[int], order_kind: str):
    order = np.asarray(order, np.int64).reshape(-1)
    if not token_order_lib.is_permutation(order, base.vocab_size):
      raise ValueError(f"A vocabulary order must be a permutation of [0, {base.vocab_size}); "
                       f"got {len(order)} ids.")
    self.base = base
    self.order_kind = str(order_kind)
    self.order = order.astype(np.int32)
    self.rank = token_order_lib.rank_of(order)
    self.name = base.name

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size

  def encode(self, text: str) -> np.ndarray:
    return self.rank[self.base.encode(text)]

  def _decode_valid(self, ids: np.ndarray) -> str:
    return self.base.decode(self.order[ids])

  def to_json(self) -> str:
    return json.dumps({_FORMAT_KEY: "reordered", "order_kind": self.order_kind,
                       "order": self.order.tolist(), "base": self.base.to_json()})

  @classmethod
  def from_json_dict(cls, d: Dict[str, Any]) -> "ReorderedTokenizer":
    return cls(tokenizer_from_json(d["base"]), d["order"], d["order_kind"])

  def __repr__(self) -> str:
    return f"ReorderedTokenizer({self.base!r}, order={self.order_kind!r})"


# ------------------------------------------------------------------ registry
@dataclasses.dataclass(frozen=True)
class TokenizerEntry:
  """How to build one tokenizer kind, and the ``config.data`` keys it depends on."""
  build: Callable[[Any, str], Tokenizer]
  config_keys: Tuple[str, ...] = ()


TOKENIZERS: Dict[str, TokenizerEntry] = {
    "char": TokenizerEntry(lambda cfg, text: CharTokenizer.from_text(text), ("dataset", "path")),
    "byte": TokenizerEntry(lambda cfg, text: ByteTokenizer()),
    "bpe": TokenizerEntry(lambda cfg, text: BPETokenizer.train(text, int(cfg.bpe_vocab_size)),
                          ("dataset", "path", "bpe_vocab_size")),
    "gpt2": TokenizerEntry(lambda cfg, text: GPT2Tokenizer.from_file(str(cfg.gpt2_bpe_path))),
}

_LOADERS: Dict[str, Callable[[Dict[str, Any]], Tokenizer]] = {
    "char": CharTokenizer.from_json_dict,
    "byte": ByteTokenizer.from_json_dict,
    "gpt2": GPT2Tokenizer.from_json_dict,
    "reordered": ReorderedTokenizer.from_json_dict,
}


def tokenizer_from_json(contents: str, where: str = "The tokenizer JSON") -> Tokenizer:
  """Parses what ``Tokenizer.to_json`` wrote.

  Raises:
    ValueError: not a tokenizer written by mdm_jax (``where`` names the source).
  """
  d = json.loads(contents)
  kind = d.get(_FORMAT_KEY) if isinstance(d, dict) else None
  if kind is not None:
    if kind not in _LOADERS:
      raise ValueError(f"{where}: unknown tokenizer kind {kind!r}; known: {sorted(_LOADERS)}.")
    return _LOADERS[kind](d)
  if isinstance(d, dict) and "model" in d:
    return BPETokenizer.from_json_str(contents)
  raise ValueError(f"{where} is not a tokenizer file written by mdm_jax.")


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer written by ``Tokenizer.save``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a tokenizer file.
  """
  return tokenizer_from_json(pathlib.Path(path).read_text(encoding="utf-8"), str(path))


def tokenizer_settings(data_config) -> Dict[str, Any]:
  """The settings that determine the tokenizer (stored next to a cached one)."""
  kind = str(data_config.tokenizer)
  if kind not in TOKENIZERS:
    raise ValueError(f"Unknown data.tokenizer={kind!r}; valid tokenizers: {sorted(TOKENIZERS)}.")
  settings: Dict[str, Any] = {"tokenizer": kind}
  for key in TOKENIZERS[kind].config_keys:
    value = data_config[key]
    settings[key] = value if isinstance(value, (int, float, bool)) else str(value)
  return settings


def build_tokenizer(data_config, text: str, cache_dir: Optional[str] = None) -> Tokenizer:
  """Builds the tokenizer named by ``data_config.tokenizer``, or loads it from ``cache_dir``.

  Args:
    data_config: the ``config.data`` block.
    text: the training corpus (used by corpus-dependent tokenizers: char, bpe).
    cache_dir: if given and it holds a tokenizer saved with the same settings,
      that one is loaded; otherwise the new tokenizer is saved there.

  Raises:
    ValueError: unknown tokenizer name.
  """
  settings = tokenizer_settings(data_config)
  kind = settings["tokenizer"]
  if cache_dir:
    tok_path = paths.join(cache_dir, TOKENIZER_FILE)
    meta_path = paths.join(cache_dir, META_FILE)
    if paths.exists(tok_path) and paths.exists(meta_path):
      meta = json.loads(paths.read_text(meta_path))
      if meta.get("settings") == settings:
        with paths.local_copy_for_read(tok_path) as local:
          tok = load_tokenizer(local)
        logging.info("Loaded the %s tokenizer (vocab %d) from %s.", kind, tok.vocab_size, tok_path)
        return tok
      logging.warning("The tokenizer saved in %s was built with %s, not %s: rebuilding it.",
                      cache_dir, meta.get("settings"), settings)
  tok = TOKENIZERS[kind].build(data_config, text)
  if cache_dir:
    paths.makedirs(cache_dir)
    with paths.local_copy_for_write(paths.join(cache_dir, TOKENIZER_FILE)) as local:
      tok.save(local)
    meta = {"kind": kind, "settings": settings, "vocab_size": tok.vocab_size,
            "fingerprint": tok.fingerprint()}
    atomic_write(paths.join(cache_dir, META_FILE), json.dumps(meta, indent=2))
    logging.info("Saved the %s tokenizer (vocab %d) to %s.", kind, tok.vocab_size, cache_dir)
  return tok
