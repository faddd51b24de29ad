"""The train loop: one code path from a laptop CPU to a TPU pod, for every task.

``train_and_evaluate(config, workdir)`` builds the run (``setup.build_run``: data, task,
mesh, optimizer), a sharded train state, and runs jit-compiled train steps with explicit
in/out shardings and a donated state.  It evaluates (``Task.eval_sums``), writes metrics
(JSONL + TensorBoard), checkpoints with Orbax (state + data iterator + config) and
writes samples, all under ``workdir``.  Re-running the same command resumes from the
latest checkpoint.  The loop knows no task: what a task adds (its loss, eval metric,
samples, pictures) comes through the ``Task`` interface.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict

import jax
import numpy as np
from absl import logging

from mdm_jax.core import distributed, paths
from mdm_jax.core import sharding as shd
from mdm_jax.core.config import save_config, to_dict
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers.inference import scorer_from_config
from mdm_jax.trainers.preemption import Preempted, Preemption
from mdm_jax.trainers.profiling import StepProfiler
from mdm_jax.trainers.samples import sample_and_write
from mdm_jax.trainers.setup import BEST_DIR, CHECKPOINT_DIR, build_run
from mdm_jax.trainers.state import init_state, nonfinite_parts
from mdm_jax.trainers.steps import evaluate, make_eval_step, make_train_step
from mdm_jax.trainers.workdir_lock import WorkdirLock
from mdm_jax.trainers.writer import MetricsWriter, Progress


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the configured model; returns the final metrics.

  Holds ``workdir``'s lock while it runs (one run per workdir).  Raises ``Preempted``
  after saving the current step when SIGTERM arrives (see ``preemption``).
  """
  paths.check_writable(workdir)
  paths.makedirs(workdir)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0) as lock:
    return _train(config, workdir, lock)


def _check_finite(state, step: int, ckpt) -> None:
  bad = nonfinite_parts(state)
  if bad:
    last = ckpt.latest_step()
    parts = ", ".join(f"{n} non-finite values in {k}" for k, n in bad.items())
    raise FloatingPointError(
        f"The train state became non-finite by step {step} ({parts}); it was not saved. The "
        f"last good checkpoint is step {last if last is not None else 'none (no checkpoint)'}. "
        "Lower training.learning_rate or set training.grad_clip, and re-run to resume from it.")


def _train(config, workdir: str, lock: WorkdirLock) -> Dict[str, Any]:
  is_main = jax.process_index() == 0
  run = build_run(config, workdir)
  task, data, mesh, rules, tx = run.task, run.data, run.mesh, run.rules, run.tx
  state, shardings = init_state(task, tx, mesh, rules, int(config.seed))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("Model: %s, %.2fM parameters; %s; mesh %s", config.model.name, n_params / 1e6,
               task.describe(), dict(mesh.shape))

  train_ds = data.train_dataset(int(config.training.batch_size), int(config.data.shuffle_seed),
                                *shd.process_batch_slice(mesh))
  train_iter = iter(train_ds)
  cfg_dict = to_dict(config)
  ckpt = ckpt_lib.Checkpointer(paths.join(workdir, CHECKPOINT_DIR),
                               max_to_keep=int(config.checkpoint.max_to_keep),
                               async_save=bool(config.checkpoint.async_save),
                               check_free_space=bool(config.checkpoint.check_free_space))
  best_ckpt = None
  try:
    if int(config.checkpoint.keep_best):
      best_ckpt = ckpt_lib.Checkpointer(paths.join(workdir, BEST_DIR),
                                        max_to_keep=int(config.checkpoint.keep_best),
                                        async_save=bool(config.checkpoint.async_save),
                                        best_metric="eval_nll",
                                        check_free_space=bool(config.checkpoint.check_free_space))
    if ckpt.latest_step() is not None:
      abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
      # Resuming mid-stream needs the same data stream; a checkpoint without an iterator
      # state (a converted model) only needs the same network and tokens.
      keys = (ckpt_lib.resume_keys(config.objective)
              if ckpt.has_data_state(ckpt.latest_step()) else ckpt_lib.compat_keys(config.objective))
      state, _ = ckpt.restore_intact(
          abstract, data_iter=train_iter, current_config=cfg_dict, keys=keys,
          log=lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
      logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    save_config(config, workdir, is_main)
    with Preemption() as preemption:
      return _loop(config, workdir, run, state, shardings, train_iter, cfg_dict, ckpt,
                   best_ckpt, preemption, lock)
  finally:   # a save in progress is finished (or its error reported), never abandoned
    for c in (ckpt, best_ckpt):
      if c is not None:
        c.close()


def _loop(config, workdir, run, state, shardings, train_iter, cfg_dict, ckpt, best_ckpt,
          preemption: Preemption, lock: WorkdirLock) -> Dict[str, Any]:
  is_main = jax.process_index() == 0
  task, data, mesh, rules, tx = run.task, run.data, run.mesh, run.rules, run.tx
  train_step = make_train_step(task, tx, config, mesh, rules, shardings)
  eval_step = make_eval_step(task, config, mesh, rules, shardings.params)
  eval_batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches),
                                   *shd.process_batch_slice(mesh))
  num_steps = int(config.training.num_steps)
  start = int(state.step)
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start,
                         wandb=config.get("wandb"), config_dict=cfg_dict)
  progress = Progress(num_steps, start, int(config.training.batch_size) * task.seq_len,
                      enabled=is_main)
  bs = shd.batch_sharding(mesh)
  last_eval: Dict[str, Any] = {}

  def eval_params(s):
    return s.ema_params if config.eval.use_ema else s.params

  scorer = scorer_from_config(config)   # sampling.scorer_workdir: gen ppl of samples

  def do_sample(s, step):
    if not is_main and jax.process_count() == 1:
      return
    out = sample_and_write(task, eval_params(s) if config.sampling.use_ema else s.params,
                           config, data, workdir, step, mesh=mesh, rules=rules, write=is_main,
                           scorer=scorer)
    writer.write_samples(step, out)
    last_files.update({k: v for k, v in out.items()
                       if k.endswith(("_txt", "_png", "_json")) and isinstance(v, str)})

  def do_eval(s):
    return evaluate(eval_step, task, eval_params(s), eval_batches, mesh, int(config.eval.seed))

  def save(s, step, force=False):
    _check_finite(s, step, ckpt)
    ckpt.save(step, s, train_iter, cfg_dict, force=force)

  last_files: Dict[str, str] = {}
  profiler = StepProfiler(config.get("profile"), workdir, start, log=progress.message)
  metrics = None
  try:
    with jax.set_mesh(mesh):
      for step in range(start, num_steps):
        batch = next(train_iter)
        gb = {k: shd.global_batch(v, bs) for k, v in batch.items()}
        done = step + 1
        with profiler.step(done):
          state, metrics = train_step(state, gb)
        profiler.after(done, state)
        ckpt.poll()
        if done % int(config.training.log_every) == 0 or done == num_steps:
          lock.heartbeat()
          m = {k: float(v) for k, v in distributed.host_arrays(metrics).items()}
          if not math.isfinite(m["loss"]):
            last = ckpt.latest_step()
            raise FloatingPointError(
                f"Training loss became {m['loss']} at step {done}. Lower "
                "training.learning_rate or set training.grad_clip, and re-run to resume from "
                f"the last checkpoint (step {last if last is not None else 'none'}).")
          m["lr"] = float(run.lr_schedule(done))
          progress.update(done, m)
          writer.write(done, {f"train/{k}": v for k, v in m.items()} | progress.rates())
        if (config.eval.every_steps and done % int(config.eval.every_steps) == 0) \
            or done == num_steps:
          last_eval = do_eval(state)
          writer.write(done, {f"eval/{k}": v for k, v in last_eval.items()
                              if not isinstance(v, str)})
          progress.message(f"eval @ {done}: " + last_eval.get(
              "message", f"nll {last_eval['nll']:.4f} nats/token, "
              f"perplexity bound {last_eval.get('ppl_bound', float('nan')):.3f}"))
          # Every process: the pictures read parameters that may span processes.
          pictures = task.after_eval(eval_params(state), workdir, done, write=is_main)
          writer.write_images(done, pictures or {})
          if best_ckpt is not None and done not in set(best_ckpt.all_steps()):
            _check_finite(state, done, ckpt)
            best_ckpt.save(done, state, None, cfg_dict, force=True,
                           metrics={"eval_nll": float(last_eval["nll"])})
        if (config.checkpoint.every_steps and done % int(config.checkpoint.every_steps) == 0) \
            or done == num_steps:
          save(state, done, force=done == num_steps)
        if config.sampling.every_steps and done % int(config.sampling.every_steps) == 0 \
            and done != num_steps:
          do_sample(state, done)
        if preemption.requested(done, ckpt) and done < num_steps:
          if ckpt.latest_step() != done:
            save(state, done, force=True)
          ckpt.wait()
          progress.message(f"SIGTERM: saved step {done} in {ckpt.directory}; stopping.")
          raise Preempted(done, ckpt.directory)
    ckpt.wait()
    if start < num_steps or not last_eval:
      if not last_eval:
        last_eval = do_eval(state)
      do_sample(state, num_steps)
  finally:
    profiler.stop()
    writer.close()
  result = {"step": int(state.step), **{f"eval_{k}": v for k, v in last_eval.items()}}
  if metrics is not None:
    result["train_loss"] = float(distributed.host_arrays(metrics["loss"]))
  if is_main:
    paths.atomic_write(paths.join(workdir, "final_metrics.json"), json.dumps(result, indent=2))
    files = sorted({p[len(workdir):].lstrip("/" + os.sep) for p in last_files.values()})
    progress.message(
        f"Wrote {workdir}: checkpoints/{ckpt.latest_step()}, {', '.join(files + ['metrics.jsonl'])}"
        f", final_metrics.json; curves, samples and pictures: tensorboard --logdir "
        f"{paths.join(workdir, 'tensorboard')}")
  return result
