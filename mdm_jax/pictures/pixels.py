"""Pixel values and PNG files: level quantisation, image grids, a dependency-free PNG codec.

Every picture the library writes (sample grids, masking pictures, order pictures)
goes through ``write_png``; ``read_png`` reads those files back.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from mdm_jax.core import paths


# ------------------------------------------------------------------ quantisation
def quantize(x: np.ndarray, num_levels: int) -> np.ndarray:
  """uint8 0..255 -> level ids 0..num_levels-1 (uniform bins of 256/num_levels values)."""
  k = check_levels(num_levels)
  x = np.asarray(x)
  if k == 256:
    return x.astype(np.uint8)
  return ((x.astype(np.int32) * k) >> 8).astype(np.uint8)


def dequantize(q: np.ndarray, num_levels: int) -> np.ndarray:
  """Level ids -> uint8 pixel values at the middle of each level's bin (exact for 256)."""
  k = check_levels(num_levels)
  q = np.clip(np.asarray(q).astype(np.int64), 0, k - 1)
  if k == 256:
    return q.astype(np.uint8)
  lo = -((-q * 256) // k)                   # ceil(q * 256 / k): first value in bin q
  hi = -((-(q + 1) * 256) // k) - 1         # last value in bin q
  return ((lo + hi) // 2).astype(np.uint8)


def check_levels(num_levels: int) -> int:
  k = int(num_levels)
  if not 2 <= k <= 256:
    raise ValueError(f"data.num_levels must be in [2, 256], got {num_levels}.")
  return k


# ------------------------------------------------------------------ PNG output
def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W] / [H, W, 1] / [H, W, 3] -> PNG bytes (stdlib zlib; no Pillow needed)."""
  a = np.asarray(image, np.uint8)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    color = 0
  elif a.ndim == 3 and a.shape[2] == 3:
    color = 2
  else:
    raise ValueError(f"encode_png takes [H, W], [H, W, 1] or [H, W, 3], got {a.shape}.")
  h, w = a.shape[:2]
  raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
          + chunk(b"IEND", b""))


def image_grid(images: np.ndarray, ncols: int = 0, pad: int = 1, scale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid."""
  images = np.asarray(images, np.uint8)
  n, h, w, c = images.shape
  ncols = int(ncols) or int(np.ceil(np.sqrt(n)))
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h,
         pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
  if scale > 1:
    grid = grid.repeat(scale, 0).repeat(scale, 1)
  return grid


def write_png(path: str, image: np.ndarray) -> str:
  if not paths.is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with paths.open(path, "wb") as f:
    f.write(encode_png(image))
  return path


def read_png(path: str) -> np.ndarray:
  """Reads an 8-bit grey or RGB, non-interlaced PNG written by ``encode_png`` (filter 0 rows)."""
  with paths.open(path, "rb") as f:
    b = f.read()
  assert b[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
  i, idat, w, h, color = 8, b"", 0, 0, 0
  while i < len(b):
    n, kind = struct.unpack(">I4s", b[i:i + 8])
    data = b[i + 8:i + 8 + n]
    if kind == b"IHDR":
      w, h, _, color = struct.unpack(">IIBB", data[:10])
    elif kind == b"IDAT":
      idat += data
    i += 12 + n
  c = 3 if color == 2 else 1
  raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
  if raw[:, 0].any():
    raise ValueError("read_png only reads unfiltered rows (as written by encode_png).")
  return raw[:, 1:].reshape(h, w, c)


# ------------------------------------------------------------------ tokenizer
