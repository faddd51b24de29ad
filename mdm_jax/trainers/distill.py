"""Di[M]O on the command line: distil a trained masked diffusion run into a one-step generator.

The method (token initialisation, the matching gradient, the two losses) is
``mdm_jax.tasks.distill``; the specification is docs/method/algorithms.md §5.  Here:

* ``distill(config, teacher_workdir, workdir)`` (``python -m mdm_jax.main --mode=distill
  --teacher_workdir=DIR --workdir=OUT``): loads the teacher read-only, builds the
  ``DistillTask`` and its optimizers (``config.distill``) and runs it on the common train
  loop (``trainers.loop.train``): preemption saves, checksums, finiteness checks, bucket
  workdirs, the workdir lock and multi-process sampling are the loop's.
* ``restore_generator`` / ``generate_images``: the generator of a distill workdir and its
  one-step samples (``python -m mdm_jax.cli.eval_images --mode=evaluate_distilled``).

The train state is the loop's: ``params = {"generator", "auxiliary"}``, one optimizer
state per part, the EMA of the generator.  Workdirs written before the common loop
(a ``DistillState`` with ``gen_params``/``aux_params``) are read and resumed as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Dict, Tuple

import flax
import jax
import numpy as np

from mdm_jax.core import paths
from mdm_jax.core.config import to_dict
from mdm_jax.core.errors import ConfigError
from mdm_jax.tasks.distill import (  # noqa: F401  (the method's functions, re-exported)
    MASK_RATIOS, DistillSettings, DistillTask, auxiliary_loss, dimo_grad_target, embed_width,
    exact_mask, generator_logits, generator_loss, init_tokens, mask_count, model_logprobs,
    one_step_generate, remask, sample_from_logits, sample_mask_ratio, smoothed_cross_entropy,
    surrogate_loss, token_kl, validate_distill_config)
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers import loop
from mdm_jax.trainers.setup import (CHECKPOINT_DIR, LoopSettings, Run, build_run,
                                    restore_for_inference)
from mdm_jax.trainers.state import TrainState, make_optimizer, state_shardings
from mdm_jax.trainers.steps import make_phased_step

PROGRESS_METRICS = (("aux_loss", "aux CE"), ("fkl", "D(teacher||aux)"),
                    ("teacher_nll", "teacher NLL of gen"), ("gen_entropy", "gen entropy"),
                    ("g_norm", "|g|"))


# ------------------------------------------------------------------ optimizers and settings
def optimizers(config) -> Dict[str, Any]:
  """{"generator": tx, "auxiliary": tx}: Adam with the ``config.distill`` settings (the
  auxiliary at ``aux_learning_rate`` when > 0), ``distill.frozen_params`` not updated."""
  dc = config.distill
  aux_lr = float(dc.aux_learning_rate) if float(dc.aux_learning_rate) > 0 else \
      float(dc.learning_rate)
  names = tuple(dc.frozen_params)
  return {"generator": make_optimizer(dc, learning_rate=float(dc.learning_rate),
                                      frozen_names=names)[0],
          "auxiliary": make_optimizer(dc, learning_rate=aux_lr, frozen_names=names)[0]}


def loop_settings(config, teacher_workdir: str) -> LoopSettings:
  """The train loop's settings from ``config.distill`` (data-free, no evaluation)."""
  dc = config.distill
  return LoopSettings(
      num_steps=int(dc.num_steps), batch_size=int(dc.batch_size), seed=int(dc.seed),
      log_every=int(dc.log_every), checkpoint_every=int(dc.checkpoint_every), evaluate=False,
      final_samples=int(dc.num_samples) > 0, keep_best=0, data_stream=False,
      ema_decay=float(dc.ema_decay), ema_warmup=False, eval_use_ema=bool(dc.use_ema),
      sample_use_ema=bool(dc.use_ema), metric_prefix="distill", progress_label="distill",
      progress_metrics=PROGRESS_METRICS, report_train_metrics=True, report_samples=True,
      result_extra=(("teacher_workdir", teacher_workdir), ("method", "Di[M]O")),
      finite_metrics=None, config_section="distill")


def make_distill_step(task: DistillTask, tx, *, ema_decay: float, mesh=None, rules=None,
                      shardings=None, donate: bool = True):
  """The jitted ``(state, batch) -> (state, metrics)`` of Di[M]O: the common phased step
  (``steps.make_phased_step``) with the EMA at a constant ``ema_decay``."""
  return make_phased_step(task, tx, mesh, rules, shardings, ema_decay=ema_decay,
                          ema_warmup=False, donate=donate)


# ------------------------------------------------------------------ workdirs of the old layout
@flax.struct.dataclass
class LegacyDistillState:
  """The train state distill workdirs held before Di[M]O ran on the common loop."""
  step: jax.Array
  gen_params: Any
  aux_params: Any
  gen_opt: Any
  aux_opt: Any
  ema_params: Any
  key: jax.Array


def is_legacy_step(ckpt, step: int) -> bool:
  """Whether checkpoint ``step`` holds a ``LegacyDistillState`` (its tree names say so)."""
  meta = paths.join(ckpt.step_dir(step), "state", "_METADATA")
  return paths.exists(meta) and '"gen_params"' in paths.read_text(meta)


def _to_legacy(state: TrainState) -> LegacyDistillState:
  return LegacyDistillState(step=state.step, gen_params=state.params["generator"],
                            aux_params=state.params["auxiliary"],
                            gen_opt=state.opt_state["generator"],
                            aux_opt=state.opt_state["auxiliary"],
                            ema_params=state.ema_params["generator"], key=state.key)


def _from_legacy(old: LegacyDistillState) -> TrainState:
  return TrainState(step=old.step, params={"generator": old.gen_params,
                                           "auxiliary": old.aux_params},
                    opt_state={"generator": old.gen_opt, "auxiliary": old.aux_opt},
                    ema_params={"generator": old.ema_params}, key=old.key)


def restore_state(ckpt, abstract, data_iter, cfg_dict, keys, log):
  """``Run.restore`` for distill workdirs: the newest intact step in either layout."""
  del data_iter
  step = ckpt.latest_step()
  if step is not None and is_legacy_step(ckpt, step):
    old, _ = ckpt.restore_intact(_to_legacy(abstract), current_config=cfg_dict, keys=keys,
                                 log=log)
    return _from_legacy(old)
  state, _ = ckpt.restore_intact(abstract, current_config=cfg_dict, keys=keys, log=log)
  return state


# ------------------------------------------------------------------ training
def _build(config):
  """The run (data, task, mesh) of a diffusion config, with the checks Di[M]O needs."""
  validate_distill_config(config)
  run = build_run(config, None, check_batch=False)
  if run.task.schedule.per_position:
    raise ConfigError("Di[M]O needs a scalar masking schedule (the re-mask ratio); "
                      f"schedule.name={config.schedule.name!r} is multivariate.")
  return run


def distill(config, teacher_workdir: str, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) Di[M]O from the teacher checkpoint in ``teacher_workdir`` on the
  common train loop, holding ``workdir``'s lock (one run per workdir)."""
  validate_distill_config(config)
  if not teacher_workdir:
    raise ConfigError("--mode=distill needs --teacher_workdir=DIR, a trained diffusion run.")
  teacher_workdir, workdir = paths.resolve(teacher_workdir), paths.resolve(workdir)
  if teacher_workdir.rstrip("/") == workdir.rstrip("/"):
    raise ConfigError("--workdir must differ from --teacher_workdir (the teacher's checkpoints "
                      "would be mixed with the generator's).")
  return loop.train(workdir, functools.partial(build_distill_run, config, teacher_workdir,
                                               workdir))


def build_distill_run(config, teacher_workdir: str, workdir: str) -> Run:
  """The teacher (read-only), the Di[M]O task, its optimizers and loop settings; writes
  ``distill_meta.json``.  Called under the workdir's lock."""
  base, t_state, mesh, rules, data, t_shardings = restore_for_inference(config, teacher_workdir)
  dc = config.distill
  teacher = t_state.ema_params if dc.teacher_use_ema else t_state.params
  settings = DistillSettings.from_config(config)
  task = DistillTask(base, settings, aux_steps=int(dc.aux_steps), teacher=teacher,
                     teacher_shardings=t_shardings.params, num_samples=int(dc.num_samples))
  if jax.process_index() == 0:
    paths.atomic_write(paths.join(workdir, "distill_meta.json"), json.dumps(
        {"teacher_workdir": teacher_workdir, "method": "Di[M]O",
         "settings": dataclasses.asdict(settings)}, indent=2))
  tx = optimizers(config)
  lr = make_optimizer(dc, learning_rate=float(dc.learning_rate),
                      frozen_names=tuple(dc.frozen_params))[1]
  return Run(config=config, workdir=workdir, data=data, task=task, mesh=mesh, rules=rules,
             tx=tx, lr_schedule=lr, settings=loop_settings(config, teacher_workdir),
             restore=restore_state)


# ------------------------------------------------------------------ inference
def restore_generator(config, workdir: str):
  """(task, generator params (EMA if distill.use_ema), data, step) from a distill workdir
  (either layout)."""
  run = _build(config)
  data, mesh, rules = run.data, run.mesh, run.rules
  task = DistillTask(run.task, DistillSettings.from_config(config))
  abstract, shardings = state_shardings(task, optimizers(config), mesh, rules)
  abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
  ckpt = ckpt_lib.Checkpointer(paths.join(workdir, CHECKPOINT_DIR), read_only=True,
                               async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise ckpt_lib.CheckpointError(
        f"No Di[M]O checkpoint under {paths.join(workdir, CHECKPOINT_DIR)}. Run "
        f"`python -m mdm_jax.main --mode=distill --teacher_workdir=TEACHER --workdir={workdir}`.")
  ckpt.check_compatible(to_dict(config), step)
  if is_legacy_step(ckpt, step):
    state = _from_legacy(ckpt.restore(_to_legacy(abstract), step=step))
  else:
    state = ckpt.restore(abstract, step=step)
  ckpt.close()
  params = state.ema_params if config.distill.use_ema else state.params
  return run.task, params["generator"], data, int(step)


def generate_images(task, params, config, tokenizer, num_samples: int, batch_size: int = 0,
                    seed: int = 0) -> Tuple[np.ndarray, Dict[str, float]]:
  """uint8 images from the one-step generator, with compile and per-image wall times."""
  settings = DistillSettings.from_config(config)
  bs = int(batch_size or config.distill.num_samples or 64)
  fn = jax.jit(functools.partial(one_step_generate, task, batch=bs, settings=settings))
  t0 = time.time()
  compiled = fn.lower(params, jax.random.key(0)).compile()
  compile_s = time.time() - t0
  out, t0 = [], time.time()
  for i in range(-(-int(num_samples) // bs)):
    out.append(np.asarray(jax.block_until_ready(compiled(params, jax.random.key(seed + i)))))
  wall = time.time() - t0
  tokens = np.concatenate(out)[:int(num_samples)]
  return tokenizer.decode(tokens), {"sample_seconds": wall, "compile_seconds": compile_s,
                                    "seconds_per_image": wall / max(int(num_samples), 1),
                                    "nfe_per_sample": 1}
