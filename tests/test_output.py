"""What a run shows people: a quiet console, TensorBoard images and texts, wandb (offline).

One tiny training run with the optional wandb writer in offline mode; its console, its
TensorBoard event file (read back with tensorboardX's protobufs) and its wandb folder
are checked, then ``--verbosity=1`` brings the libraries' INFO lines back.
"""

import glob
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from mdm_jax.pictures.pixels import read_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=shakespeare_prime:tiny", "--config.training.num_steps=20",
        "--config.eval.every_steps=0", "--config.checkpoint.keep_best=0"]
LIBRARY_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")


def _run(workdir, *extra):
  env = dict(os.environ, WANDB_SILENT="true")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", *ARGS, *extra,
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  pytest.importorskip("wandb")
  workdir = str(tmp_path_factory.mktemp("out") / "run")
  proc = _run(workdir, "--config.wandb.enabled=True", "--config.wandb.mode=offline")
  return workdir, proc


def _events(workdir):
  """Every Event in the run's TensorBoard files (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    data, i = open(path, "rb").read(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[i + 12:i + 12 + n])
      out.append(ev)
      i += 12 + n + 4
  return out


def test_console_is_our_lines_and_says_where_the_files_went(run):
  workdir, proc = run
  lines = (proc.stdout + proc.stderr).splitlines()
  assert not [l for l in lines if LIBRARY_LINE.match(l)], "library log lines at verbosity 0"
  assert len(lines) < 40, len(lines)
  assert any(l.startswith("[") and "20/20" in l and "tok/s" in l for l in lines)
  wrote = [l for l in lines if l.startswith(f"Wrote {workdir}:")]
  assert len(wrote) == 1 and "samples/step_20.txt" in wrote[0] and "checkpoints/20" in wrote[0]
  assert "tensorboard --logdir" in wrote[0]


def test_verbosity_1_brings_the_library_info_lines_back(run, tmp_path):
  workdir, _ = run
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", *ARGS, f"--workdir={workdir}",
                         "--mode=eval", "--verbosity=1"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  library = [l for l in proc.stderr.splitlines() if LIBRARY_LINE.match(l)]
  assert any("checkpoint" in l.lower() for l in library), proc.stderr[-2000:]


def test_tensorboard_gets_scalars_the_masking_picture_and_sample_texts(run):
  workdir, _ = run
  events = _events(workdir)
  tags = {}
  for ev in events:
    for v in ev.summary.value:
      tags.setdefault(v.tag, []).append((ev.step, v))
  assert "train/loss" in tags and len(tags["train/loss"]) == 20 // 10   # log_every=10 (tiny)
  (step, img), = tags["samples/masking"]
  png_path = os.path.join(workdir, "samples", "step_20_masking.png")
  assert step == 20 and img.image.encoded_image_string == open(png_path, "rb").read()
  picture = read_png(png_path)
  assert (img.image.height, img.image.width) == picture.shape[:2]
  (step, text), = tags["samples/text/text_summary"]   # tensorboardX appends the suffix
  shown = text.tensor.string_val[0].decode()
  first_sample = open(os.path.join(workdir, "samples", "step_20.txt")).read().split("\n")[1]
  assert step == 20 and first_sample[:40] in shown


def test_wandb_offline_run_holds_the_scalars_texts_and_pictures(run):
  workdir, _ = run
  runs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  assert len(runs) == 1
  run_id = open(os.path.join(workdir, "wandb_id.txt")).read().strip()
  assert runs[0].endswith(run_id)
  log = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
  for key in (b"train/loss", b"perf/tokens_per_sec", b"samples/masking", b"samples/text"):
    assert key in log, key
  media = glob.glob(os.path.join(runs[0], "files", "media", "images", "samples", "masking_20_*.png"))
  assert len(media) == 1
  from PIL import Image  # pylint: disable=import-outside-toplevel
  logged = np.asarray(Image.open(media[0]).convert("RGB"))   # wandb re-encodes the PNG
  assert (logged == read_png(os.path.join(workdir, "samples", "step_20_masking.png"))).all()
  assert glob.glob(os.path.join(runs[0], "files", "media", "html", "samples", "text_20_*.html"))


def test_wandb_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
  from mdm_jax.core.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.writer import MetricsWriter  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, "wandb", None)     # as if not installed
  with pytest.raises(ConfigError, match=r"pip install 'mdm_jax\[wandb\]'"):
    MetricsWriter(str(tmp_path), wandb={"enabled": True, "mode": "offline"})


def test_profiler_traces_the_configured_steps(tmp_path):
  """profile.start_step/num_steps: a trace TensorBoard/XProf open, with one annotated
  step per traced training step and the jitted train step inside."""
  import gzip  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  proc = _run(workdir, "--config.profile.start_step=12", "--config.profile.num_steps=3")
  assert "profile: traced steps 12-14" in proc.stderr
  runs = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*"))
  assert len(runs) == 1
  xplane = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  assert len(xplane) == 1 and os.path.getsize(xplane[0]) > 10_000
  trace = json.load(gzip.open(glob.glob(os.path.join(runs[0], "*.trace.json.gz"))[0]))
  steps = sorted(int(e["args"]["step_num"]) for e in trace["traceEvents"]
                 if e.get("name") == "train")
  assert steps == [12, 13, 14]
  assert any("PjitFunction" in str(e.get("name")) for e in trace["traceEvents"])
