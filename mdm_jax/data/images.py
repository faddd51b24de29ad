"""Images as token sequences: pixels quantised to ``data.num_levels`` levels per channel.

Sources (``config.data.dataset``):

* ``fashion_mnist``: the full Fashion-MNIST (60,000 train / 10,000 test,
  28x28x1) from the IDX files of Debian's ``dataset-fashion-mnist`` package,
  looked up in ``data.path`` (if set), ``/usr/share/datasets/fashion-mnist``
  and ``<repo>/data/_deb/root/usr/share/datasets/fashion-mnist`` (where
  ``bash launch/setup_env.sh`` extracts it without touching the system).
* ``image_folder``: PNG/JPEG/BMP/GIF files under ``data.path`` (read with
  Pillow); sub-folders are class labels.  Images are converted to
  ``data.channels`` channels (1 = grey, 3 = RGB) and resized to
  ``data.image_size`` when it is set.  The last ``data.eval_fraction`` of a
  seeded shuffle is held out.
* ``tfds_images``: a TFDS dataset prepared on disk in the ``array_record``
  format (e.g. ``cifar10``, ``downsampled_imagenet/32x32``), read lazily with
  ``tfds.data_source(..., download=False)``: nothing is ever downloaded.

Every image [H, W, C] becomes the raster-order token row ``image.reshape(-1)``
(channel fastest), so a pixel channel is one token with vocabulary
``num_levels`` and the diffusion losses and samplers work unchanged on
``[B, H*W*C]`` rows.  ``ImageData`` has the interface of ``TextData``:
``tokenizer`` (an ``ImageTokenizer`` whose ``decode`` turns a row back into an
image and whose ``write_samples`` writes a PNG grid), ``train_dataset`` and
``eval_batches`` (the shared process-slicing helpers of ``data/text.py``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import hashlib
import os
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mdm_jax.data.base import DATASETS, Data
from mdm_jax.data.batching import process_eval_batches, process_train_batches
from mdm_jax.pictures.pixels import (  # noqa: F401 (re-exported)
    check_levels, dequantize, encode_png, image_grid, quantize, read_png, write_png)

IMAGE_DATASETS = ("fashion_mnist", "image_folder", "tfds_images")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    os.path.join(REPO_ROOT, "data", "_deb", "root", "usr", "share", "datasets", "fashion-mnist"),
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
SETUP_HINT = ("Run `bash launch/setup_env.sh` (it extracts Debian's dataset-fashion-mnist into "
              "data/_deb/root), or `apt-get install dataset-fashion-mnist`, or point "
              "--config.data.path at a folder holding the four IDX files.")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# ------------------------------------------------------------------ IDX files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped): the MNIST / Fashion-MNIST array format."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    buf = f.read()
  if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic {buf[:4]!r}).")
  dtype, ndim = np.dtype(_IDX_DTYPES[buf[2]]), buf[3]
  dims = struct.unpack(f">{ndim}I", buf[4:4 + 4 * ndim])
  n = int(np.prod(dims)) if dims else 1
  offset = 4 + 4 * ndim
  if len(buf) - offset != n * dtype.itemsize:
    raise ValueError(f"{path}: header says {dims} ({n * dtype.itemsize} bytes) but the file has "
                     f"{len(buf) - offset} data bytes.")
  return np.frombuffer(buf, dtype, count=n, offset=offset).reshape(dims).astype(
      dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as an IDX file (gzipped when the path ends in .gz)."""
  a = np.ascontiguousarray(array, np.uint8)
  head = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(head + a.tobytes())


def _find_idx(directory: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
    p = os.path.join(directory, name)
    if os.path.isfile(p):
      return p
  return None


def find_fashion_mnist(path: str = "") -> str:
  """The first directory holding the Fashion-MNIST IDX files, or FileNotFoundError."""
  candidates = ([os.path.expanduser(path)] if path else []) + list(FASHION_MNIST_DIRS)
  for d in candidates:
    if all(_find_idx(d, s) for pair in FASHION_MNIST_FILES.values() for s in pair):
      return d
  raise FileNotFoundError(f"Fashion-MNIST not found in {candidates}. {SETUP_HINT}")


def load_fashion_mnist(path: str = "") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{"train": (uint8 [60000, 28, 28, 1], uint8 labels), "test": (... [10000, ...])}."""
  d = find_fashion_mnist(path)
  out = {}
  for split, (img, lab) in FASHION_MNIST_FILES.items():
    x, y = read_idx(_find_idx(d, img)), read_idx(_find_idx(d, lab))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise ValueError(f"Fashion-MNIST {split} in {d}: images {x.shape}, labels {y.shape}.")
    out[split] = (x[..., None], y.astype(np.int32))
  return out


# ------------------------------------------------------------------ image folder
def load_image_folder(path: str, image_size: int = 0, channels: int = 3
                      ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
  """All images under ``path`` -> (uint8 [N, H, W, C], int32 labels, class names).

  Sub-folders are classes (sorted names); images directly in ``path`` get
  label 0 of class "". All images must have the same size unless
  ``image_size`` > 0 (then each is resized to image_size x image_size).
  """
  try:
    from PIL import Image  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("data.dataset='image_folder' reads images with Pillow, which is not "
                      "installed: `.venv/bin/pip install pillow`.") from e
  root = os.path.expanduser(path)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data.path={path!r} is not a directory of images.")
  files = []
  for dirpath, _, names in os.walk(root):
    for n in names:
      if n.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(dirpath, n))
  files.sort()
  if not files:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
  rel_dirs = sorted({os.path.relpath(os.path.dirname(f), root) for f in files})
  classes = ["" if d == "." else d for d in rel_dirs]
  mode = {1: "L", 3: "RGB"}.get(int(channels))
  if mode is None:
    raise ValueError(f"data.channels must be 1 or 3 for image folders, got {channels}.")
  images, labels = [], []
  for f in files:
    with Image.open(f) as im:
      im = im.convert(mode)
      if image_size:
        im = im.resize((int(image_size), int(image_size)), Image.BICUBIC)
      a = np.asarray(im, np.uint8)
    images.append(a[..., None] if a.ndim == 2 else a)
    rel = os.path.relpath(os.path.dirname(f), root)
    labels.append(classes.index("" if rel == "." else rel))
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    raise ValueError(f"Images under {root} have different sizes {sorted(shapes)[:4]}: set "
                     "--config.data.image_size=N to resize them to N x N.")
  return np.stack(images), np.asarray(labels, np.int32), classes


def images_to_tokens(images: np.ndarray, num_levels: int) -> np.ndarray:
  """uint8 [N, H, W, C] -> int32 [N, H*W*C] raster-order (channel-fastest) level ids."""
  images = np.asarray(images)
  return quantize(images, num_levels).reshape(len(images), -1).astype(np.int32)


def tokens_to_images(tokens: np.ndarray, image_shape: Sequence[int],
                     num_levels: int) -> np.ndarray:
  """int [N, H*W*C] (or [H*W*C]) level ids -> uint8 [N, H, W, C] (or [H, W, C])."""
  tokens = np.asarray(tokens)
  shape = tuple(int(s) for s in image_shape)
  return dequantize(tokens.reshape(tokens.shape[:-1] + shape), num_levels)


@dataclasses.dataclass(frozen=True)
class ImageTokenizer:
  """Pixels <-> tokens: one token per pixel channel, ``num_levels`` values each."""
  image_shape: Tuple[int, int, int]
  num_levels: int = 256
  name: str = "pixels"
  is_image: bool = True

  @property
  def vocab_size(self) -> int:
    return int(self.num_levels)

  @property
  def seq_len(self) -> int:
    return int(np.prod(self.image_shape))

  def fingerprint(self) -> str:
    return f"pixels-{self.image_shape}-{self.num_levels}"

  def encode(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> int32 [H*W*C]."""
    return images_to_tokens(np.asarray(image)[None], self.num_levels)[0]

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """int [H*W*C] -> uint8 [H, W, C] (or a batch [N, H*W*C] -> [N, H, W, C])."""
    return tokens_to_images(tokens, self.image_shape, self.num_levels)

  def write_samples(self, tokens: np.ndarray, out_dir: str, name) -> Dict[str, Any]:
    """Writes ``out_dir/NAME.png`` (a grid of the samples) and an .npy of the images
    (``name``: a file stem, or a step number for ``step_N``)."""
    name = f"step_{name}" if isinstance(name, int) else str(name)
    images = self.decode(np.asarray(tokens))
    scale = max(1, 96 // max(self.image_shape[0], 1))
    path = write_png(os.path.join(out_dir, f"{name}.png"),
                     image_grid(images, scale=min(scale, 4)))
    np.save(os.path.join(out_dir, f"{name}_images.npy"), images)
    return {"grid_png": path, "num_images": int(len(images)),
            "mean_pixel": float(images.mean())}


# ------------------------------------------------------------------ datasets
class _LazyTfdsRows:
  """A TFDS data source seen as quantised token rows (random access, for grain)."""

  def __init__(self, source, num_levels: int, image_key: str = "image"):
    self._source, self._levels, self._key = source, num_levels, image_key

  def __len__(self) -> int:
    return len(self._source)

  def image(self, i: int) -> np.ndarray:
    a = np.asarray(self._source[int(i)][self._key], np.uint8)
    return a[..., None] if a.ndim == 2 else a

  def __getitem__(self, i):
    return quantize(self.image(i), self._levels).reshape(-1)

  def rows(self, idx) -> np.ndarray:
    return np.stack([self[int(i)] for i in idx]).astype(np.int32)

  def labels(self, idx, label_key: str = "label") -> Optional[np.ndarray]:
    ex = self._source[0]
    if label_key not in ex:
      return None
    return np.asarray([int(self._source[int(i)][label_key]) for i in idx], np.int32)


def _as_example(row) -> Dict[str, np.ndarray]:
  return {"tokens": np.asarray(row, np.int32)}


class _RowsWithLabels:
  """Random-access (row, label) pairs for grain (``data.class_labels=True``)."""

  def __init__(self, rows, labels):
    if len(rows) != len(labels):
      raise ValueError(f"{len(rows)} image rows but {len(labels)} labels.")
    self._rows, self._labels = rows, labels

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i):
    return self._rows[int(i)], self._labels[int(i)]


def _as_labelled_example(item) -> Dict[str, np.ndarray]:
  row, label = item
  return {"tokens": np.asarray(row, np.int32), "labels": np.asarray(label, np.int32)}


@dataclasses.dataclass
class ImageData(Data):
  """Quantised images as token rows, with the interface of ``TextData``.

  Attributes:
    tokenizer: the ``ImageTokenizer``.
    train: uint8 [N, H*W*C] level ids (or a lazy TFDS row source).
    eval: the same for the held-out split.
    train_labels / eval_labels: int32 class labels, or None.
    class_names: label names.
    with_labels: batches also carry int32 ``labels`` (``data.class_labels``; class-conditional
      models such as objective='gaussian').
  """
  tokenizer: ImageTokenizer
  train: Any
  eval: Any
  train_labels: Optional[np.ndarray] = None
  eval_labels: Optional[np.ndarray] = None
  class_names: Tuple[str, ...] = ()
  with_labels: bool = False

  @property
  def seq_len(self) -> int:
    return self.tokenizer.seq_len

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def train_dataset(self, global_batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1):
    """Infinite reshuffled training batches ``{"tokens": int32 [B/P, H*W*C]}`` (see TextData)."""
    if self.with_labels and self.train_labels is not None:
      return process_train_batches(_RowsWithLabels(self.train, self.train_labels),
                                   global_batch_size, seed, process_index, process_count,
                                   transform=_as_labelled_example, seq_len=self.seq_len)
    return process_train_batches(self.train, global_batch_size, seed, process_index,
                                 process_count, transform=_as_example, seq_len=self.seq_len)

  def eval_batches(self, batch_size: int, num_batches: int, process_index: int = 0,
                   process_count: int = 1) -> List[Dict[str, np.ndarray]]:
    """Fixed, padded, weighted eval batches (see TextData.eval_batches)."""
    batches = process_eval_batches(lambda idx: self._rows(self.eval, idx), len(self.eval),
                                   self.seq_len, batch_size, num_batches, process_index,
                                   process_count)
    if self.with_labels and self.eval_labels is not None:   # the same rows' labels (0 = padding)
      local = int(batch_size) // int(process_count)
      for gi, b in enumerate(batches):
        idx = gi * int(batch_size) + int(process_index) * local + np.arange(local)
        real = idx < len(self.eval_labels)
        b["labels"] = np.where(real, self.eval_labels[np.minimum(idx, len(self.eval_labels) - 1)],
                               0).astype(np.int32)
    return batches

  @staticmethod
  def _rows(source, idx) -> np.ndarray:
    if isinstance(source, np.ndarray):
      return source[np.asarray(idx)].astype(np.int32)
    return source.rows(idx)

  def images(self, split: str = "eval", n: int = 0, offset: int = 0) -> np.ndarray:
    """uint8 [n, H, W, C] images of a split, as the model sees them (quantised, dequantised)."""
    src = self.eval if split == "eval" else self.train
    stop = len(src) if n <= 0 else min(len(src), offset + int(n))
    rows = self._rows(src, np.arange(offset, stop))
    return self.tokenizer.decode(rows)

  # ---- samples: a PNG grid instead of text
  def describe_samples(self, tokens):
    del tokens
    return [], {}

  def write_samples(self, tokens, texts, stats, out_dir, name, header=""):
    """Writes ``out_dir/name.png`` (a grid), ``name_images.npy`` and ``name.json``."""
    del texts, header
    os.makedirs(out_dir, exist_ok=True)
    out = self.tokenizer.write_samples(np.asarray(tokens), out_dir, name)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
      json.dump({**stats, **out}, f, indent=2)
    return {**out, "samples_json": path}

  def show_samples(self, texts, stats, header):
    del texts
    return f"----- {stats.get('num_samples')} images at {header} -> {stats.get('grid_png')}"

  def labels(self, split: str = "eval", n: int = 0, offset: int = 0) -> Optional[np.ndarray]:
    lab = self.eval_labels if split == "eval" else self.train_labels
    if lab is None:
      return None
    return lab[offset:] if n <= 0 else lab[offset:offset + int(n)]


def _hold_out(x, y, eval_fraction: float, seed: int):
  n = len(x)
  order = np.random.default_rng(seed).permutation(n)
  n_eval = max(1, int(round(n * float(eval_fraction))))
  if n - n_eval < 1:
    raise ValueError(f"Only {n} images: need at least 2 for a train and an eval split.")
  tr, ev = np.sort(order[:n - n_eval]), np.sort(order[n - n_eval:])
  return x[tr], y[tr], x[ev], y[ev]


def _limit(x, y, n: int):
  return (x, y) if n <= 0 else (x[:n], None if y is None else y[:n])


@DATASETS.register("fashion_mnist")
@DATASETS.register("image_folder")
@DATASETS.register("tfds_images")
def make_image_data(data_config, workdir: Optional[str] = None) -> ImageData:
  """Builds the ``ImageData`` named by ``data.dataset`` (see the module docstring).

  Keys read (with defaults): dataset, path, num_levels (256), image_size (0:
  native), channels (3, image folders), tfds_name, tfds_data_dir,
  tfds_train_split ("train"), tfds_eval_split ("test"), eval_fraction,
  shuffle_seed, max_train_examples / max_eval_examples (0: all), seq_len
  (must equal H*W*C).
  """
  del workdir
  kind = str(data_config.dataset)
  levels = check_levels(data_config.num_levels)
  max_train = int(data_config.max_train_examples)
  max_eval = int(data_config.max_eval_examples)
  classes: Tuple[str, ...] = ()
  if kind == "fashion_mnist":
    d = load_fashion_mnist(str(data_config.path))
    (xtr, ytr), (xev, yev) = d["train"], d["test"]
    xtr, ytr = _limit(xtr, ytr, max_train)
    xev, yev = _limit(xev, yev, max_eval)
    classes = FASHION_MNIST_CLASSES
  elif kind == "image_folder":
    x, y, names = load_image_folder(str(data_config.path),
                                    int(data_config.image_size),
                                    int(data_config.channels))
    xtr, ytr, xev, yev = _hold_out(x, y, float(data_config.eval_fraction),
                                   int(data_config.shuffle_seed))
    xtr, ytr = _limit(xtr, ytr, max_train)
    xev, yev = _limit(xev, yev, max_eval)
    classes = tuple(names)
  elif kind == "tfds_images":
    data = _make_tfds_data(data_config, levels, max_train, max_eval)
    data.with_labels = bool(data_config.class_labels)
    return data
  else:
    raise ValueError(f"data.dataset={kind!r} is not an image dataset {IMAGE_DATASETS}.")
  tok = ImageTokenizer(tuple(int(s) for s in xtr.shape[1:]), levels)
  _check_seq_len(data_config, tok)
  to_rows = lambda a: np.ascontiguousarray(quantize(a, levels).reshape(len(a), -1))  # noqa: E731
  return ImageData(tokenizer=tok, train=to_rows(xtr), eval=to_rows(xev), train_labels=ytr,
                   eval_labels=yev, class_names=classes,
                   with_labels=bool(data_config.class_labels))


def _check_seq_len(data_config, tok: ImageTokenizer) -> None:
  want = int(data_config.seq_len)
  if want != tok.seq_len:
    h, w, c = tok.image_shape
    raise ValueError(f"data.seq_len={want} does not match the images: {h}x{w}x{c} = "
                     f"{tok.seq_len} tokens. Set --config.data.seq_len={tok.seq_len}.")


def _make_tfds_data(data_config, levels: int, max_train: int, max_eval: int) -> ImageData:
  name = str(data_config.tfds_name)
  if not name:
    raise ValueError("data.dataset='tfds_images' needs --config.data.tfds_name (e.g. cifar10 or "
                     "downsampled_imagenet/32x32).")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("data.dataset='tfds_images' needs tensorflow-datasets (and "
                      "importlib_resources): `.venv/bin/pip install tensorflow-datasets "
                      "importlib_resources`.") from e
  data_dir = str(data_config.tfds_data_dir) or None
  splits = (str(data_config.tfds_train_split),
            str(data_config.tfds_eval_split))
  srcs = []
  for split in splits:
    try:   # download=False: never fetch anything (offline this would hang ~200 s)
      srcs.append(tfds.data_source(name, split=split, data_dir=data_dir, download=False))
    except Exception as e:  # noqa: BLE001  (tfds raises AssertionError / NotImplementedError)
      raise FileNotFoundError(
          f"TFDS dataset {name!r} split {split!r} is not prepared in the array_record format "
          f"under data_dir={data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {e}). "
          "Prepare it once where there is internet, e.g. `tfds build "
          f"{name} --file_format=array_record`, then copy the folder here.") from e
  train, ev = (_LazyTfdsRows(s, levels) for s in srcs)
  if max_train > 0 or max_eval > 0:
    raise ValueError("data.max_train_examples / max_eval_examples are not supported for "
                     "tfds_images; use a TFDS split slice such as 'train[:1000]'.")
  first = train.image(0)
  tok = ImageTokenizer(tuple(int(s) for s in first.shape), levels)
  _check_seq_len(data_config, tok)
  n_cls = 0
  try:
    n_cls = int(srcs[0].dataset_info.features["label"].num_classes)
  except Exception:  # noqa: BLE001  (no label feature, e.g. downsampled_imagenet)
    pass
  tr_lab = train.labels(range(len(train))) if n_cls else None
  ev_lab = ev.labels(range(len(ev))) if n_cls else None
  return ImageData(tokenizer=tok, train=train, eval=ev, train_labels=tr_lab, eval_labels=ev_lab,
                   class_names=tuple(str(i) for i in range(n_cls)))


def fingerprint(data: ImageData) -> str:
  h = hashlib.sha256(data.tokenizer.fingerprint().encode())
  if isinstance(data.train, np.ndarray):
    h.update(np.ascontiguousarray(data.train[:64]).tobytes())
  return h.hexdigest()[:16]
