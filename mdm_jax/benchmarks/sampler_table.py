"""Sampler comparison table for a trained checkpoint: NFE, idle steps, speed, entropy.

  python -m mdm_jax.benchmarks.sampler_table --config=shakespeare_prime \
      --workdir=runs/prime_l2 [--samplers=ancestral,first_hitting,punt] [--steps=16,64,128] \
      [--num_samples=8] [--output=FILE.json] [--config.sampling.punt_eps=0.1 ...]

Restores the checkpoint exactly as ``--mode=sample`` does (latest, or
``--config.checkpoint.restore=best``), then runs every sampler at every step
count T through ``Task.generate`` (same seed for all), prints a
markdown table and writes the rows as JSON (default WORKDIR/sampler_table.json).

Columns: T = sampling.num_steps (for first_hitting the event budget, for
punt / eb / fast_dllm the step cap); NFE = network calls for the whole batch;
idle = fraction of the T steps after which nothing changed (0 by construction
for the samplers that reveal something at every step); tok/s = generated
tokens per second of the compiled sampler (compile time excluded, reported
separately in the JSON); entropy = mean per-sample unigram entropy (nats,
docs/method/algorithms.md §8.2).  Extra per-sampler numbers (adaptive "steps", corrector
"remasked") are kept in the JSON.  With ``--config.sampling.scorer_workdir=AR_RUN``
(text models) every row also gets the samples' generative perplexity under that AR
run and the entropy of the scored tokens (``mdm_jax/metrics/gen_ppl.py``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mdm_jax.core import distributed
from mdm_jax.core.flags import flags_parser
from mdm_jax.metrics.gen_ppl import score_texts
from mdm_jax.sampling import SAMPLERS
from mdm_jax.trainers.inference import scorer_from_config
from mdm_jax.trainers.setup import restore_for_inference

def _define_flags():
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  global _CONFIG, _WORKDIR, _SAMPLERS, _STEPS, _NUM_SAMPLES, _OUTPUT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The config the checkpoint was trained with (name or path).",
      lock_config=False)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoint.")
  _SAMPLERS = flags.DEFINE_list("samplers", [], "Samplers to compare (default: every "
                                "registered sampler for the model's objective).")
  _STEPS = flags.DEFINE_list("steps", ["16", "64", "128"], "Step counts T.")
  _NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Sequences per run (default: "
                                      "sampling.num_samples).")
  _OUTPUT = flags.DEFINE_string("output", None, "JSON output (default "
                                "WORKDIR/sampler_table.json).")


COLUMNS = ("sampler", "T", "NFE", "idle_fraction", "tokens_per_s", "sample_entropy")


def default_samplers(objective: str) -> List[str]:
  if objective == "ar":
    return ["ar"]
  return [n for n in SAMPLERS.names() if n != "ar"]


def run_table(config, workdir: str, samplers: Optional[Sequence[str]] = None,
              steps: Sequence[int] = (16, 64, 128),
              num_samples: Optional[int] = None) -> List[Dict[str, Any]]:
  """One row per (sampler, T), from ``Task.generate`` on the restored checkpoint."""
  task, state, mesh, rules, data, _ = restore_for_inference(config, workdir)
  params = state.ema_params if config.sampling.use_ema else state.params
  scorer = scorer_from_config(config)
  samplers = list(samplers or default_samplers(task.objective))
  rows = []
  for name in samplers:
    for t in steps:
      res, st = task.generate(params, config, num_steps=int(t), sampler=name,
                              num_samples=num_samples, mesh=mesh, rules=rules)
      if scorer is not None:
        scored = score_texts(
            scorer, [data.tokenizer.decode(r) for r in np.asarray(res.tokens)])
        st = {**st, "gen_ppl": scored["gen_ppl"], "gen_entropy": scored["entropy"]}
      row = {"sampler": name, "T": int(t), "NFE": st["nfe"],
             "idle_fraction": st.get("idle_fraction"), "tokens_per_s": st["tokens_per_s"],
             "sample_entropy": st["sample_entropy"]}
      row.update({k: v for k, v in st.items() if k not in ("sampler", "num_steps", "nfe")
                  and k not in row})
      row["step"] = int(state.step)
      rows.append(row)
      gen = f" gen ppl {st['gen_ppl']:.1f}" if "gen_ppl" in st else ""
      print(f"{name:>14s} T={t:<5d} NFE={st['nfe']:<6d} {st['tokens_per_s']:10.1f} tok/s "
            f"entropy {st['sample_entropy']:.3f}{gen}", file=sys.stderr, flush=True)
  return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
  """The rows as a markdown table (sampler, T, NFE, idle-step fraction, tokens/s, entropy;
  gen ppl and its entropy when the rows were scored)."""
  gen = any("gen_ppl" in r for r in rows)
  out = ["| sampler | T | NFE | idle-step fraction | tokens/s | sample entropy (nats) |"
         + (" gen ppl | gen entropy |" if gen else ""),
         "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if gen else "")]
  for r in rows:
    idle = "n/a" if r.get("idle_fraction") is None else f"{r['idle_fraction']:.3f}"
    line = (f"| {r['sampler']} | {r['T']} | {r['NFE']} | {idle} | "
            f"{r['tokens_per_s']:.1f} | {r['sample_entropy']:.3f} |")
    if gen:
      line += (f" {r['gen_ppl']:.1f} | {r['gen_entropy']:.2f} |" if "gen_ppl" in r
               else " – | – |")
    out.append(line)
  return "\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  distributed.maybe_initialize()
  import jax  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  steps = [int(s) for s in _STEPS.value]
  rows = run_table(_CONFIG.value, workdir, _SAMPLERS.value or None, steps, _NUM_SAMPLES.value)
  table = markdown(rows)
  if jax.process_index() == 0:
    out = _OUTPUT.value or os.path.join(workdir, "sampler_table.json")
    with open(out, "w") as f:
      json.dump({"workdir": workdir, "rows": rows, "markdown": table}, f, indent=2)
    print(table)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.benchmarks.sampler_table --config=NAME --workdir=DIR [--config.KEY=VALUE ...]"))
