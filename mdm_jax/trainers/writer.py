"""Metrics to JSONL, TensorBoard and (optionally) Weights & Biases; a progress line.

Scalars go to ``metrics.jsonl`` and TensorBoard; pictures (sample grids, masking and
decoding-order pictures, already written as PNG files) and sample texts go to
TensorBoard's Images and Text tabs, and to wandb when ``wandb.enabled`` is set.
"""

from __future__ import annotations

import html
import io
import json
import os
import struct
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, Mapping, Optional

from absl import logging

from mdm_jax.core import paths
from mdm_jax.core.errors import ConfigError

SYNC_EVERY_S = 30.0   # a bucket workdir: how often the staged logs are copied up


def png_summary(tag: str, png: bytes):
  """A TensorBoard image summary of an encoded PNG (no decoding, no re-encoding)."""
  from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=import-outside-toplevel
  if png[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError(f"{tag}: not a PNG file")
  width, height = struct.unpack(">II", png[16:24])
  colorspace = {0: 1, 2: 3, 4: 2, 6: 4}.get(png[25], 3)   # grey, RGB, grey+alpha, RGBA
  image = Summary.Image(height=height, width=width, colorspace=colorspace,
                        encoded_image_string=png)
  return Summary(value=[Summary.Value(tag=tag, image=image)])


class WandbWriter:
  """The optional experiment tracker (``config.wandb``; ``pip install 'mdm_jax[wandb]'``).

  The run's id is kept in ``workdir/wandb_id.txt`` so that a resumed run continues the same
  wandb run; ``wandb.mode = "offline"`` writes under ``workdir/wandb`` for a later
  ``wandb sync``.
  """

  def __init__(self, workdir: str, settings: Mapping[str, Any], config_dict: Optional[dict]):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ConfigError("wandb.enabled=True needs the wandb package: pip install "
                        "'mdm_jax[wandb]' (or set --config.wandb.enabled=False).") from e
    self._wandb = wandb
    id_path = paths.join(workdir, "wandb_id.txt")
    run_id = (paths.read_text(id_path).strip() if paths.exists(id_path)
              else uuid.uuid4().hex[:12])
    paths.atomic_write(id_path, run_id + "\n")
    local_dir = workdir if not paths.is_remote(workdir) else tempfile.mkdtemp(prefix="mdm_wandb_")
    self.run = wandb.init(
        project=str(settings.get("project") or "mdm_jax"), entity=settings.get("entity") or None,
        name=settings.get("name") or paths.basename(workdir),
        mode=str(settings.get("mode") or "online"), dir=local_dir, id=run_id, resume="allow",
        config=config_dict or {}, settings=wandb.Settings(console="off", silent=True))

  def scalars(self, step: int, scalars: Dict[str, float]) -> None:
    self.run.log(dict(scalars), step=int(step))

  def images(self, step: int, pngs: Dict[str, bytes]) -> None:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    self.run.log({k: self._wandb.Image(Image.open(io.BytesIO(png))) for k, png in pngs.items()},
                 step=int(step))

  def texts(self, step: int, texts: Dict[str, str]) -> None:
    self.run.log({k: self._wandb.Html(f"<pre>{html.escape(t)}</pre>") for k, t in texts.items()},
                 step=int(step))

  def close(self) -> None:
    self.run.finish()


class MetricsWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard event files, and pictures
  and texts to TensorBoard (and wandb, with ``wandb``: the config's ``wandb`` block).

  In a bucket workdir (``gs://``) the files are written in a local staging folder and
  copied up every ``SYNC_EVERY_S`` seconds and at ``close`` (objects cannot be appended
  to); a killed run loses at most that much of its log, never a checkpoint.

  ``resume_step``: the step the run continues from.  Lines of ``metrics.jsonl`` written
  after it (by the interrupted run, for steps that are now trained again) get
  ``"superseded": true``, so a reader keeps the others and sees every step once;
  TensorBoard purges them.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None,
               wandb: Optional[Mapping[str, Any]] = None, config_dict: Optional[dict] = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._wandb: Optional[WandbWriter] = None
    self.superseded = 0
    self.workdir = workdir
    self._stage: Optional[str] = None
    self._synced: Dict[str, tuple] = {}
    self._last_sync = time.time()
    if not enabled:
      return
    if paths.is_remote(workdir):
      self._stage = tempfile.mkdtemp(prefix="mdm_jax_logs_")
      if paths.exists(paths.join(workdir, "metrics.jsonl")):
        paths.download(paths.join(workdir, "metrics.jsonl"),
                       os.path.join(self._stage, "metrics.jsonl"))
    local = self._stage or workdir
    path = os.path.join(local, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      self.superseded = mark_superseded(path, resume_step)
      if self.superseded:
        logging.info("metrics.jsonl: %d lines after step %d marked superseded (replayed).",
                     self.superseded, resume_step)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(local, "tensorboard"),
                               purge_step=resume_step or None)
    except ImportError:  # optional
      logging.warning("tensorboardX is not installed; writing metrics.jsonl only.")
    if wandb is not None and wandb.get("enabled"):
      self._wandb = WandbWriter(workdir, wandb, config_dict)

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    rec = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.scalars(step, scalars)
    self.sync()

  def sync(self, force: bool = False) -> None:
    """Copies the staged files that changed up to a bucket workdir (at most every
    ``SYNC_EVERY_S`` seconds unless ``force``)."""
    if self._stage is None or (not force and time.time() - self._last_sync < SYNC_EVERY_S):
      return
    paths.upload_tree(self._stage, self.workdir, uploaded=self._synced)
    self._last_sync = time.time()

  def write_images(self, step: int, images: Mapping[str, str]) -> None:
    """``images``: tag -> path of a PNG file (a sample grid, a masking or order picture)."""
    if not self.enabled:
      return
    pngs = {k: paths.read_bytes(p) for k, p in images.items() if p and paths.exists(p)}
    if not pngs:
      return
    if self._tb is not None:
      fw = self._tb._get_file_writer()  # pylint: disable=protected-access
      for tag, png in pngs.items():
        fw.add_summary(png_summary(tag, png), int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.images(step, pngs)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """``texts``: tag -> text (shown preformatted in TensorBoard's Text tab)."""
    if not self.enabled or not texts:
      return
    if self._tb is not None:
      for tag, text in texts.items():   # Markdown: indented lines are shown verbatim
        self._tb.add_text(tag, "\n".join("    " + l for l in text.splitlines()), int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.texts(step, dict(texts))

  def write_samples(self, step: int, out: Mapping[str, Any], max_texts: int = 4) -> None:
    """What ``sample_and_write`` returned: its PNG files as images, its texts as text."""
    self.write_images(step, {f"samples/{k[:-len('_png')]}": v for k, v in out.items()
                             if k.endswith("_png") and isinstance(v, str)})
    texts = list(out.get("texts") or [])[:max_texts]
    if texts:
      self.write_texts(step, {"samples/text": "\n\n".join(
          f"--- sample {i} ---\n{t}" for i, t in enumerate(texts))})

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
    if self._wandb:
      self._wandb.close()
    self.sync(force=True)


def mark_superseded(path: str, last_step: int) -> int:
  """Marks the lines of a metrics file with ``step > last_step`` as ``"superseded": true``
  (they came from an interrupted run and those steps are trained again); a torn last line
  (a crash mid-write) is dropped.  Atomic; returns how many lines were newly marked."""
  out, marked, changed = [], 0, False
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
        step = int(rec.get("step", 0))
      except (ValueError, TypeError, AttributeError):
        changed = True
        continue
      if step > last_step and not rec.get("superseded"):
        rec["superseded"] = True
        marked += 1
        changed = True
        line = json.dumps(rec) + "\n"
      out.append(line if line.endswith("\n") else line + "\n")
  if changed:
    paths.atomic_write(path, "".join(out))
  return marked


def format_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """A progress line: bar, step, loss, steps/s, tokens/s and ETA."""

  def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True,
               stream=None, label: str = "", shown=(("loss", "loss"),)):
    self.total, self.start, self.tokens_per_step = total, start, tokens_per_step
    self.enabled = enabled
    self.label = label       # "<label> step/total" instead of the bar
    self.shown = tuple(shown)   # (metric, name on the line) pairs
    self.stream = stream or sys.stderr
    self._t0: Optional[float] = None
    self._step0 = start
    self._last = (start, time.time())
    self._rate = 0.0

  def rates(self) -> Dict[str, float]:
    return {"perf/steps_per_sec": self._rate,
            "perf/tokens_per_sec": self._rate * self.tokens_per_step}

  def update(self, step: int, metrics: Dict[str, float]) -> None:
    now = time.time()
    if self._t0 is None:   # the first report includes compilation; rates start after it
      self._t0, self._step0 = now, step
      self._rate = 0.0
    else:
      self._rate = (step - self._step0) / max(now - self._t0, 1e-9)
    if not self.enabled:
      return
    frac = step / max(self.total, 1)
    bar = "#" * int(25 * frac) + "." * (25 - int(25 * frac))
    eta = (self.total - step) / self._rate if self._rate > 0 else float("nan")
    head = f"{self.label} {step}/{self.total}" if self.label else f"[{bar}] {step}/{self.total}"
    parts = [head] + [f"{name} {metrics.get(key, float('nan')):.4f}" for key, name in self.shown]
    if self._rate > 0:
      parts += [f"{self._rate:.2f} steps/s", f"{self._rate * self.tokens_per_step:,.0f} tok/s",
                f"ETA {format_time(eta)}"]
    else:
      parts += ["(compiling / warming up)"]
    self.message(" | ".join(parts))

  def message(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)
