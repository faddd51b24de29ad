"""Pictures and numbers of docs/results/learned_schedules.md from finished run directories.

  python docs/results/assets/learned_schedules/pictures.py --out docs/results/assets/learned_schedules \
      --tilt RUN [RUN ...] --genmd4_prime RUN [RUN ...] --genmd4_mdm RUN [RUN ...]

RUN is a run directory, optionally followed by =LABEL (the legend).

* ``kappa.png``: the learned tilt kappa = log w_0 - log w_1 of ``learned_tilt`` runs against
  the training step (``train/schedule_kappa`` in metrics.jsonl), next to the hand-set 1.
* ``genmd4_prime.png`` / ``genmd4_mdm.png``: the final GenMD4 exponents (the last
  ``schedule/step_N.json``) against the value's rank by frequency in the training data
  (most frequent first): one panel per digit slot for Prime, one for MDM.
Prints the numbers quoted on the page (final kappa, spread of log w and its rank
correlation with the value's frequency).
"""

import argparse
import glob
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from mdm_jax.data.text import make_text_data  # noqa: E402
from mdm_jax.diffusion import prime  # noqa: E402


def _split(arg):
  """``DIR`` or ``DIR=LABEL`` -> (DIR, LABEL)."""
  run, _, label = arg.partition("=")
  return run, label or os.path.basename(run.rstrip("/"))


def _metrics(run):
  return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _last_exponents(run):
  files = glob.glob(os.path.join(run, "schedule", "step_*.json"))
  last = max(files, key=lambda p: int(os.path.basename(p)[5:-5]))
  return json.load(open(last))


def _value_counts(run, ell):
  """Counts of every digit value per slot [ell, b] over the run's training rows."""
  cfg = ml_collections.ConfigDict(json.load(open(os.path.join(run, "config.json"))))
  data = make_text_data(cfg.data, run)
  codec = prime.PrimeCodec.create(data.tokenizer.vocab_size, ell)
  digits = np.asarray(codec.encode(np.asarray(data.train).ravel()))
  return np.stack([np.bincount(digits[:, j], minlength=codec.base) for j in range(ell)])


def tilt_picture(runs, out):
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for run, label in map(_split, runs):
    rec = [r for r in _metrics(run) if "train/schedule_kappa" in r]
    steps = [r["step"] for r in rec]
    kappa = [r["train/schedule_kappa"] for r in rec]
    ax.plot(steps, kappa, label=label)
    print(f"{label}: final kappa {kappa[-1]:.4f} (max |kappa| {np.max(np.abs(kappa)):.4f})")
  ax.axhline(1.0, color="grey", ls="--", lw=1, label="slot_poly default (kappa = 1)")
  ax.axhline(0.0, color="black", lw=0.5)
  ax.set_xlabel("training step")
  ax.set_ylabel("learned kappa = log w_0 - log w_1")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "kappa.png"), dpi=110)


def genmd4_picture(runs, out, name):
  runs, labels = zip(*map(_split, runs))
  summaries = [_last_exponents(r) for r in runs]
  ell = summaries[0]["ell"]
  counts = _value_counts(runs[0], ell)
  fig, axes = plt.subplots(1, ell, figsize=(5.5 * ell, 3.4), squeeze=False)
  for j in range(ell):
    order = np.argsort(-counts[j], kind="stable")
    ax = axes[0, j]
    for label, summ in zip(labels, summaries):
      lw = np.log(np.asarray(summ["w"])[j])
      ax.plot(np.arange(len(order)), lw[order], ".", ms=3 if ell == 1 else 5, label=label)
      seen = counts[j][order] > 0
      rho = stats.spearmanr(np.log(counts[j][order][seen]), lw[order][seen]).correlation
      print(f"{label} slot {j}: log w mean {lw.mean():+.4f} std {lw.std():.4f} "
            f"min {lw.min():+.4f} max {lw.max():+.4f}; Spearman(log w, log count) {rho:+.3f}")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("value rank by training frequency (0 = most frequent)")
    ax.set_ylabel("log w")
    ax.set_title(f"digit slot {j}" if ell > 1 else "token value")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--tilt", nargs="*", default=[])
  p.add_argument("--genmd4_prime", nargs="*", default=[])
  p.add_argument("--genmd4_mdm", nargs="*", default=[])
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  if a.tilt:
    tilt_picture(a.tilt, a.out)
  if a.genmd4_prime:
    genmd4_picture(a.genmd4_prime, a.out, "genmd4_prime")
  if a.genmd4_mdm:
    genmd4_picture(a.genmd4_mdm, a.out, "genmd4_mdm")


if __name__ == "__main__":
  main()
