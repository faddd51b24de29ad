"""One path layer for local folders and buckets (``gs://bucket/...``).

Every file the program reads or writes in a workdir goes through these functions, so a
workdir, a tokenizer folder or a config file may be a bucket path.  Local paths use the
operating system directly (nothing changes for them); ``gs://`` paths use ``etils.epath``,
the path library of Orbax and MD4, whose ``gs://`` backend is ``gcsfs`` (``pip install
'mdm_jax[gcs]'``) or TensorFlow's ``gfile`` where TensorFlow is installed.  Checkpoint
arrays go to the bucket through Orbax and TensorStore directly.

Object stores have no appends and no atomic folder renames: ``atomic_write`` writes a
whole object (an object appears whole or not at all), and files that grow (the metrics
log, TensorBoard events) are written in a local staging folder and copied up
(``mdm_jax.trainers.writer``).

Pointing it at a GCS emulator (tests, ``docs/cloud.md``): ``STORAGE_EMULATOR_HOST`` for
gcsfs and ``TENSORSTORE_GCS_HTTP_URL`` for TensorStore, both ``http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import tempfile
import uuid
from typing import IO, Iterator, List, Optional

from mdm_jax.core.errors import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SUPPORTED_SCHEMES = ("gs",)


def scheme(path: str) -> Optional[str]:
  """``"gs"`` for ``gs://b/x``; None for a local path."""
  m = _SCHEME.match(str(path))
  return m.group(1).lower() if m else None


def is_remote(path: str) -> bool:
  return scheme(path) is not None


def check_backend(path: str) -> None:
  """Raises a ConfigError that says what to change when nothing can handle ``path``."""
  s = scheme(path)
  if s is None:
    return
  if s not in SUPPORTED_SCHEMES:
    raise ConfigError(
        f"{path}: the {s}:// scheme is not supported. Use a local path or a Cloud Storage "
        "bucket (gs://BUCKET/PATH); a bucket mounted with gcsfuse/s3fs works as a local path.")
  try:
    import gcsfs  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise ConfigError(
          f"{path}: gs:// paths need the gcsfs package: pip install 'mdm_jax[gcs]'.") from e


def resolve(path: str) -> str:
  """A canonical form: local paths absolute (``~`` expanded), bucket paths without a
  trailing slash; fails with a clear error for a scheme nothing handles."""
  path = str(path)
  if not is_remote(path):
    return os.path.abspath(os.path.expanduser(path))
  check_backend(path)
  return path.rstrip("/")


def check_writable(folder: str) -> None:
  """Writes and deletes a small object in a bucket folder, so that a missing bucket or
  missing credentials stop the run before any training (local folders: nothing)."""
  if not is_remote(folder):
    return
  probe = join(folder, f".mdm_jax_write_check_{uuid.uuid4().hex[:8]}")
  try:
    makedirs(folder)
    with open(probe, "w") as f:
      f.write("ok")
    remove(probe)
  except Exception as e:  # pylint: disable=broad-except  (every backend has its own errors)
    first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise ConfigError(
        f"Cannot write to {folder}: {type(e).__name__}: {first[:300]}. Check that the bucket "
        "exists and that this machine's credentials may write to it (gcloud auth "
        "application-default login, or the VM's service account).") from e


def _epath(path: str):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path)


def join(path: str, *parts: str) -> str:
  if is_remote(path):
    return "/".join([str(path).rstrip("/"), *[p.strip("/") for p in parts]])
  return os.path.join(path, *parts)


def basename(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> List[str]:
  """Names in a folder ([] when it does not exist)."""
  if is_remote(path):
    p = _epath(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def glob(folder: str, pattern: str) -> List[str]:
  """Paths in ``folder`` whose names match ``pattern`` (no recursion)."""
  if is_remote(folder):
    p = _epath(folder)
    return sorted(str(c) for c in p.glob(pattern)) if p.exists() else []
  import glob as glob_lib  # pylint: disable=import-outside-toplevel
  return sorted(glob_lib.glob(os.path.join(folder, pattern)))


def open(path: str, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  if is_remote(path):
    if "a" in mode:
      raise ValueError(f"{path}: objects in a bucket cannot be appended to")
    return _epath(path).open(mode)
  return builtins.open(path, mode)


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def atomic_write(path: str, data) -> str:
  """Writes ``data`` (str as UTF-8, or bytes) so that a reader sees the old or the new file,
  never a part: a uniquely named temporary file renamed over it locally (several processes
  may write the same file at once; an interrupt leaves no temporary file), one whole object
  in a bucket."""
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_remote(path):
    with open(path, mode) as f:
      f.write(data)
    return path
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with builtins.open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def remove(path: str) -> None:
  if is_remote(path):
    p = _epath(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """Moves a file or folder (in a bucket: copies, then deletes)."""
  if is_remote(src) or is_remote(dst):
    _epath(src).rename(_epath(dst))
  else:
    os.replace(src, dst)


def getsize(path: str) -> int:
  return int(_epath(path).stat().length) if is_remote(path) else os.path.getsize(path)


def walk_files(folder: str) -> List[str]:
  """Every file under ``folder``, as paths relative to it, sorted."""
  if is_remote(folder):
    fs, root = _fsspec(folder)
    if not fs.exists(root):
      return []
    return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(root))
  out = []
  for d, _, files in os.walk(folder):
    out += [os.path.relpath(os.path.join(d, f), folder) for f in files]
  return sorted(out)


def tree_bytes(folder: str) -> int:
  """Bytes of every file under ``folder`` (one listing call in a bucket)."""
  if is_remote(folder):
    fs, root = _fsspec(folder)
    return int(fs.du(root)) if fs.exists(root) else 0
  total = 0
  for d, _, files in os.walk(folder):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(d, f))
      except OSError:
        pass
  return total


def object_info(path: str) -> dict:
  """Size and the server's CRC32C of an object in a bucket (what GCS verified on upload)."""
  fs, p = _fsspec(path)
  info = fs.info(p)
  return {"size": int(info.get("size", 0)), "crc32c": info.get("crc32c")}


def _fsspec(path: str):
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, p = fsspec.core.url_to_fs(path)
  return fs, p


@contextlib.contextmanager
def local_copy_for_write(path: str) -> Iterator[str]:
  """A local file path to write to; copied to ``path`` (local or a bucket) on exit.

  For libraries that only write local files (tokenizer ``save``, ``np.save`` callers)."""
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, basename(path))
    yield local
    upload(local, path)


@contextlib.contextmanager
def local_copy_for_read(path: str) -> Iterator[str]:
  """A local file with the contents of ``path`` (itself when local), for libraries that only
  read local files (tokenizer ``load``); a bucket object is downloaded and removed after."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, basename(path))
    download(path, local)
    yield local


def upload(local: str, remote: str) -> None:
  with builtins.open(local, "rb") as src, open(remote, "wb") as dst:
    shutil.copyfileobj(src, dst, 4 << 20)


def upload_tree(local_dir: str, remote_dir: str, uploaded: Optional[dict] = None) -> None:
  """Copies every file under ``local_dir`` to the same place under ``remote_dir``.  With
  ``uploaded`` (a dict kept by the caller), files unchanged since their last upload (same
  size and modification time) are skipped."""
  for d, _, files in os.walk(local_dir):
    for f in files:
      local = os.path.join(d, f)
      st = os.stat(local)
      key = (st.st_size, st.st_mtime_ns)
      if uploaded is not None and uploaded.get(local) == key:
        continue
      rel = os.path.relpath(local, local_dir)
      upload(local, join(remote_dir, *rel.split(os.sep)))
      if uploaded is not None:
        uploaded[local] = key


def download(remote: str, local: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  with open(remote, "rb") as src, builtins.open(local, "wb") as dst:
    shutil.copyfileobj(src, dst, 4 << 20)


def publish_directory(tmp: str, final: str) -> None:
  """Moves the finished local directory ``tmp`` to ``final`` by renames, replacing an old
  ``final`` (set aside first, removed after), so ``final`` is never half-written."""
  old = None
  if os.path.lexists(final):
    old = f"{final}.old-{uuid.uuid4().hex[:8]}"
    os.replace(final, old)
  os.replace(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
