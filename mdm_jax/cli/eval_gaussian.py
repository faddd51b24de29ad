"""Evaluation of Gaussian-diffusion image checkpoints (objective='gaussian', docs/method/mc_dit.md §5).

  python -m mdm_jax.cli.eval_gaussian --config=fashion_mnist_mcdit:arm=mcdit \
      --workdir=runs/mcdit/fm_mcdit --classifier_path=runs/img/fmnist_classifier \
      --num_samples=1000 --guidance=1.0,1.5

* held-out denoising loss L_G at the fixed noise levels (the trainer's eval metric);
* the classifier Fréchet distance (the project's own CNN features, ``mdm_jax.metrics.classifier``;
  never FID) of class-balanced samples (labels 0..9 in turn) from the EMA
  weights against the test split, for each guidance weight w, with the same
  statistic for as many real training images as the noise floor;
* ``--mode=flops``: XLA's FLOP count of one compiled train step (``cost_analysis``)
  of the configured arm, for equal-FLOP comparisons;
* ``--mode=probes`` (arms with a clean branch): the context probe (D_c's inpainting MSE
  with clean context at mask ratio 0.5) and the collapse probe (||ΔX̂0|| / ||Δinput|| on
  the masked patches when their noise is redrawn) at the eval noise levels, on the
  held-out batches; writes ``gaussian_probes_step_N.json``.

Writes ``gaussian_eval_step_N.json`` and ``samples/fd_step_N_wW.png`` in the workdir.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Sequence

import jax
import numpy as np
from absl import app

from mdm_jax.core import sharding as shd
from mdm_jax.core import distributed
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.flags import flags_parser
from mdm_jax.metrics import classifier as classifier_lib
from mdm_jax.pictures.pixels import image_grid, write_png
from mdm_jax.tasks import build_task
from mdm_jax.trainers.setup import restore_for_inference
from mdm_jax.trainers.state import make_optimizer, state_shardings
from mdm_jax.trainers.steps import evaluate, make_eval_step, make_train_step


def train_step_flops(config) -> Dict[str, float]:
  """FLOPs of one train step of ``config`` as compiled by XLA on a 1-device mesh (no data read)."""
  config = config.unlock() if hasattr(config, "unlock") else config
  config.mesh.shape = (1, 1, 1)
  task = build_task(config, int(config.data.num_levels))
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = shd.logical_rules(config.mesh)
  tx, _ = make_optimizer(config.training)
  abstract, shardings = state_shardings(task, tx, mesh, rules)
  step = make_train_step(task, tx, config, mesh, rules, shardings)
  b = int(config.training.batch_size)
  batch = {"tokens": jax.ShapeDtypeStruct((b, task.seq_len), np.int32),
           "labels": jax.ShapeDtypeStruct((b,), np.int32)}
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  return {"arm": str(config.model.arm), "flops_per_step": float(cost.get("flops", float("nan"))),
          "batch_size": b, "params": n_params}


def evaluate_gaussian(config, workdir: str, classifier_path: str, num_samples: int,
                      guidances: Sequence[float], sample_batch: int = 0,
                      num_steps: int = 0) -> Dict[str, Any]:
  task, state, mesh, rules, data, shardings = restore_for_inference(config, workdir)
  if getattr(task, "objective", "") != "gaussian":
    raise ConfigError("eval_gaussian needs an objective='gaussian' checkpoint; use "
                      "mdm_jax.cli.eval_images for the discrete image models.")
  eval_step = make_eval_step(task, config, mesh, rules, shardings.params)
  batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches),
                              *shd.process_batch_slice(mesh))
  params = state.ema_params if config.eval.use_ema else state.params
  ev = evaluate(eval_step, task, params, batches, mesh, int(config.eval.seed))
  sparams = state.ema_params if config.sampling.use_ema else state.params
  clf = classifier_lib.Classifier.load(classifier_path)
  ref = data.images("eval")
  n = int(num_samples)
  bs = int(sample_batch or min(n, 250))
  step = int(state.step)
  out_dir = os.path.join(workdir, "samples")
  result: Dict[str, Any] = {
      "step": step, "arm": task.mc.arm, "heldout": {k: v for k, v in ev.items()
                                                   if k != "message"},
      "fd_num_samples": n, "fd_reference_images": int(len(ref)),
      "classifier": os.path.abspath(classifier_path),
      "classifier_test_accuracy": clf.meta.get("test_accuracy"),
      "fd_real_train_vs_eval": classifier_lib.classifier_frechet_distance(
          clf, data.images("train", n), ref),
      "note": "classifier Frechet distance on the project's own CNN features: not FID."}
  k = task.mc.num_classes
  for w in guidances:
    t0 = time.time()
    imgs, stats = [], {}
    for i in range(-(-n // bs)):
      labels = (np.arange(i * bs, (i + 1) * bs) % k) if k else None
      res, stats = task.generate(sparams, config, seed=int(config.sampling.seed) + i,
                                 num_samples=bs, num_steps=num_steps or None, mesh=mesh,
                                 rules=rules, labels=labels, guidance=float(w))
      imgs.append(data.tokenizer.decode(np.asarray(res.tokens)))
    imgs = np.concatenate(imgs)[:n]
    fd = classifier_lib.classifier_frechet_distance(clf, imgs, ref)
    grid = _on_main(write_png, os.path.join(out_dir, f"fd_step_{step}_w{w:g}.png"),
                     image_grid(imgs[:100], ncols=10, scale=2))
    result[f"w{w:g}"] = {"classifier_frechet_distance": fd, "sampler": stats["sampler"],
                         "sampling_steps": stats["num_steps"], "nfe_per_sample": stats["nfe"],
                         "sample_seconds": time.time() - t0, "grid_png": grid}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"gaussian_eval_step_{step}.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def clean_branch_probes(config, workdir: str, ratio: float = 0.5) -> Dict[str, Any]:
  """The context and collapse probes of branch C (``GaussianTask.clean_probes``), averaged
  over ``eval.num_batches`` held-out batches, per eval noise level."""
  if jax.process_count() > 1:
    raise ConfigError("--mode=probes runs in one process; start it without the multi-process "
                      "launcher (it reads a few held-out batches only).")
  task, state, mesh, rules, data, _ = restore_for_inference(config, workdir)
  if getattr(task, "objective", "") != "gaussian" or not task.mc.has_clean_branch:
    raise ValueError("--mode=probes needs an objective='gaussian' checkpoint with a clean "
                     "branch (model.arm='mcdit').")
  params = state.ema_params if config.eval.use_ema else state.params
  fn = jax.jit(lambda p, tok, lab, key: task.clean_probes(p, tok, lab, key, ratio))
  sums: Dict[str, np.ndarray] = {}
  n = 0
  key = jax.random.key(int(config.eval.seed))
  batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches))
  for i, batch in enumerate(batches):
    out = fn(params, batch["tokens"], batch.get("labels"), jax.random.fold_in(key, i))
    w = np.asarray(batch.get("weights", np.ones(batch["tokens"].shape[0])), np.float64)
    for name, v in out.items():                       # padding rows have weight 0
      sums[name] = sums.get(name, 0.0) + (np.asarray(v, np.float64) * w[None]).sum(axis=1)
    n += int(w.sum())
  if not n:
    raise ValueError("--mode=probes: the eval split gave no batches.")
  levels = [float(x) for x in task.eval_levels()]
  step = int(state.step)
  result = {"step": step, "arm": task.mc.arm, "mask_ratio": ratio, "num_images": n,
            "levels": levels, "form": task.gc.form,
            **{name: (v / n).tolist() for name, v in sums.items()}}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"gaussian_probes_step_{step}.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def _on_main(write, path, picture):
  """``write(path, picture)`` on process 0; the path everywhere (every process reports it)."""
  return write(path, picture) if jax.process_index() == 0 else path


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  distributed.maybe_initialize()     # one job over every host of a pod or allocation
  if f.mode == "flops":
    print(json.dumps(train_step_flops(f.config), indent=2))
    return
  if f.mode == "probes":
    if not f.workdir:
      raise SystemExit("error: --mode=probes needs --workdir.")
    print(json.dumps(clean_branch_probes(f.config, os.path.abspath(f.workdir)), indent=2))
    return
  if not f.workdir or not f.classifier_path:
    raise SystemExit("error: --mode=evaluate needs --workdir and --classifier_path.")
  ws = [float(w) for w in f.guidance.split(",") if w.strip()]
  res = evaluate_gaussian(f.config, os.path.abspath(f.workdir), f.classifier_path,
                          f.num_samples or int(f.config.eval.fd_num_samples), ws,
                          f.sample_batch, f.sample_steps)
  print(json.dumps(res, indent=2, default=str))


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "A Gaussian image config, e.g. "
                                  "configs/fashion_mnist_mcdit.py:arm=mcdit.", lock_config=False)
  flags.DEFINE_enum("mode", "evaluate", ["evaluate", "flops", "probes"], "What to run.")
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_string("classifier_path", "", "Directory of the feature classifier.")
  flags.DEFINE_integer("num_samples", 0, "Samples per guidance weight (0 = eval.fd_num_samples).")
  flags.DEFINE_integer("sample_batch", 0, "Samples per sampler call (0 = min(n, 250)).")
  flags.DEFINE_integer("sample_steps", 0, "Sampler steps (0 = sampling.num_steps).")
  flags.DEFINE_string("guidance", "1.0", "Comma-separated CFG weights w (1 = unguided).")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.cli.eval_gaussian --config=NAME --workdir=DIR [--config.KEY=VALUE ...]"))
