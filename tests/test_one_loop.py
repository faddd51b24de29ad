"""Di[M]O distillation and the feature classifier run on the common train loop
(trainers/loop.py), and so inherit its preemption saves, finiteness checks, workdir lock,
path handling and checkpoints; workdirs of the layout before it still restore.

Tiny models, in process; SIGTERM is delivered to this process by the loop's own metrics
hook at a chosen step, exactly as a launcher's signal would arrive between two steps."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from mdm_jax.core import sharding as shd
from mdm_jax.core.config import to_dict
from mdm_jax.data import build_data
from mdm_jax.tasks import build_task
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers import distill, loop
from mdm_jax.trainers.classifier import train_classifier
from mdm_jax.trainers.preemption import Preempted
from mdm_jax.trainers.state import init_state, make_optimizer, state_shardings
from mdm_jax.trainers.workdir_lock import WorkdirBusy
from tests.test_distill import SIDE, _config

STEPS = 4


def _image_config(folder):
  c = _config()
  c.data.path, c.data.dataset, c.data.channels = str(folder), "image_folder", 1
  c.data.eval_fraction, c.data.max_eval_examples, c.data.max_train_examples = 0.25, 0, 0
  c.distill.batch_size, c.distill.log_every, c.distill.num_samples = 8, 1, 0
  c.distill.num_steps, c.distill.checkpoint_every = STEPS, 100
  c.checkpoint.async_save = False
  return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """(config, teacher workdir, reference distill workdir): an uninterrupted Di[M]O run."""
  from PIL import Image
  root = tmp_path_factory.mktemp("oneloop")
  rng = np.random.default_rng(0)
  for cls in ("dark", "light"):
    (root / "imgs" / cls).mkdir(parents=True)
    for i in range(8):
      base = 40 if cls == "dark" else 200
      Image.fromarray(np.clip(rng.normal(base, 20, (SIDE, SIDE)), 0, 255).astype(np.uint8)).save(
          root / "imgs" / cls / f"{i}.png")
  c = _image_config(root / "imgs")
  teacher_wd = str(root / "teacher")
  data = build_data(c.data)
  task = build_task(c, data.tokenizer.vocab_size)
  tx, _ = make_optimizer(c.training)
  state, _ = init_state(task, tx, shd.make_mesh(c.mesh), shd.logical_rules(c.mesh), 0)
  ck = ckpt_lib.Checkpointer(os.path.join(teacher_wd, "checkpoints"), async_save=False)
  ck.save(5, state, None, to_dict(c), force=True)
  ck.close()
  ref = str(root / "reference")
  res = distill.distill(c, teacher_wd, ref)
  assert res["step"] == STEPS and res["method"] == "Di[M]O"
  return c, teacher_wd, ref


def _records(workdir, key):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    if key in rec and not rec.get("superseded"):
      out.setdefault(rec["step"], []).append(rec[key])
  return out


def _sigterm_at(monkeypatch, step):
  """SIGTERM to this process right after step ``step``'s metrics are logged."""
  original = loop._log_train_metrics

  def log_then_signal(ctx, done, metrics):
    original(ctx, done, metrics)
    if done == step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop, "_log_train_metrics", log_then_signal)


def _checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_distill_sigterm_saves_the_step_and_resumes_with_identical_losses(teacher, tmp_path,
                                                                         monkeypatch):
  c, teacher_wd, ref = teacher
  wd = str(tmp_path / "dimo")
  with monkeypatch.context() as m:
    _sigterm_at(m, 2)
    with pytest.raises(Preempted, match="stopped after step 2"):
      distill.distill(c, teacher_wd, wd)
  assert _checkpoint_steps(wd) == [2]          # saved on the signal, not on schedule (100)
  res = distill.distill(c, teacher_wd, wd)      # the same command resumes at step 2
  assert res["step"] == STEPS
  for key in ("distill/gen_loss", "distill/aux_loss", "distill/fkl"):
    got, want = _records(wd, key), _records(ref, key)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    for step, (v,) in got.items():
      np.testing.assert_allclose(v, want[step][0], rtol=1e-5, err_msg=f"{key} step {step}")
  assert not os.path.exists(os.path.join(wd, "mdm_jax.lock"))   # released


def test_distill_non_finite_is_caught_like_the_main_loop(teacher, tmp_path):
  c, teacher_wd, _ = teacher
  bad = c.copy_and_resolve_references()
  bad.distill.learning_rate, bad.distill.grad_clip = 1e30, 0.0
  bad.distill.warmup_steps, bad.distill.checkpoint_every = 0, 1
  wd = str(tmp_path / "dimo")
  with pytest.raises(FloatingPointError) as e:
    distill.distill(bad, teacher_wd, wd)
  msg = str(e.value)
  assert "non-finite" in msg or "became nan" in msg or "became inf" in msg, msg
  assert "distill.learning_rate" in msg
  # Nothing non-finite was ever committed.
  for step in _checkpoint_steps(wd):
    abstract, _ = _abstract(c)
    state = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True,
                                  async_save=False).restore(abstract, step=step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_distill_holds_the_workdir_lock_and_keeps_paths_as_given(teacher, tmp_path, monkeypatch):
  c, teacher_wd, _ = teacher
  wd = str(tmp_path / "busy")
  os.makedirs(wd)
  with loop.WorkdirLock(wd):
    with pytest.raises(WorkdirBusy):
      distill.distill(c, teacher_wd, wd)
  # A bucket workdir reaches the loop as given (no os.path.abspath), a local one absolute.
  seen = {}
  monkeypatch.setattr(loop, "train", lambda workdir, build: seen.setdefault("wd", workdir))
  monkeypatch.setattr(distill.paths, "check_backend", lambda path: None)
  distill.distill(c, teacher_wd, "gs://bucket/runs/dimo/")
  assert seen.pop("wd") == "gs://bucket/runs/dimo"
  monkeypatch.chdir(tmp_path)
  distill.distill(c, teacher_wd, "rel/dimo")
  assert seen.pop("wd") == str(tmp_path / "rel" / "dimo")


def test_distill_samples_on_every_process(teacher, monkeypatch):
  """The loop's samples are drawn by every process of a multi-process job (process 1 of 2
  here), and the task's one-step generator has no process-0-only branch."""
  c, teacher_wd, _ = teacher
  run = distill.build_distill_run(c, teacher_wd, str(teacher[2]))
  calls = []
  monkeypatch.setattr(loop.jax, "process_index", lambda: 1)
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop, "sample_and_write",
                      lambda task, params, *a, write, **k: calls.append(write) or {})
  ctx = loop._Loop(run=run, workdir="unused", lock=None, ckpt=None, best_ckpt=None,
                   train_iter=None, cfg_dict={}, writer=type("W", (), {
                       "write_samples": lambda self, step, out: None})())
  loop._write_samples(ctx, type("S", (), {"params": None, "ema_params": None})(), STEPS)
  assert calls == [False]                     # sampled on process 1, written by process 0
  monkeypatch.undo()
  mesh = run.mesh
  params = {"generator": run.task.frozen}
  res, stats = run.task.generate(params, c, num_samples=8, mesh=mesh)
  assert res.tokens.is_fully_replicated and stats["nfe"] == 1   # every process holds all rows
  assert res.tokens.shape == (8, SIDE * SIDE)


def _abstract(c):
  data = build_data(c.data)
  base = build_task(c, data.tokenizer.vocab_size)
  task = distill.DistillTask(base, distill.DistillSettings.from_config(c))
  abstract, shardings = state_shardings(task, distill.optimizers(c), shd.make_mesh(c.mesh),
                                        shd.logical_rules(c.mesh))
  return ckpt_lib.abstract_with_shardings(abstract, shardings), shardings


def test_a_distill_workdir_of_the_old_layout_restores_and_resumes(teacher, tmp_path):
  c, _, ref = teacher
  abstract, _ = _abstract(c)
  ck = ckpt_lib.Checkpointer(os.path.join(ref, "checkpoints"), read_only=True, async_save=False)
  state = ck.restore(abstract, step=STEPS)
  ck.close()
  old_wd = str(tmp_path / "old")
  ck = ckpt_lib.Checkpointer(os.path.join(old_wd, "checkpoints"), async_save=False)
  ck.save(STEPS, distill._to_legacy(state), None, to_dict(c), force=True)
  ck.close()
  ck = ckpt_lib.Checkpointer(os.path.join(old_wd, "checkpoints"), async_save=False)
  assert distill.is_legacy_step(ck, STEPS) and not distill.is_legacy_step(
      ckpt_lib.Checkpointer(os.path.join(ref, "checkpoints"), read_only=True), STEPS)
  resumed = distill.restore_state(ck, abstract, None, to_dict(c), None, print)
  ck.close()
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, gen_old, _, step = distill.restore_generator(c, old_wd)
  _, gen_new, _, _ = distill.restore_generator(c, ref)
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(gen_old), jax.tree.leaves(gen_new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_classifier_trains_on_the_loop_checkpointed_and_resumable(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
  y = (x.reshape(32, -1).mean(1) > 127.5).astype(np.int32)
  kw = dict(steps=6, batch_size=8, width=4, feature_dim=8, checkpoint_every=100, log_every=1)
  ref = train_classifier(x, y, 2, path=str(tmp_path / "ref"), **kw)
  assert _checkpoint_steps(str(tmp_path / "ref")) == [6]
  assert np.isfinite(ref.meta["train_loss"])
  path = str(tmp_path / "clf")
  with monkeypatch.context() as m:
    _sigterm_at(m, 3)
    with pytest.raises(Preempted):
      train_classifier(x, y, 2, path=path, **kw)
  assert _checkpoint_steps(path) == [3]
  clf = train_classifier(x, y, 2, path=path, **kw)   # resumes at 3, with the batch stream
  assert _records(path, "classifier/classifier_loss").keys() == {1, 2, 3, 4, 5, 6}
  np.testing.assert_allclose(clf.meta["train_loss"], ref.meta["train_loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(clf.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert os.path.isfile(os.path.join(path, "params.msgpack"))
