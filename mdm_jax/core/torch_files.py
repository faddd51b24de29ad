"""Reading PyTorch weight files without PyTorch: safetensors and ``torch.save`` checkpoints.

Both return NumPy arrays, so converting a published model needs neither torch nor a GPU.

* ``read_safetensors(path)``: ``{name: array}`` through the ``safetensors`` package's
  NumPy API (bfloat16 tensors come back as ``ml_dtypes.bfloat16``).
* ``read_torch_checkpoint(path)``: the object a ``torch.save`` zip archive holds (PyTorch
  >= 1.6 format; PyTorch Lightning ``.ckpt`` files are such archives), with every tensor
  as a NumPy array.  The pickle is read by an unpickler that builds only plain containers
  and tensors: any other class it names (an OmegaConf config, a tokenizer object, an
  optimizer) becomes an ``Opaque`` record of its name and pickled state, so no code from
  the file runs and the packages it was saved with need not be installed.  ``plain(x)``
  turns an OmegaConf ``DictConfig``/``ListConfig`` record back into dicts and lists.

Every failure is a ``WeightFileError`` that names the file and what is wrong with it
(missing, truncated, not a PyTorch archive, the legacy pre-1.6 format).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Dict, Tuple

import numpy as np


class WeightFileError(ValueError):
  """A weight file that cannot be read; the message names the file and the problem."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _bfloat16():
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (installed with jax)
  return ml_dtypes.bfloat16


class Opaque:
  """A pickled object of a class the reader does not build: its name, args and state."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def append(self, item):             # list subclasses
    self.items.append(item)

  def extend(self, items):
    self.items.extend(items)

  def __setitem__(self, key, value):  # dict subclasses
    self.items.append((key, value))

  def __repr__(self):
    return f"Opaque({self.qualname})"


_OPAQUE_TYPES: Dict[str, type] = {}


def _opaque_class(qualname: str) -> type:
  """A stand-in class (one per pickled name) that records instead of running anything."""
  if qualname not in _OPAQUE_TYPES:
    _OPAQUE_TYPES[qualname] = type(qualname.rsplit(".", 1)[-1], (Opaque,),
                                   {"qualname": qualname})
  return _OPAQUE_TYPES[qualname]


class _StorageType:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2``: a strided view of a flat storage, copied."""
  del unused
  flat = storage
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return np.array(flat[offset])
  need = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
  if need > flat.size:
    raise WeightFileError(f"a tensor of shape {size} reaches element {need} of a storage of "
                          f"{flat.size}: the file is damaged")
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "dict"): dict, ("__builtin__", "dict"): dict,
    ("builtins", "list"): list, ("__builtin__", "list"): list,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, load_storage):
    super().__init__(io.BytesIO(data))
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name == "BFloat16Storage":
      return _StorageType(_bfloat16())
    if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64",
                                      "int32", "uint8", "bool", "device"):
      return _opaque_class(f"torch.{name}")
    return _opaque_class(f"{module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise WeightFileError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    else:
      raise WeightFileError(f"storage of an unsupported type {storage_type!r}")
    return self._load_storage(str(key), dtype, int(numel))


def read_torch_checkpoint(path: str) -> Any:
  """The object saved by ``torch.save`` at ``path``, tensors as NumPy arrays.

  Raises:
    WeightFileError: missing file, not a zip archive (or the legacy format), truncated
      or damaged.
  """
  if not os.path.isfile(path):
    raise WeightFileError(f"{path} does not exist.")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":
      raise WeightFileError(
          f"{path} is a PyTorch file in the legacy (pre-1.6) format, which this reader does not "
          "handle: re-save it with a current PyTorch (torch.save(torch.load(p), p)).")
    raise WeightFileError(f"{path} is not a PyTorch checkpoint (a torch.save zip archive); it "
                          "may be truncated (an interrupted download) or another format.")
  try:
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise WeightFileError(f"{path} is a zip file without data.pkl: not a PyTorch checkpoint.")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if f"{prefix}byteorder" in names:
      order = zf.read(f"{prefix}byteorder").decode().strip() or "little"
    cache: Dict[str, np.ndarray] = {}

    def load_storage(key: str, dtype, numel: int) -> np.ndarray:
      if key not in cache:
        raw = zf.read(f"{prefix}data/{key}")
        dt = np.dtype(dtype).newbyteorder("<" if order == "little" else ">")
        if len(raw) < numel * dt.itemsize:
          raise WeightFileError(f"storage {key} holds {len(raw)} bytes, {numel * dt.itemsize} "
                                "expected")
        cache[key] = np.frombuffer(raw, dt, count=numel).astype(np.dtype(dtype))
      return cache[key]

    return _Unpickler(zf.read(pkl[0]), load_storage).load()
  except WeightFileError as e:
    if str(e).startswith(path):
      raise
    raise WeightFileError(f"{path}: {e}") from e
  except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError,
          OSError, zipfile.LargeZipFile) as e:
    raise WeightFileError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); download "
                          "it again.") from e


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """``{name: array}`` of a safetensors file (no torch needed).

  Raises:
    WeightFileError: missing, truncated or not a safetensors file.
  """
  if not os.path.isfile(path):
    raise WeightFileError(f"{path} does not exist.")
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise WeightFileError("Reading .safetensors files needs the safetensors package: "
                          "pip install safetensors") from e
  try:
    return dict(load_file(path))
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "bf16" in msg.lower() or "bfloat16" in msg.lower():
      return _read_safetensors_bf16(path)
    raise WeightFileError(f"{path} is not a readable safetensors file ({msg}); it may be "
                          "truncated: download it again.") from e


def _read_safetensors_bf16(path: str) -> Dict[str, np.ndarray]:
  """safetensors files with bfloat16 tensors (NumPy has no bf16: read through ml_dtypes)."""
  import json  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  kinds = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "BF16": _bfloat16()}
  with open(path, "rb") as f:
    data = f.read()
  try:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
  except Exception as e:  # pylint: disable=broad-except
    raise WeightFileError(f"{path} is not a readable safetensors file ({e}).") from e
  out, base = {}, 8 + n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, stop = info["data_offsets"]
    if base + stop > len(data):
      raise WeightFileError(f"{path} is truncated: tensor {name} ends past the end of the file.")
    out[name] = np.frombuffer(data[base + start: base + stop],
                              kinds[info["dtype"]]).reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: Dict[str, np.ndarray],
                      metadata: Dict[str, str] | None = None) -> None:
  """Writes ``{name: array}`` as safetensors (what ``safetensors.torch.load_file`` reads)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def plain(obj: Any) -> Any:
  """OmegaConf records (``DictConfig``, ``ListConfig``, value nodes) as dicts, lists and values;
  other ``Opaque`` records stay as they are, containers are converted recursively."""
  if isinstance(obj, Opaque):
    state = obj.state
    if isinstance(state, dict) and "_content" in state:
      content = state["_content"]
      if isinstance(content, dict):
        return {k: plain(v) for k, v in content.items()}
      if isinstance(content, (list, tuple)):
        return [plain(v) for v in content]
      return plain(content)
    if isinstance(state, dict) and "_val" in state:
      return plain(state["_val"])
    return obj
  if isinstance(obj, dict):
    return {k: plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(plain(v) for v in obj)
  return obj
