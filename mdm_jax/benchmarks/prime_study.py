"""Does Prime trained with the valid bound beat MDM?  AR vs MDM vs Prime(ℓ) at equal compute.

Trains every arm on the same data, model, batch and number of steps (the sub-token input
layer is the only difference between MDM and Prime, and its FLOPs are negligible, so equal
steps are equal compute), evaluates every diffusion arm with the *valid* bound (the
training form ``joint`` is only a training loss here; it is never reported as a
likelihood) and AR with its exact NLL, then writes:

  OUT/study.json         every curve point (step, wall seconds, eval NLL) and the summary
  OUT/study.md           the table (final bound, perplexity bound, mean ± spread over seeds)
  OUT/curves_steps.png   eval perplexity bound vs training steps
  OUT/curves_wall.png    the same vs wall-clock seconds
  OUT/runs/ARM_sSEED/    each run's workdir (metrics.jsonl, checkpoints; re-running resumes)

and, with ``--sample_steps``, the sampling side: every diffusion arm samples with the
ancestral sampler at the same number of steps T (equal model calls), and a judge (the
study's own AR arm, seed 0) scores the samples: judge NLL per token (generative
perplexity), unigram entropy of the samples (low = repetitive) and the idle-step
fraction (steps where nothing was unmasked; Prime's claim is that it wastes fewer).

Arms: ``ar``, ``mdm`` (ℓ = 1), ``primeL`` (ℓ = L, trained on the valid marginal bound)
and ``primeL-joint`` (trained on the published joint loss).  Example (the default
Shakespeare set-up, minutes per arm on a GPU):

  python -m mdm_jax.benchmarks.prime_study --config=shakespeare_prime \\
      --out=docs/prime_study --arms=ar,mdm,prime2,prime2-joint,prime4,prime4-joint \\
      --seeds=0,1 --steps=4000 --eval_every=500 --sample_steps=128
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import numpy as np

from mdm_jax.core.flags import flags_parser
from mdm_jax.trainers.loop import train_and_evaluate
from mdm_jax.trainers.setup import restore_for_inference

def _define_flags():
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  global _CONFIG, _OUT, _ARMS, _SEEDS, _STEPS, _EVAL_EVERY, _SAMPLE_STEPS, _NUM_SAMPLES
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Base config (data, model, optimiser); the arms change only objective, "
      "prime.ell, prime.loss and the seed.", lock_config=False)
  _OUT = flags.DEFINE_string("out", None, "Output directory (tables, plots, run workdirs).")
  _ARMS = flags.DEFINE_list(
      "arms", ["ar", "mdm", "prime2", "prime2-joint", "prime3", "prime3-joint", "prime4",
               "prime4-joint", "prime6", "prime6-joint", "prime8", "prime8-joint"],
      "Arms: ar, mdm, primeL (valid bound), primeL-joint (published joint loss).")
  _SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds (each arm runs once per seed).")
  _STEPS = flags.DEFINE_integer("steps", None, "Training steps per run (default: the config's).")
  _EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "Eval interval (default: the config's).")
  _SAMPLE_STEPS = flags.DEFINE_list("sample_steps", [], "Sampling side: ancestral steps T "
                                    "(e.g. 128); empty = skip.")
  _NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Samples per arm and T.")

_ARM_RE = re.compile(r"^(ar|mdm|prime(\d+)(-joint)?)$")


# ------------------------------------------------------------------ arms
def parse_arm(name: str) -> Dict[str, Any]:
  """``"prime4-joint"`` -> {objective, ell, loss}; a clear error for anything else."""
  m = _ARM_RE.match(name.strip())
  if not m:
    raise ValueError(f"Unknown arm {name!r}: use ar, mdm, primeL or primeL-joint (L >= 2), "
                     "e.g. prime4-joint.")
  if m.group(1) == "ar":
    return {"name": "ar", "objective": "ar", "ell": 1, "loss": "marginal"}
  if m.group(1) == "mdm":
    return {"name": "mdm", "objective": "diffusion", "ell": 1, "loss": "marginal"}
  ell = int(m.group(2))
  if ell < 2:
    raise ValueError(f"Arm {name!r}: Prime needs ell >= 2 (ell = 1 is the arm `mdm`).")
  return {"name": m.group(1), "objective": "diffusion", "ell": ell,
          "loss": "joint" if m.group(3) else "marginal"}


def arm_config(base, arm: Dict[str, Any], seed: int, steps: Optional[int] = None,
               eval_every: Optional[int] = None):
  """The base config with only the arm's objective/ell/loss and the seed changed."""
  c = base.copy_and_resolve_references()
  c.objective = arm["objective"]
  c.prime.ell = int(arm["ell"])
  c.prime.loss = arm["loss"]
  if arm["loss"] == "joint" and c.schedule.name == "slot_poly":
    # The per-digit schedule weights each digit on its own, which the joint (one term per
    # token) objective does not define: the joint arms train on the linear schedule.
    c.schedule.name = "linear"
  c.seed = int(seed)
  if arm["objective"] == "ar":
    c.sampling.sampler = "ar"
  if steps:
    c.training.num_steps = int(steps)
    c.checkpoint.every_steps = min(int(c.checkpoint.every_steps), int(steps))
  if eval_every:
    c.eval.every_steps = int(eval_every)
  c.sampling.every_steps = 0
  c.sampling.num_samples = min(int(c.sampling.num_samples), 2)  # the study samples itself
  return c


# ------------------------------------------------------------------ curves and summary
def read_curve(workdir: str) -> List[Dict[str, float]]:
  """[(step, wall_s, nll)] from a run's metrics.jsonl (wall from the run's first record)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  recs = [json.loads(l) for l in open(path) if l.strip()]
  train = [r for r in recs if "train/loss" in r]
  if not train:
    return []
  # Wall clock counts from the first training step (compile excluded), estimated from the
  # first logged record's steps/s; evaluation pauses are included.
  first = train[0]
  t0 = first["time"] - first["step"] / max(first.get("perf/steps_per_sec", 1.0), 1e-9)
  return [{"step": int(r["step"]), "wall_s": float(r["time"] - t0),
           "nll": float(r["eval/nll"])} for r in recs if "eval/nll" in r]


def summarise(curves: Dict[str, Dict[int, List[Dict[str, float]]]]) -> List[Dict[str, Any]]:
  """Per arm: the final eval NLL over seeds (mean, min, max) and its perplexity bound."""
  rows = []
  for arm, by_seed in curves.items():
    finals = [c[-1] for c in by_seed.values() if c]
    if not finals:
      continue
    nlls = [f["nll"] for f in finals]
    mean = sum(nlls) / len(nlls)
    rows.append({"arm": arm, "seeds": len(nlls), "step": finals[0]["step"],
                 "nll": mean, "nll_min": min(nlls), "nll_max": max(nlls),
                 "ppl": math.exp(mean), "wall_s": sum(f["wall_s"] for f in finals) / len(finals)})
  rows.sort(key=lambda r: r["nll"])
  return rows


def markdown_table(rows: List[Dict[str, Any]], sampling: Dict[str, Any]) -> str:
  lines = ["| arm | seeds | steps | eval NLL (nats/token) | spread over seeds | perplexity "
           "(bound; AR exact) | wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    spread = f"{r['nll_min']:.4f}–{r['nll_max']:.4f}" if r["seeds"] > 1 else "–"
    lines.append(f"| {r['arm']} | {r['seeds']} | {r['step']} | {r['nll']:.4f} | {spread} | "
                 f"{r['ppl']:.2f} | {r['wall_s']:.0f} |")
  if sampling:
    lines += ["", "| arm | T | NFE | idle-step fraction | judge NLL/token | judge ppl | "
              "sample entropy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arm, by_t in sampling.items():
      for t, s in sorted(by_t.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {arm} | {t} | {s['nfe']} | {s.get('idle_fraction', 0.0):.3f} | "
                     f"{s['judge_nll']:.4f} | {math.exp(s['judge_nll']):.1f} | "
                     f"{s['sample_entropy']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_curves(curves, path: str, x: str) -> Optional[str]:
  """Eval perplexity bound vs ``x`` ('step' or 'wall_s') for every arm and seed (PNG)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.warning("matplotlib is not installed: no plot written to %s", path)
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (arm, by_seed) in enumerate(curves.items()):
    for j, (seed, pts) in enumerate(sorted(by_seed.items())):
      if not pts:
        continue
      ax.plot([p[x] for p in pts], [math.exp(p["nll"]) for p in pts],
              color=colors[i % len(colors)], ls="--" if arm.endswith("-joint") else "-",
              marker="o", ms=3, alpha=1.0 if j == 0 else 0.55, label=arm if j == 0 else None)
  ax.set_yscale("log")
  ax.set_xlabel("training steps" if x == "step" else "wall-clock seconds")
  ax.set_ylabel("eval perplexity (valid bound; AR exact)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


# ------------------------------------------------------------------ sampling side
def sampling_side(base, arms, out: str, steps_list: List[int], num_samples: int,
                  steps: Optional[int]) -> Dict[str, Any]:
  """Ancestral samples of every diffusion arm (seed 0) scored by the AR arm (seed 0)."""
  ar = [a for a in arms if a["objective"] == "ar"]
  if not ar:
    raise ValueError("--sample_steps needs the `ar` arm: it is the judge of sample quality.")
  ar_cfg = arm_config(base, ar[0], 0, steps)
  judge_task, judge_state, *_ = restore_for_inference(ar_cfg, _run_dir(out, "ar", 0))
  judge = jax.jit(lambda p, toks: judge_task.bound(p, toks, jax.random.key(0), 1))
  results: Dict[str, Any] = {}
  for arm in arms:
    if arm["objective"] == "ar":
      continue
    cfg = arm_config(base, arm, 0, steps)
    cfg.sampling.sampler = "ancestral"
    task, state, mesh, rules, _, _ = restore_for_inference(cfg, _run_dir(out, arm["name"], 0))
    for t in steps_list:
      res, stats = task.generate(state.ema_params, cfg, num_samples=num_samples, num_steps=t,
                                 mesh=mesh, rules=rules)
      toks = np.asarray(res.tokens)
      nll = float(np.mean(np.asarray(judge(judge_state.ema_params, toks)))) / toks.shape[1]
      results.setdefault(arm["name"], {})[str(t)] = {**stats, "judge_nll": nll}
      logging.info("%s T=%d: judge NLL %.4f, idle %.3f", arm["name"], t, nll,
                   stats.get("idle_fraction", 0.0))
  return results


def _run_dir(out: str, arm: str, seed: int) -> str:
  return os.path.join(out, "runs", f"{arm}_s{seed}")


# ------------------------------------------------------------------ driver
def run_study(base, out: str, arm_names: List[str], seeds: List[int], steps: Optional[int] = None,
              eval_every: Optional[int] = None, sample_steps: Tuple[int, ...] = (),
              num_samples: int = 16) -> Dict[str, Any]:
  arms = [parse_arm(a) for a in arm_names]
  os.makedirs(out, exist_ok=True)
  curves: Dict[str, Dict[int, List[Dict[str, float]]]] = {}
  total = len(arms) * len(seeds)
  t_start = time.time()
  for i, (arm, seed) in enumerate([(a, s) for a in arms for s in seeds]):
    wd = _run_dir(out, arm["name"], seed)
    cfg = arm_config(base, arm, seed, steps, eval_every)
    print(f"[study {i + 1}/{total}] {arm['name']} seed {seed} -> {wd} "
          f"(elapsed {time.time() - t_start:.0f} s)", flush=True)
    train_and_evaluate(cfg, wd)
    curves.setdefault(arm["name"], {})[seed] = read_curve(wd)
  rows = summarise(curves)
  sampling = (sampling_side(base, arms, out, list(sample_steps), num_samples, steps)
              if sample_steps else {})
  result = {"arms": arm_names, "seeds": seeds, "steps": steps, "summary": rows,
            "curves": {a: {str(s): c for s, c in by.items()} for a, by in curves.items()},
            "sampling": sampling,
            "note": "eval NLL is the valid NELBO bound for every diffusion arm (joint arms "
                    "included) and the exact NLL for AR, in nats per token on the eval split."}
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = markdown_table(rows, sampling)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(table)
  plot_curves(curves, os.path.join(out, "curves_steps.png"), "step")
  plot_curves(curves, os.path.join(out, "curves_wall.png"), "wall_s")
  print(table, flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _OUT.value:
    raise app.UsageError("--config and --out are required.")
  try:
    arms = [a.strip() for a in _ARMS.value]
    for a in arms:
      parse_arm(a)
    seeds = [int(s) for s in _SEEDS.value]
    sample_steps = tuple(int(s) for s in _SAMPLE_STEPS.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  run_study(_CONFIG.value, _OUT.value, arms, seeds, _STEPS.value, _EVAL_EVERY.value,
            sample_steps, _NUM_SAMPLES.value)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.benchmarks.prime_study --config=NAME --out=DIR [--config.KEY=VALUE ...]"))
