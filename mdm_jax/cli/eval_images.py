"""Image evaluation on the command line: the feature classifier, then checkpoints.

  # 1. the feature network (once per dataset), saved as DIR/{params.msgpack,meta.json}
  python -m mdm_jax.cli.eval_images --mode=train_classifier --config=fashion_mnist_prime \
      --classifier_path=runs/fmnist_classifier
  # 2. a trained diffusion checkpoint: bits/dim, classifier FD of N samples, a PNG grid
  python -m mdm_jax.cli.eval_images --mode=evaluate --config=fashion_mnist_prime \
      --workdir=runs/fmnist_prime --classifier_path=runs/fmnist_classifier --num_samples=1000
  # 3. a Di[M]O one-step generator (--mode=distill workdir)
  python -m mdm_jax.cli.eval_images --mode=evaluate_distilled --config=fashion_mnist_mdm \
      --workdir=runs/dimo --classifier_path=runs/fmnist_classifier

The classifier Frechet distance uses the project's own CNN features (``mdm_jax.metrics.
classifier``), NOT Inception, so it is not comparable with FID; ``--inception_weights=PATH``
adds the standard FID (``mdm_jax.metrics.inception``).  Bits per dimension is the eval
NELBO per pixel channel in bits.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Tuple

import jax
import numpy as np
from absl import app

from mdm_jax.core import distributed
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.flags import flags_parser
from mdm_jax.data import build_data
from mdm_jax.metrics import classifier as classifier_lib
from mdm_jax.metrics import inception
from mdm_jax.pictures.pixels import image_grid, write_png
from mdm_jax.trainers import distill
from mdm_jax.trainers.classifier import train_classifier
from mdm_jax.trainers.setup import restore_for_inference
from mdm_jax.trainers.steps import evaluate, make_eval_step


def sample_images(task, params, config, tokenizer, num_samples: int, *, batch_size: int = 0,
                  mesh=None, rules=None, seed: int = 0) -> Tuple[np.ndarray, Dict[str, Any]]:
  """``num_samples`` uint8 images from the diffusion model, in batches of ``batch_size``.

  Image i is drawn from fold_in(key(seed), i), so the images do not depend on the batch size.
  """
  bs = int(batch_size or config.sampling.num_samples)
  out, stats = [], {}
  for i in range(-(-int(num_samples) // bs)):
    res, stats = task.generate(params, config, seed=int(seed), num_samples=bs, mesh=mesh,
                               rules=rules, row_offset=i * bs)
    out.append(tokenizer.decode(np.asarray(res.tokens)))
  return np.concatenate(out)[:int(num_samples)], stats


def evaluate_images(config, workdir: str, classifier_path: str, num_samples: int = 0,
                    sample_batch: int = 0, inception_weights: str = "") -> Dict[str, Any]:
  """bits/dim (eval ELBO) + classifier Frechet distance of samples vs the eval split."""
  task, state, mesh, rules, data, shardings = restore_for_inference(config, workdir)
  if not getattr(data.tokenizer, "is_image", False):
    raise ConfigError("evaluate_images needs an image dataset (data.dataset = fashion_mnist | "
                     "image_folder | tfds_images).")
  eval_step = make_eval_step(task, config, mesh, rules, shardings.params)
  batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches),
                              *shd.process_batch_slice(mesh))
  params = state.ema_params if config.eval.use_ema else state.params
  ev = evaluate(eval_step, task, params, batches, mesh, int(config.eval.seed))
  n = int(num_samples or config.eval.get("fd_num_samples", 1000))
  t0 = time.time()
  sparams = state.ema_params if config.sampling.use_ema else state.params
  samples, stats = sample_images(task, sparams, config, data.tokenizer, n,
                                 batch_size=sample_batch, mesh=mesh, rules=rules,
                                 seed=int(config.sampling.seed))
  sample_s = time.time() - t0
  clf = classifier_lib.Classifier.load(classifier_path)
  ref = data.images("eval")
  fd = classifier_lib.classifier_frechet_distance(clf, samples, ref)
  # The same statistic for n real held-out images vs the eval split: the noise floor.
  fd_floor = classifier_lib.classifier_frechet_distance(clf, data.images("train", n), ref)
  step = int(state.step)
  out_dir = os.path.join(workdir, "samples")
  grid = _on_main(write_png, os.path.join(out_dir, f"fd_step_{step}.png"),
                   image_grid(samples[:64], scale=2))
  result = {
      "step": step, "bits_per_dim": classifier_lib.bits_per_dim(ev["nll"]), "eval_nll": ev["nll"],
      "bound": "valid ELBO (marginal)", "eval_tokens": ev["eval_tokens"],
      "classifier_frechet_distance": fd, "fd_real_train_vs_eval": fd_floor,
      "fd_num_samples": n, "fd_reference_images": int(len(ref)),
      "classifier": os.path.abspath(classifier_path),
      "classifier_test_accuracy": clf.meta.get("test_accuracy"),
      "sampler": stats.get("sampler"), "sampling_steps": stats.get("num_steps"),
      "nfe_per_sample": stats.get("nfe"), "sample_seconds": sample_s, "grid_png": grid,
      "note": "classifier Frechet distance uses the project's own CNN features, not Inception: "
              "not comparable with FID.",
  }
  if inception_weights:      # published FID, samples vs the same reference images
    t1 = time.time()
    result.update({"fid": inception.standard_fid(samples, ref, inception_weights),
                   "fid_inception_weights": os.path.abspath(inception_weights),
                   "fid_seconds": time.time() - t1})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"image_eval_step_{step}.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def evaluate_generator(config, workdir: str, classifier_path: str, num_samples: int = 0,
                       sample_batch: int = 0) -> Dict[str, Any]:
  """Classifier Frechet distance of one-step samples vs the eval split, and a PNG grid."""
  task, params, data, step = distill.restore_generator(config, workdir)
  if not getattr(data.tokenizer, "is_image", False):
    raise ConfigError("evaluate_distilled needs an image dataset (the Frechet distance is on "
                      "image classifier features).")
  n = int(num_samples or config.eval.get("fd_num_samples", 1000))
  samples, timing = distill.generate_images(task, params, config, data.tokenizer, n, sample_batch,
                                    seed=int(config.sampling.seed))
  clf = classifier_lib.Classifier.load(classifier_path)
  ref = data.images("eval")
  fd = classifier_lib.classifier_frechet_distance(clf, samples, ref)
  fd_floor = classifier_lib.classifier_frechet_distance(clf, data.images("train", n), ref)
  grid = _on_main(write_png, os.path.join(workdir, "samples", f"fd_step_{step}.png"),
                   image_grid(samples[:64], scale=2))
  result = {
      "step": step, "method": "Di[M]O one-step generator", "classifier_frechet_distance": fd,
      "fd_real_train_vs_eval": fd_floor, "fd_num_samples": n,
      "fd_reference_images": int(len(ref)), "classifier": os.path.abspath(classifier_path),
      "classifier_test_accuracy": clf.meta.get("test_accuracy"), "grid_png": grid,
      "bits_per_dim": None,
      "bits_per_dim_note": "a one-step generator has no tractable likelihood / ELBO",
      **timing,
      "note": "classifier Frechet distance uses the project's own CNN features, not Inception: "
              "not comparable with FID.",
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"image_eval_onestep_step_{step}.json"), "w") as f:
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
  config = f.config
  if f.mode == "train_classifier":
    path = f.classifier_path or config.eval.get("classifier_path", "")
    if not path:
      raise SystemExit("error: --classifier_path=DIR is needed (where the classifier goes).")
    data = build_data(config.data)
    if data.train_labels is None or data.num_classes < 2:
      raise SystemExit(f"error: {config.data.dataset} has no class labels to train the feature "
                       "classifier on; train it on a labelled dataset of the same image size.")
    # On the common train loop: checkpointed in DIR/checkpoints, a re-run resumes.
    clf = train_classifier(data.images("train"), data.train_labels, data.num_classes,
                           steps=f.classifier_steps, batch_size=f.classifier_batch,
                           path=path, eval_images=data.images("eval"),
                           eval_labels=data.eval_labels, log_every=100, config=config)
    print(json.dumps({"path": os.path.abspath(path), **clf.meta}, indent=2))
    return
  if not f.workdir or not f.classifier_path:
    raise SystemExit(f"error: --mode={f.mode} needs --workdir and --classifier_path.")
  if f.mode == "evaluate_distilled":   # a Di[M]O one-step generator (mdm_jax/trainers/distill.py)
    res = evaluate_generator(config, os.path.abspath(f.workdir), f.classifier_path,
                                     f.num_samples, f.sample_batch)
    print(json.dumps(res, indent=2, default=str))
    return
  res = evaluate_images(config, os.path.abspath(f.workdir), f.classifier_path, f.num_samples,
                        f.sample_batch, inception_weights=f.inception_weights)
  print(json.dumps(res, indent=2, default=str))


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "An image config, e.g. "
                                  "fashion_mnist_prime.", lock_config=False)
  flags.DEFINE_enum("mode", "evaluate", ["train_classifier", "evaluate", "evaluate_distilled"],
                    "What to run (evaluate_distilled: a --mode=distill workdir, one-step "
                    "samples).")
  flags.DEFINE_string("workdir", None, "evaluate: the diffusion run's workdir.")
  flags.DEFINE_string("classifier_path", "", "Directory of the feature classifier.")
  flags.DEFINE_integer("num_samples", 0, "evaluate: samples for the Frechet distance "
                       "(0 = config.eval.fd_num_samples).")
  flags.DEFINE_integer("sample_batch", 0, "evaluate: samples per sampler call "
                       "(0 = config.sampling.num_samples).")
  flags.DEFINE_string("inception_weights", "", "evaluate: also report standard FID with the "
                      "FID Inception-v3 weights at this path (.npz of pytorch-fid's state dict, "
                      "or jax-fid's .pickle); nothing is downloaded.")
  flags.DEFINE_integer("classifier_steps", 2000, "train_classifier: Adam steps.")
  flags.DEFINE_integer("classifier_batch", 128, "train_classifier: batch size.")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.cli.eval_images --config=NAME --workdir=DIR [--mode=...] "
      "[--config.KEY=VALUE ...]"))
