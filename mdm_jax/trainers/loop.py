"""The train loop: one code path from a laptop CPU to a TPU pod, for every task.

``train_and_evaluate(config, workdir)`` builds the run (``setup.build_run``: data, task,
mesh, optimizer), a sharded train state, and runs jit-compiled train steps with explicit
in/out shardings and a donated state.  It evaluates (``Task.eval_sums``), writes metrics
(JSONL + TensorBoard), checkpoints with Orbax (state + data iterator + config) and
writes samples, all under ``workdir``.  Re-running the same command resumes from the
latest checkpoint.  The loop knows no task: what a task adds (its loss, eval metric,
samples, pictures) comes through the ``Task`` interface, and how long and how often it
does each thing through the run's ``LoopSettings``.  ``train(workdir, build)`` runs any
``Run`` (Di[M]O distillation and the feature classifier are task variants run here too),
so every run gets the same preemption saves, checksums, finiteness checks, bucket
workdirs, workdir lock and multi-process sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Dict, Optional

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
from mdm_jax.trainers.setup import BEST_DIR, CHECKPOINT_DIR, Run, build_run
from mdm_jax.trainers.state import init_state, nonfinite_parts
from mdm_jax.trainers.steps import evaluate, make_eval_step, make_step
from mdm_jax.trainers.workdir_lock import WorkdirLock
from mdm_jax.trainers.writer import MetricsWriter, Progress


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the configured model; returns the final metrics.

  Holds ``workdir``'s lock while it runs (one run per workdir).  Raises ``Preempted``
  after saving the current step when SIGTERM arrives (see ``preemption``).
  """
  return train(workdir, lambda: build_run(config, workdir))


def train(workdir: str, build: Callable[[], Run]) -> Dict[str, Any]:
  """Runs (or resumes) the ``Run`` that ``build()`` makes, under ``workdir``'s lock."""
  paths.check_writable(workdir)
  paths.makedirs(workdir)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0) as lock:
    return _train(build(), workdir, lock)


@dataclasses.dataclass
class _Loop:
  """What the steps of one run share: the run, its writers, checkpointers and streams."""
  run: Run
  workdir: str
  lock: WorkdirLock
  ckpt: ckpt_lib.Checkpointer
  best_ckpt: Optional[ckpt_lib.Checkpointer]
  train_iter: Any
  cfg_dict: Dict[str, Any]
  preemption: Any = None
  writer: Any = None
  progress: Any = None
  scorer: Any = None
  train_step: Any = None
  eval_step: Any = None
  eval_batches: Any = None
  last_files: Dict[str, str] = dataclasses.field(default_factory=dict)
  last_samples: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def settings(self):
    return self.run.settings

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def _due(every: int, done: int, num_steps: int) -> bool:
  """Whether a cadence of ``every`` steps (0 = off) falls on step ``done``, or it is the last."""
  return bool(every and done % every == 0) or done == num_steps


def _lower_lr_hint(section: str) -> str:
  return f"Lower {section}.learning_rate or set {section}.grad_clip"


def _check_finite(state, step: int, ckpt, section: str = "training") -> None:
  bad = nonfinite_parts(state)
  if bad:
    last = ckpt.latest_step()
    parts = ", ".join(f"{n} non-finite values in {k}" for k, n in bad.items())
    raise FloatingPointError(
        f"The train state became non-finite by step {step} ({parts}); it was not saved. The "
        f"last good checkpoint is step {last if last is not None else 'none (no checkpoint)'}. "
        f"{_lower_lr_hint(section)}, and re-run to resume from it.")


# ------------------------------------------------------------------ set-up
def _train(run: Run, workdir: str, lock: WorkdirLock) -> Dict[str, Any]:
  config, task, mesh = run.config, run.task, run.mesh
  state, shardings = init_state(task, run.tx, mesh, run.rules, run.settings.seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("Model: %s, %.2fM parameters; %s; mesh %s", config.model.name, n_params / 1e6,
               task.describe(), dict(mesh.shape))
  ckpt, best_ckpt = _open_checkpointers(config, workdir, run.settings)
  ctx = _Loop(run=run, workdir=workdir, lock=lock, ckpt=ckpt, best_ckpt=best_ckpt,
              train_iter=_train_stream(run), cfg_dict=to_dict(config))
  try:
    state = _resume(ctx, state, shardings)
    save_config(config, workdir, ctx.is_main)
    with Preemption() as preemption:
      ctx.preemption = preemption
      return _loop(ctx, state, shardings)
  finally:   # a save in progress is finished (or its error reported), never abandoned
    for c in (ckpt, best_ckpt):
      if c is not None:
        c.close()


def _train_stream(run: Run):
  """This process's iterator of training batches (None for a data-free task)."""
  if not run.settings.data_stream:
    return None
  return iter(run.data.train_dataset(run.settings.batch_size,
                                     int(run.config.data.shuffle_seed),
                                     *shd.process_batch_slice(run.mesh)))


def _open_checkpointers(config, workdir: str, settings):
  """The run's checkpointer and, with ``keep_best``, the best-by-eval one."""
  cc = config.checkpoint

  def open_one(sub, **kwargs):
    return ckpt_lib.Checkpointer(paths.join(workdir, sub), async_save=bool(cc.async_save),
                                 check_free_space=bool(cc.check_free_space), **kwargs)

  ckpt = open_one(CHECKPOINT_DIR, max_to_keep=int(cc.max_to_keep))
  try:
    best = (open_one(BEST_DIR, max_to_keep=settings.keep_best, best_metric="eval_nll")
            if settings.keep_best else None)
  except BaseException:
    ckpt.close()
    raise
  return ckpt, best


def _resume(ctx: _Loop, state, shardings):
  """The latest intact checkpoint's state (and data position), or ``state`` when none."""
  ckpt, objective = ctx.ckpt, ctx.run.config.objective
  if ckpt.latest_step() is None:
    return state
  abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
  # Resuming mid-stream needs the same data stream; a checkpoint without an iterator
  # state (a converted model, a data-free task) only needs the same network and tokens.
  keys = (ckpt_lib.resume_keys(objective) if ckpt.has_data_state(ckpt.latest_step())
          else ckpt_lib.compat_keys(objective))
  log = lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True)  # noqa: E731
  if ctx.run.restore is not None:
    state = ctx.run.restore(ckpt, abstract, ctx.train_iter, ctx.cfg_dict, keys, log)
  else:
    state, _ = ckpt.restore_intact(abstract, data_iter=ctx.train_iter,
                                   current_config=ctx.cfg_dict, keys=keys, log=log)
  logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
  return state


# ------------------------------------------------------------------ the loop
def _loop(ctx: _Loop, state, shardings) -> Dict[str, Any]:
  """Steps from the restored one to ``num_steps``: train, log, evaluate, save, sample,
  stop on SIGTERM; then the final evaluation, samples and ``final_metrics.json``."""
  run, s = ctx.run, ctx.settings
  num_steps, start = s.num_steps, int(state.step)
  _prepare_steps(ctx, shardings, start)
  profiler = StepProfiler(run.config.get("profile"), ctx.workdir, start,
                          log=ctx.progress.message)
  last_eval: Dict[str, Any] = {}
  metrics = None
  try:
    with jax.set_mesh(run.mesh):
      for step in range(start, num_steps):
        done = step + 1
        with profiler.step(done):
          state, metrics = ctx.train_step(state, _next_batch(ctx))
        profiler.after(done, state)
        ctx.ckpt.poll()
        if _due(s.log_every, done, num_steps):
          _log_train_metrics(ctx, done, metrics)
        if s.evaluate and _due(s.eval_every, done, num_steps):
          last_eval = _evaluate_and_keep_best(ctx, state, done)
        if _due(s.checkpoint_every, done, num_steps):
          _save(ctx, state, done, force=done == num_steps)
        if s.sample_every and done % s.sample_every == 0 and done != num_steps:
          _write_samples(ctx, state, done)
        _stop_if_preempted(ctx, state, done, num_steps)
    ctx.ckpt.wait()
    if start < num_steps or not last_eval:
      if s.evaluate and not last_eval:
        last_eval = _evaluate(ctx, state)
      if s.final_samples:
        _write_samples(ctx, state, num_steps)
  finally:
    profiler.stop()
    ctx.writer.close()
  return _final_result(ctx, state, metrics, last_eval)


def _prepare_steps(ctx: _Loop, shardings, start: int) -> None:
  """The jitted steps, the eval batches, the writer, the progress line and the scorer."""
  run, s = ctx.run, ctx.settings
  ctx.train_step = make_step(run, shardings)
  if s.evaluate:
    ctx.eval_step = make_eval_step(run.task, run.config, run.mesh, run.rules, shardings.params)
    ctx.eval_batches = run.data.eval_batches(int(run.config.eval.batch_size),
                                             int(run.config.eval.num_batches),
                                             *shd.process_batch_slice(run.mesh))
  ctx.writer = MetricsWriter(ctx.workdir, enabled=ctx.is_main, resume_step=start,
                             wandb=run.config.get("wandb"), config_dict=ctx.cfg_dict)
  ctx.progress = Progress(s.num_steps, start, s.batch_size * run.task.seq_len,
                          enabled=ctx.is_main, label=s.progress_label, shown=s.progress_metrics)
  ctx.scorer = scorer_from_config(run.config)   # sampling.scorer_workdir: gen ppl of samples


def _next_batch(ctx: _Loop) -> Dict[str, Any]:
  """The next global batch, sharded over the mesh's batch axes ({} for a data-free task)."""
  if ctx.train_iter is None:
    return {}
  bs = shd.batch_sharding(ctx.run.mesh)
  return {k: shd.global_batch(v, bs) for k, v in next(ctx.train_iter).items()}


def _eval_params(ctx: _Loop, state):
  return state.ema_params if ctx.settings.eval_use_ema else state.params


def _sample_params(ctx: _Loop, state):
  return state.ema_params if ctx.settings.sample_use_ema else state.params


def _log_train_metrics(ctx: _Loop, done: int, metrics) -> None:
  """Heartbeat, finiteness check, progress line and ``<prefix>/<metric>`` records."""
  s = ctx.settings
  ctx.lock.heartbeat()
  m = {k: float(v) for k, v in distributed.host_arrays(metrics).items()}
  checked = m if s.finite_metrics is None else {k: m[k] for k in s.finite_metrics}
  bad = [k for k, v in checked.items() if not math.isfinite(v)]
  if bad:
    last = ctx.ckpt.latest_step()
    what = "loss" if bad[0] == "loss" else f"metric {bad[0]}"
    raise FloatingPointError(
        f"Training {what} became {m[bad[0]]} at step {done}. {_lower_lr_hint(s.config_section)}"
        f", and re-run to resume from the last checkpoint (step "
        f"{last if last is not None else 'none'}).")
  m["lr"] = float(ctx.run.lr_schedule(done))
  ctx.progress.update(done, m)
  ctx.writer.write(done, {f"{s.metric_prefix}/{k}": v for k, v in m.items()}
                   | ctx.progress.rates())


def _evaluate(ctx: _Loop, state) -> Dict[str, Any]:
  run = ctx.run
  return evaluate(ctx.eval_step, run.task, _eval_params(ctx, state), ctx.eval_batches, run.mesh,
                  int(run.config.eval.seed))


def _evaluate_and_keep_best(ctx: _Loop, state, done: int) -> Dict[str, Any]:
  """Evaluates, records, draws the task's pictures and keeps the best checkpoint."""
  result = _evaluate(ctx, state)
  ctx.writer.write(done, {f"eval/{k}": v for k, v in result.items() if not isinstance(v, str)})
  ctx.progress.message(f"eval @ {done}: " + result.get(
      "message", f"nll {result['nll']:.4f} nats/token, "
      f"perplexity bound {result.get('ppl_bound', float('nan')):.3f}"))
  # Every process: the pictures read parameters that may span processes.
  pictures = ctx.run.task.after_eval(_eval_params(ctx, state), ctx.workdir, done,
                                     write=ctx.is_main)
  ctx.writer.write_images(done, pictures or {})
  best = ctx.best_ckpt
  if best is not None and done not in set(best.all_steps()):
    _check_finite(state, done, ctx.ckpt, ctx.settings.config_section)
    best.save(done, state, None, ctx.cfg_dict, force=True,
              metrics={"eval_nll": float(result["nll"])})
  return result


def _save(ctx: _Loop, state, step: int, force: bool = False) -> None:
  """Saves ``step`` (state, data position, config) once its state is checked finite."""
  _check_finite(state, step, ctx.ckpt, ctx.settings.config_section)
  ctx.ckpt.save(step, state, ctx.train_iter, ctx.cfg_dict, force=force)


def _write_samples(ctx: _Loop, state, step: int) -> None:
  """Samples on every process of a multi-process job (they are one program); process 0
  writes them."""
  if not ctx.is_main and jax.process_count() == 1:
    return
  run = ctx.run
  out = sample_and_write(run.task, _sample_params(ctx, state), run.config, run.data,
                         ctx.workdir, step, mesh=run.mesh, rules=run.rules, write=ctx.is_main,
                         scorer=ctx.scorer)
  ctx.writer.write_samples(step, out)
  ctx.last_samples = out
  ctx.last_files.update({k: v for k, v in out.items()
                         if k.endswith(("_txt", "_png", "_json")) and isinstance(v, str)})


def _stop_if_preempted(ctx: _Loop, state, done: int, num_steps: int) -> None:
  """On SIGTERM before the last step: saves ``done`` (unless it just was), waits for the
  commit, raises ``Preempted``.  Asked after every step (with several processes the
  question is one they all answer together)."""
  ckpt = ctx.ckpt
  if not (ctx.preemption.requested(done, ckpt) and done < num_steps):
    return
  if ckpt.latest_step() != done:
    _save(ctx, state, done, force=True)
  ckpt.wait()
  ctx.progress.message(f"SIGTERM: saved step {done} in {ckpt.directory}; stopping.")
  raise Preempted(done, ckpt.directory)


def _final_result(ctx: _Loop, state, metrics, last_eval) -> Dict[str, Any]:
  """The run's summary, written to ``final_metrics.json`` by process 0."""
  s, workdir = ctx.settings, ctx.workdir
  result = {"step": int(state.step), **dict(s.result_extra),
            **{f"eval_{k}": v for k, v in last_eval.items()}}
  if metrics is not None:
    host = {k: float(v) for k, v in distributed.host_arrays(metrics).items()}
    if "loss" in host:
      result["train_loss"] = host["loss"]
    if s.report_train_metrics:
      result.update({f"final_{k}": v for k, v in host.items()})
  if s.report_samples:
    result.update({k: v for k, v in ctx.last_samples.items() if k != "texts"})
  if ctx.is_main:
    paths.atomic_write(paths.join(workdir, "final_metrics.json"),
                       json.dumps(result, indent=2, default=str))
    files = sorted({p[len(workdir):].lstrip("/" + os.sep) for p in ctx.last_files.values()})
    ctx.progress.message(
        f"Wrote {workdir}: checkpoints/{ctx.ckpt.latest_step()}, "
        f"{', '.join(files + ['metrics.jsonl'])}, final_metrics.json; curves, samples and "
        f"pictures: tensorboard --logdir {paths.join(workdir, 'tensorboard')}")
  return result
