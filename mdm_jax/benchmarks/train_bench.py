"""Training throughput: step time, tokens/s, model FLOPs utilisation and memory of the real step.

Runs the trainer's own jitted step (``mdm_jax.trainers.steps.make_train_step``: sharded state,
microbatching, EMA, optimizer) on synthetic tokens for each ``--ell`` and prints a table:

  step ms | tokens/s | model TFLOP/s | MFU vs the measured matmul ceiling | peak memory

Model FLOPs count every matmul of the forward and backward pass (6 x params x tokens,
the output head included) plus attention (QK^T and AV: 12 x L x d per layer per token,
no causal discount), the convention of the PaLM/MaxText MFU.  The ceiling is measured in
the same process: a large matmul in ``--ceiling_dtype`` (bf16 by default) on one device,
so MFU = achieved model FLOP/s per device / measured matmul FLOP/s.

  # the paper's text size on one GPU (DiT 12 x 768, seq 1024, GPT-2 vocabulary):
  python -m mdm_jax.benchmarks.train_bench --config=owt_prime --ells=1,2 \\
      --batch_size=32 --out=bench/train.json
  # the default CPU job (regression guard for the 2-core box):
  python -m mdm_jax.benchmarks.train_bench --config=shakespeare_prime --ells=1,2 \\
      --vocab_size=1024 --ceiling_dtype=float32 --ceiling_size=1024

Anything in the config can be overridden (``--config.model.remat=dots``,
``--config.training.num_microbatches=4``, ``--config.model.attention_impl=cudnn``).
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any, Callable, Dict, List

from absl import app, flags
from ml_collections import config_flags

from mdm_jax.benchmarks.flops import model_flops_per_token
from mdm_jax.core import sharding as shd
from mdm_jax.core.flags import flags_parser
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import init_state, make_optimizer
from mdm_jax.trainers.steps import make_train_step

def _define_flags():
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  global _CONFIG, _ELLS, _VOCAB, _BATCH, _STEPS, _WARMUP, _CEIL_DTYPE, _CEIL_SIZE, _OUT
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config to benchmark.",
                                            lock_config=False)
  _ELLS = flags.DEFINE_list("ells", ["1", "2"], "Prime ell values (1 = MDM); 'ar' for the AR model.")
  _VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary size (no tokenizer is loaded).")
  _BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0 = the config's).")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after --warmup).")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  _CEIL_DTYPE = flags.DEFINE_string("ceiling_dtype", "bfloat16", "dtype of the ceiling matmul.")
  _CEIL_SIZE = flags.DEFINE_integer("ceiling_size", 8192, "n of the n x n x n ceiling matmul.")
  _OUT = flags.DEFINE_string("out", "", "JSON output path.")


def matmul_ceiling(dtype_name: str, n: int, repeats: int = 10) -> float:
  """Measured dense matmul FLOP/s on one device (the best of ``repeats``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(dtype_name)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  # A chain of 4 dependent matmuls per call keeps dispatch out of the timing.
  f = jax.jit(lambda a, b: ((((a @ b) @ b) @ b) @ b))
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 4 * 2.0 * n ** 3 / best


def timed(call: Callable[[int], Any], steps: int, warmup: int) -> List[float]:
  """Seconds of each of ``steps`` calls ``call(i)`` (its result blocked on), after ``warmup``
  untimed calls."""
  import jax  # pylint: disable=import-outside-toplevel
  for i in range(warmup):
    jax.block_until_ready(call(i))
  times = []
  for i in range(warmup, warmup + steps):
    t0 = time.perf_counter()
    jax.block_until_ready(call(i))
    times.append(time.perf_counter() - t0)
  return times


def peak_memory() -> Dict[str, Any]:
  """The first device's peak memory in use since the process started (bytes and GiB, where
  the device reports it) and the host process's peak resident memory (GiB)."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = {}
  try:
    ms = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in ms:
      stats["device_peak_bytes"] = int(ms["peak_bytes_in_use"])
      stats["device_peak_gib"] = ms["peak_bytes_in_use"] / 2**30
  except Exception:  # pylint: disable=broad-except
    pass
  stats["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return stats


def bench_one(config, ell: str, vocab: int, batch: int, steps: int, warmup: int) -> Dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  c = config.copy_and_resolve_references()
  if ell == "ar":
    c.objective, c.prime.ell = "ar", 1
  else:
    c.objective, c.prime.ell = "diffusion", int(ell)
  if batch:
    c.training.batch_size = int(batch)
  task = build_task(c, vocab)
  mesh = shd.make_mesh(c.mesh)
  rules = shd.logical_rules(c.mesh)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, 0)
  step = make_train_step(task, tx, c, mesh, rules, shardings)
  bsz, length = int(c.training.batch_size), int(c.data.seq_len)
  rng = np.random.default_rng(0)
  batch_sh = shd.batch_sharding(mesh)
  batches = [{"tokens": jax.device_put(rng.integers(0, vocab, (bsz, length), dtype=np.int32),
                                       batch_sh)} for _ in range(2)]
  metrics = {}

  def one(i):
    nonlocal state
    state, metrics["last"] = compiled(state, batches[i % 2])
    return metrics["last"]

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    times = timed(one, steps, warmup)
  step_s = float(np.median(times))
  tokens = bsz * length
  fpt = model_flops_per_token(c.model, vocab, length)
  n_dev = int(np.prod(mesh.devices.shape))
  return {"ell": ell, "batch_size": bsz, "seq_len": length, "devices": n_dev,
          "microbatches": int(c.training.num_microbatches), "remat": str(c.model.remat),
          "dtype": str(c.model.dtype), "attention_impl": str(c.model.attention_impl),
          "compile_s": compile_s, "step_ms": step_s * 1e3,
          "step_ms_min": float(np.min(times)) * 1e3, "tokens_per_s": tokens / step_s,
          "model_flops_per_token": fpt,
          "model_tflops_per_s_per_device": fpt * tokens / step_s / n_dev / 1e12,
          "loss": float(metrics["last"]["loss"]), **peak_memory()}


def run(config, ells: List[str], vocab: int, batch: int, steps: int, warmup: int,
        ceiling_dtype: str, ceiling_size: int) -> Dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  ceiling = matmul_ceiling(ceiling_dtype, ceiling_size)
  rows = []
  for ell in ells:
    r = bench_one(config, ell, vocab, batch, steps, warmup)
    r["mfu"] = r["model_tflops_per_s_per_device"] * 1e12 / ceiling
    rows.append(r)
    print(f"ell={ell}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
          f"MFU {100 * r['mfu']:.1f}%", flush=True)
  return {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
          "jax": jax.__version__, "ceiling_dtype": ceiling_dtype, "ceiling_n": ceiling_size,
          "ceiling_tflops": ceiling / 1e12, "model": dict(config.model), "vocab_size": vocab,
          "date": time.strftime("%Y-%m-%d"), "rows": rows}


def table(res: Dict[str, Any]) -> str:
  lines = [f"device: {res['device']} ({res['platform']}, jax {res['jax']}); measured "
           f"{res['ceiling_dtype']} matmul ceiling {res['ceiling_tflops']:.2f} TFLOP/s", "",
           "| ell | batch x seq | micro | remat | step ms | tokens/s | model TFLOP/s/dev | MFU | "
           "peak mem GiB |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
  for r in res["rows"]:
    mem = r.get("device_peak_gib", r["host_max_rss_gib"])
    lines.append(f"| {r['ell']} | {r['batch_size']} x {r['seq_len']} | {r['microbatches']} | "
                 f"{r['remat']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                 f"{r['model_tflops_per_s_per_device']:.3f} | {100 * r['mfu']:.1f}% | "
                 f"{mem:.2f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required.")
  for e in _ELLS.value:
    if e != "ar" and not e.isdigit():
      raise app.UsageError(f"--ells: {e!r} is not an integer ell or 'ar'.")
  res = run(_CONFIG.value, _ELLS.value, _VOCAB.value, _BATCH.value, _STEPS.value, _WARMUP.value,
            _CEIL_DTYPE.value, _CEIL_SIZE.value)
  print(table(res))
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.benchmarks.train_bench --config=NAME [--config.KEY=VALUE ...]"))
