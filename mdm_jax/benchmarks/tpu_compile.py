"""Compiled for TPU, not run: per-chip HBM, FLOPs, a roofline bound and the collectives.

Compiles the trainer's own train step (``make_train_step``: sharded state, microbatching,
EMA, optimizer), its eval step (``make_eval_step``) and one step of the task's sampler
(the sampler at ``num_steps=1``) for a TPU slice that is not attached: libtpu describes
the slice (``jax.experimental.topologies``) and compiles for it on this CPU.  Per chip it
reports

* HBM: arguments, temporaries, outputs less the donated (aliased) part, generated code,
  against the chip's capacity.  A program that does not fit is refused by the compiler
  (``... (23.26G) exceeds available HBM (15.75G)``); the report then says "does not fit,
  needs X GiB" with both numbers read from that message;
* FLOPs: XLA's count for the compiled program against the model's (the MFU convention of
  ``benchmarks/flops.py``).  XLA counts a ``while`` body once, so with
  ``model.scan_layers`` (or microbatches) the raw count is about 1/num_layers of the
  truth.  The report adds the missing iterations: it lowers (does not compile) the same
  step twice on the CPU, once as configured and once with the layers (and the loss's
  slices of positions, ``model.loss_chunk``) unrolled and one microbatch (the eval bound:
  one time sample, times the configured number), and adds the difference of XLA's two
  counts, per device;
* HBM bytes accessed (XLA's count, loop bodies once: a lower bound);
* a roofline lower bound on the step time, max(FLOPs / peak, bytes / bandwidth), from the
  chip's published peaks (``CHIPS``), hence an upper bound on MFU; XLA's own
  ``optimal_seconds`` beside it where it is positive;
* the collectives of the compiled program (kind, count, bytes, the mesh axes their
  replica groups span; loop bodies weighted by their trip counts), and compile time.

  python -m mdm_jax.benchmarks.tpu_compile --config=owt_mdm --topology=v5p:2x2x1 \\
      --per_chip_batch=8 --output_dir=bench/tpu
  python -m mdm_jax.benchmarks.tpu_compile --config=owt_prime:ell=2 --topology=v5e:2x2 \\
      --find_max_batch
  python -m mdm_jax.benchmarks.tpu_compile --config=owt_mdm --topology=v5p:2x2x1 \\
      --num_slices=2 --config.mesh.shape='(2,-1,1)'

Topologies are ``FAMILY:AxB`` (v5e, v6e) or ``FAMILY:AxBxC`` (v4, v5p), from one chip
(``v5e:1x1``) to large slices (``v5p:8x8x8``); ``--num_slices`` describes several slices
joined over the data-centre network (the mesh's data axis then spans the slices).  The
compile-only v4 topology has two devices (TensorCores) per chip; its per-device figures
are halves of a chip's.  ``--config.KEY=VALUE`` overrides anything (``model.remat=dots``,
``training.num_microbatches=4``).  Each result row keeps the program, batch and chip, so
a measured step time from attached devices can sit beside the bound in the same report.

Run on the attached devices (``--run``; the default when they are GPUs or TPUs, ``--norun``
compiles for ``--topology`` there too), the same programs are timed instead of compiled
for a slice: the train and eval steps on synthetic tokens, each the median of ``--steps``
calls after ``--warmup`` (``block_until_ready``), with tokens/s, model TFLOP/s per device
and MFU against a bf16 matmul (``--ceiling_size``) measured on the first device in the same
process, and the device's peak memory (``memory_stats()["peak_bytes_in_use"]`` since the
process started; "n/a" where the device reports none, as on CPU); then the task's
configured sampler run to completion at each T of ``--sample_steps`` (default 128 and
1,024): NFE, seconds, ms per NFE, tokens/s.  Before each program and each T the elapsed
time is checked against ``--time_budget_s`` (the T = 1,024 run predicted from the one
before it); what would overrun is skipped and named in the report's notes.  With
``--output_dir`` the report is ``run.json`` and ``run.md``, beside a compile report:

  python -m mdm_jax.benchmarks.tpu_compile --config=owt_mdm --run --per_chip_batch=16 \\
      --output_dir=bench/gpu_owt_mdm
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import app, flags
from ml_collections import config_flags

from mdm_jax.benchmarks.collectives import parse_collectives
from mdm_jax.benchmarks.flops import model_flops_per_token
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.core.flags import flags_parser
from mdm_jax.diffusion import elbo

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  device_kind: str      # what the compile-only devices call themselves
  peak_flops: float     # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  hbm_gib: float        # HBM capacity per chip
  dims: int             # topology dimensions: 2 (AxB) or 3 (AxBxC)


# Published per-chip figures (Google Cloud TPU system architecture pages): peak dense bf16
# FLOP/s, HBM bandwidth and HBM capacity.  They are the vendor's numbers, not measured here.
CHIPS: Dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 1228e9, 32.0, 3),
    "v5e": Chip("TPU v5 lite", 197e12, 819e9, 16.0, 2),
    "v5p": Chip("TPU v5", 459e12, 2765e9, 95.0, 3),
    "v6e": Chip("TPU v6 lite", 918e12, 1640e9, 32.0, 2),
}
PROGRAMS = ("train", "eval", "sample")

# libtpu's start-up complaints on a host that is not a TPU VM (harmless when compiling).
_NOISE = re.compile(r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|^E0000 |Logging before "
                    r"InitGoogle|=== Source Location Trace|libtpu_init_utils\.cc|"
                    r"ALLOW_MULTIPLE_LIBTPU_LOAD")
_OOM = re.compile(r"\(([\d.]+)\s*([KMGTP]?)i?B?\)\s*exceeds available HBM\s*\(([\d.]+)\s*"
                  r"([KMGTP]?)i?B?\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40, "P": 2 ** 50}


class ReportError(Exception):
  """A bad topology, mesh or batch: reported in one line, exit status 2."""


def _define_flags():
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  global _CONFIG, _TOPOLOGY, _SLICES, _BATCH, _VOCAB, _FIND, _MAX_BATCH, _PROGRAMS, _OUT_DIR
  global _RUN, _STEPS, _WARMUP, _SAMPLE_STEPS, _CEIL_SIZE, _BUDGET
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config to compile (as for "
                                            "mdm_jax.main).", lock_config=False)
  _TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU slice: v4|v5p:AxBxC or "
                                  "v5e|v6e:AxB (not used with --run).")
  _SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-centre network.")
  _BATCH = flags.DEFINE_integer("per_chip_batch", 0, "Sequences per chip (with --run: per "
                                "attached device) for every program (0 = training.batch_size "
                                "/ chips).")
  _VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary size (no tokenizer is loaded).")
  _FIND = flags.DEFINE_bool("find_max_batch", False, "Also find the largest per-chip batch "
                            "whose train step fits, by bisection over the global batch.")
  _MAX_BATCH = flags.DEFINE_integer("max_per_chip_batch", 4096, "Upper end of that search.")
  _PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile (or, with "
                                "--run, to time).")
  _OUT_DIR = flags.DEFINE_string("output_dir", "", "Write report.json and report.md (with "
                                 "--run: run.json and run.md) here (default: print the table "
                                 "only).")
  _RUN = flags.DEFINE_bool("run", None, "Run and time the programs on the attached devices "
                           "instead of compiling for --topology (default: when the attached "
                           "devices are not CPUs).")
  _STEPS = flags.DEFINE_integer("steps", 10, "--run: timed calls of each step (the median is "
                                "reported).")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "--run: untimed calls after compilation.")
  _SAMPLE_STEPS = flags.DEFINE_list("sample_steps", ["128", "1024"], "--run: sampler step "
                                    "counts T, each sampled to completion once.")
  _CEIL_SIZE = flags.DEFINE_integer("ceiling_size", 0, "--run: n of the n x n x n bf16 matmul "
                                    "ceiling (0 = 8192 on accelerators, 256 on CPU).")
  _BUDGET = flags.DEFINE_float("time_budget_s", 420.0, "--run: seconds after which the programs "
                               "not yet started are skipped (named in the report's notes).")


# ---- the slice

def parse_topology(name: str) -> Tuple[str, Tuple[int, ...]]:
  """``"v5p:2x2x1"`` -> ("v5p", (2, 2, 1)); ReportError for anything else."""
  m = re.fullmatch(r"\s*([a-z0-9]+):(\d+(?:x\d+)*)\s*", name or "")
  families = ", ".join(f"{k}:{'x'.join(['N'] * c.dims)}" for k, c in CHIPS.items())
  if not m:
    raise ReportError(f"--topology={name!r} is not FAMILY:AxB[xC]; use one of {families} "
                      "(e.g. v5p:2x2x1, v5e:2x2).")
  family, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if family not in CHIPS:
    raise ReportError(f"--topology={name!r}: unknown TPU family {family!r}; use one of "
                      f"{families}.")
  if len(dims) != CHIPS[family].dims or min(dims) < 1:
    raise ReportError(f"--topology={name!r}: {family} slices have {CHIPS[family].dims} "
                      f"positive dimensions ({family}:{'x'.join(['2'] * CHIPS[family].dims)}).")
  return family, dims


@contextlib.contextmanager
def quiet_libtpu() -> Iterator[None]:
  """Runs the block with file descriptor 2 captured, then replays what was written there
  except libtpu's start-up warnings (``_NOISE``)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      kept = [l for l in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
              if not _NOISE.search(l)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def tpu_devices(topology: str, num_slices: int = 1) -> Tuple[List[Any], Dict[str, Any]]:
  """Compile-only devices of a TPU slice, and what the report needs to know about it."""
  family, dims = parse_topology(topology)
  if num_slices < 1:
    raise ReportError(f"--num_slices={num_slices} must be at least 1.")
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ReportError(f"compiling for TPU needs libtpu ({e}); install it with pip install "
                      "\"jax[tpu]==<this jax>\" (launch/setup_env.sh does).") from e
  if not _tpu_chips_here():
    # libtpu holds /tmp/libtpu_lockfile against a second process on the same chips; with
    # no chip here (compiling only) several processes may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs: Dict[str, Any] = {}
  dims3 = tuple(dims) + (1,) * (3 - len(dims))
  if dims3[0] < 2 or dims3[1] < 2:          # smaller than one 2x2 host: the slice is the host
    kwargs["chips_per_host_bounds"] = (min(dims3[0], 2), min(dims3[1], 2), 1)
  if num_slices > 1:
    kwargs["num_slices"] = int(num_slices)
  try:
    with quiet_libtpu():
      devices = list(topologies.get_topology_desc(
          platform="tpu", topology_name=f"{family}:{'x'.join(map(str, dims))}",
          **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises JaxRuntimeError)
    msg = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise ReportError(f"--topology={topology!r}: libtpu cannot describe this slice: "
                      f"{msg}") from e
  chips = math.prod(dims) * num_slices
  spec = CHIPS[family]
  info = {"topology": f"{family}:{'x'.join(map(str, dims))}", "family": family,
          "num_slices": int(num_slices), "chips": chips, "devices": len(devices),
          "devices_per_chip": max(len(devices) // chips, 1),
          "device_kind": str(devices[0].device_kind), "peak_tflops_per_chip": spec.peak_flops / 1e12,
          "hbm_gbps_per_chip": spec.hbm_bandwidth / 1e9, "hbm_gib_per_chip": spec.hbm_gib}
  return devices, info


def _tpu_chips_here() -> bool:
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return False


def tpu_mesh(mesh_config, devices: Sequence[Any], num_slices: int = 1):
  """The config's (data, fsdp, tensor) mesh over compile-only devices.

  One slice: ``core.sharding.make_mesh`` (the trainer's own placement).  Several slices:
  the data axis spans them (``mesh_utils.create_hybrid_device_mesh``).  Where JAX cannot
  place devices by their physical layout (the two-core v4 chips of the compile-only
  topology), they are laid out in the order libtpu lists them.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  try:
    shape = shd.resolve_mesh_shape(mesh_config.shape, len(devices))
  except ValueError as e:
    raise ReportError(f"{e} (the slice has {len(devices)} devices)") from e
  axis_types = (jax.sharding.AxisType.Auto,) * len(shd.MESH_AXES)
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ReportError(f"config.mesh.shape={shape}: with --num_slices={num_slices} the data "
                        f"axis must be a multiple of {num_slices} (e.g. "
                        f"--config.mesh.shape='({num_slices},-1,1)').")
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    ici = (shape[0] // num_slices, shape[1], shape[2])
    try:
      arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
    except Exception:  # pylint: disable=broad-except
      arr = np.asarray(sorted(devices, key=lambda d: (d.slice_index, d.id)),
                       dtype=object).reshape(shape)
    return jax.sharding.Mesh(arr, shd.MESH_AXES, axis_types=axis_types)
  try:
    return shd.make_mesh(mesh_config, devices)
  except AssertionError:
    return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(shape), shd.MESH_AXES,
                             axis_types=axis_types)


# ---- reading a compiled program

def parse_hbm_oom(message: str) -> Optional[Tuple[float, float]]:
  """(needed, available) bytes from the compiler's out-of-HBM refusal, else None."""
  m = _OOM.search(message)
  if not m:
    return None
  return (float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)])


def memory_of(compiled) -> Dict[str, float]:
  """Per-device HBM of a compiled program (``memory_analysis``), in bytes."""
  m = compiled.memory_analysis()
  out = {k: float(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "temp", "output", "alias", "generated_code")}
  out["total"] = (out["argument"] + out["temp"] + out["output"] - out["alias"]
                  + out["generated_code"])
  peak = getattr(m, "peak_memory_in_bytes", None)
  if peak:
    out["peak"] = float(peak)
  return out


def cost_of(compiled_or_lowered) -> Dict[str, float]:
  """XLA's cost analysis (a dict, or a list of one dict on some versions)."""
  ca = compiled_or_lowered.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
          "optimal_seconds": float(ca.get("optimal_seconds", 0.0) or 0.0)}


def roofline(flops: float, bytes_accessed: float, chip: Chip, devices_per_chip: int = 1,
             model_flops: float = 0.0) -> Dict[str, float]:
  """Step-time lower bound of one device from its share of the chip's peaks."""
  peak = chip.peak_flops / devices_per_chip
  bw = chip.hbm_bandwidth / devices_per_chip
  compute_s, memory_s = flops / peak, bytes_accessed / bw
  bound = max(compute_s, memory_s)
  out = {"compute_s": compute_s, "memory_s": memory_s, "step_s_lower_bound": bound,
         "bound_by": "compute" if compute_s >= memory_s else "memory"}
  if model_flops and bound > 0:
    out["mfu_upper_bound"] = model_flops / (peak * bound)
  return out


def compile_one(fn, args: Sequence[Any], mesh, chip: Chip, devices_per_chip: int) -> Dict[str, Any]:
  """Compiles ``fn(*args)``; returns fits/memory/cost/collectives, or the refusal's numbers."""
  import jax  # pylint: disable=import-outside-toplevel
  cache = bool(jax.config.jax_enable_compilation_cache)
  jax.config.update("jax_enable_compilation_cache", False)   # compile-only programs cannot
  t0 = time.perf_counter()                                    # be read back from the cache
  try:
    with quiet_libtpu(), jax.set_mesh(mesh), warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*persistent compilation cache")
      compiled = fn.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = parse_hbm_oom(str(e))
    if oom is None:
      raise
    return {"fits": False, "compile_s": time.perf_counter() - t0, "needed_bytes": oom[0],
            "available_bytes": oom[1], "error": str(e).strip().splitlines()[0][:400]}
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  compile_s = time.perf_counter() - t0
  mem = memory_of(compiled)
  capacity = chip.hbm_gib * GIB / devices_per_chip
  n = len(mesh.devices.flat)
  return {"fits": mem["total"] <= capacity, "compile_s": compile_s, "memory": mem,
          "capacity_bytes": capacity, "cost": cost_of(compiled),
          "collectives": parse_collectives(compiled.as_text(), n, tuple(mesh.devices.shape))}


# ---- the programs

def _prepared(config, global_batch: int):
  c = config.copy_and_resolve_references()
  c.training.batch_size = int(global_batch)
  c.eval.batch_size = int(global_batch)
  c.sampling.num_samples = int(global_batch)
  return c


def build_programs(config, vocab: int, mesh, global_batch: int,
                   names: Sequence[str] = PROGRAMS) -> Dict[str, Tuple[Callable, tuple, float]]:
  """{name: (jitted fn, abstract args, model FLOPs of the whole call)} for ``mesh``.

  The train step and eval step are the trainer's; ``sample`` is the task's sampler for
  one step.  Every program takes ``global_batch`` sequences.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mdm_jax.sampling import generate as generate_lib  # pylint: disable=import-outside-toplevel
  from mdm_jax.tasks import build_task, validate_config  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.setup import validate_batch  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.state import make_optimizer, state_shardings  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.steps import make_eval_step, make_train_step  # pylint: disable=import-outside-toplevel
  c = _prepared(config, global_batch)
  try:
    validate_config(c)
    validate_batch(c, mesh)
  except ConfigError as e:
    raise ReportError(str(e)) from e
  task = build_task(c, vocab)
  rules = shd.logical_rules(c.mesh)
  tx, _ = make_optimizer(c.training)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):   # traced for the slice
    abstract, shardings = state_shardings(task, tx, mesh, rules)
  sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
  state = jax.tree.map(sds, abstract, shardings)
  length = int(c.data.seq_len)
  bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
  tokens = jax.ShapeDtypeStruct((global_batch, length), jnp.int32, sharding=bsh)
  fpt = model_flops_per_token(c.model, vocab, length) if c.model.name == "dit" else 0.0
  out: Dict[str, Tuple[Callable, tuple, float]] = {}
  if "train" in names:
    out["train"] = (make_train_step(task, tx, c, mesh, rules, shardings),
                    (state, {"tokens": tokens}), fpt * global_batch * length)
  if "eval" in names:
    batch = {"tokens": tokens,
             "weights": jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=bsh)}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    passes = int(getattr(task, "num_time_samples", 1) or 1)
    out["eval"] = (make_eval_step(task, c, mesh, rules, shardings.params),
                   (state.params, batch, key), fpt / 3 * global_batch * length * passes)
  if "sample" in names:
    sampler = task.default_sampler(c)
    sc = c.sampling
    kw = task.sampler_kwargs(sampler, c, global_batch, int(sc.seq_len or length), 1)
    kw.update(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p))
    kw.update(generate_lib.sampler_options(generate_lib.get_sampler(sampler), sc))
    fn = generate_lib.jitted_sampler(task.apply_fn, sampler, kw, rules, cache_key=task)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    out["sample"] = (fn, (state.params, key), fpt / 3 * global_batch * length)
  return out


def loop_corrections(config, vocab: int, global_batch: int, names: Sequence[str],
                     num_devices: int) -> Dict[str, Dict[str, Any]]:
  """Per-device FLOPs that XLA's count misses in scanned layers, microbatch loops and the
  eval bound's loop over time samples.

  Lowers each program on one CPU device twice, as configured and with the layers
  unrolled, one microbatch and one eval time sample (its count then multiplied by the
  configured samples), and returns (unrolled - configured) / devices.
  """
  import jax  # pylint: disable=import-outside-toplevel
  c = config.copy_and_resolve_references()
  c.mesh.shape = (1, 1, 1)
  splash = c.model.get("attention_impl") == "splash"
  if splash:          # a TPU kernel: on the CPU its FLOPs are those of the XLA attention
    c.model.attention_impl = "xla"
  mesh = shd.make_mesh(c.mesh, jax.devices("cpu")[:1])
  u = c.copy_and_resolve_references()
  u.model.scan_layers = False
  u.training.num_microbatches = 1
  passes = int(c.eval.num_time_samples)
  u.eval.num_time_samples = 1
  if not (bool(c.model.get("scan_layers", False)) or int(c.training.num_microbatches) > 1
          or ("eval" in names and passes > 1) or int(c.model.get("loss_chunk", 0)) > 0):
    return {n: {"flops": 0.0, "method": "none needed (no scanned layers, one microbatch)"}
            for n in names}
  out = {}
  with jax.set_mesh(mesh):
    as_is = build_programs(c, vocab, mesh, global_batch, names)
    flat = build_programs(u, vocab, mesh, global_batch, names)
    for n in names:
      f0 = cost_of(as_is[n][0].lower(*as_is[n][1]))["flops"]
      with elbo.unrolled_slices():
        f1 = cost_of(flat[n][0].lower(*flat[n][1]))["flops"]
      method = ("added the loop iterations XLA counts once: XLA's count of the step lowered "
                "with unrolled layers (and loss slices), one microbatch, less that of the "
                "step as configured (both on the CPU), per device")
      if splash:
        method += ("; splash attention counted as the XLA attention (XLA does not count "
                   "the kernel's FLOPs, so the one loop iteration it counts lacks them)")
      if n == "eval" and passes > 1:
        f1 *= passes
        method += f"; the eval bound's {passes} time samples as {passes} x one unrolled pass"
      out[n] = {"flops": max(f1 - f0, 0.0) / num_devices, "method": method}
  return out


def _per_unit_batch(config, per_chip_batch: int, units: int, what: str) -> int:
  """``per_chip_batch``, or (when it is 0) the config's global batch over ``units``."""
  if per_chip_batch > 0:
    return per_chip_batch
  bsz = int(config.training.batch_size)
  if bsz % units:
    raise ReportError(f"training.batch_size={bsz} does not divide over {units} {what}; give "
                      "--per_chip_batch.")
  return bsz // units


def analyse(config, topology: str, *, num_slices: int = 1, per_chip_batch: int = 0,
            vocab: int = 50257, programs: Sequence[str] = PROGRAMS,
            correct_loops: bool = True) -> Dict[str, Any]:
  """Compiles ``programs`` for the slice at one per-chip batch; the report as a dict."""
  import jax  # pylint: disable=import-outside-toplevel
  bad = [p for p in programs if p not in PROGRAMS]
  if bad:
    raise ReportError(f"--programs: unknown {bad}; choose from {list(PROGRAMS)}.")
  devices, info = tpu_devices(topology, num_slices)
  mesh = tpu_mesh(config.mesh, devices, num_slices)
  chip = CHIPS[info["family"]]
  dpc = info["devices_per_chip"]
  chips = info["chips"]
  per_chip_batch = _per_unit_batch(config, per_chip_batch, chips, "chips")
  global_batch = per_chip_batch * chips
  built = build_programs(config, vocab, mesh, global_batch, programs)
  fixes = (loop_corrections(config, vocab, global_batch, programs, len(devices))
           if correct_loops else {})
  rows = []
  for name in programs:
    fn, args, model_flops = built[name]
    r = compile_one(fn, args, mesh, chip, dpc)
    row = {"program": name, "per_chip_batch": per_chip_batch, "global_batch": global_batch,
           "mesh": dict(zip(shd.MESH_AXES, mesh.devices.shape)), **r}
    row["model_flops_per_device"] = model_flops / len(devices)
    if "cost" in r:
      fix = fixes.get(name, {"flops": 0.0, "method": "not corrected"})
      flops = r["cost"]["flops"] + fix["flops"]
      row["flops_per_device"] = flops
      row["loop_correction"] = fix
      if model_flops:
        row["flops_vs_model"] = flops / row["model_flops_per_device"]
      row["roofline"] = roofline(flops, r["cost"]["bytes_accessed"], chip, dpc,
                                 row["model_flops_per_device"])
      if r["cost"]["optimal_seconds"] > 0:
        row["xla_optimal_seconds"] = r["cost"]["optimal_seconds"]
    rows.append(row)
  return {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
          "libtpu": _libtpu_version(), **info, "vocab_size": vocab,
          "model": {k: config.model[k] for k in ("name", "num_layers", "d_model", "num_heads",
                                                  "dtype", "scan_layers", "remat",
                                                  "attention_impl")
                    if k in config.model},
          "objective": str(config.objective), "ell": int(config.prime.ell),
          "seq_len": int(config.data.seq_len),
          "num_microbatches": int(config.training.num_microbatches), "rows": rows}


# ---- on the attached devices (--run)

def attached_platform() -> str:
  """The platform of the devices JAX has attached ("cpu", "gpu", "tpu")."""
  import jax  # pylint: disable=import-outside-toplevel
  return str(jax.devices()[0].platform)


def _published_chip(device_kind: str) -> Optional[Chip]:
  return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)


def _step_row(name: str, times: Sequence[float], compile_s: float, tokens: int,
              model_flops: float, devices: int, ceiling: float) -> Dict[str, Any]:
  """Median step time of ``times`` (seconds) and what follows from it."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mdm_jax.benchmarks import train_bench  # pylint: disable=import-outside-toplevel
  step_s = float(np.median(times))
  mem = train_bench.peak_memory()
  achieved = model_flops / step_s / devices
  return {"program": name, "compile_s": compile_s, "steps": len(times),
          "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * float(np.min(times)),
          "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
          "model_flops_per_device": model_flops / devices,
          "model_tflops_per_s_per_device": achieved / 1e12,
          "mfu": achieved / ceiling if model_flops else None,
          "peak_bytes_in_use": mem.get("device_peak_bytes"),
          "host_max_rss_gib": mem["host_max_rss_gib"]}


def run_attached(config, *, per_chip_batch: int = 0, vocab: int = 50257,
                 programs: Sequence[str] = PROGRAMS, sample_steps: Sequence[int] = (128, 1024),
                 steps: int = 10, warmup: int = 2, ceiling_size: int = 0,
                 time_budget_s: float = 420.0) -> Dict[str, Any]:
  """Runs and times the programs on the attached devices; the report as a dict.

  The train and eval steps are the trainer's (as compiled by ``analyse``), on synthetic
  tokens, timed as the median of ``steps`` calls after ``warmup``; ``sample`` is the task's
  configured sampler run to completion at each T of ``sample_steps`` (``Task.generate``).
  MFU is against a bf16 matmul measured on the first device in this process.  Before each
  program (and each T) the time spent so far is checked against ``time_budget_s``; what
  does not fit is skipped and named in ``notes``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mdm_jax.benchmarks import train_bench  # pylint: disable=import-outside-toplevel
  from mdm_jax.tasks import build_task, validate_config  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.setup import validate_batch  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.state import init_state, make_optimizer  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.steps import make_eval_step, make_train_step  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  bad = [p for p in programs if p not in PROGRAMS]
  if bad:
    raise ReportError(f"--programs: unknown {bad}; choose from {list(PROGRAMS)}.")
  if steps < 1 or warmup < 0 or any(int(t) < 1 for t in sample_steps):
    raise ReportError("--steps and every --sample_steps must be at least 1, --warmup at least 0.")
  devices = jax.devices()
  n = len(devices)
  platform, kind = str(devices[0].platform), str(devices[0].device_kind)
  per_chip_batch = _per_unit_batch(config, per_chip_batch, n, "devices")
  global_batch = per_chip_batch * n
  c = _prepared(config, global_batch)
  try:
    mesh = shd.make_mesh(c.mesh, devices)
  except ValueError as e:
    raise ReportError(f"{e} ({n} devices are attached)") from e
  try:
    validate_config(c)
    validate_batch(c, mesh)
  except ConfigError as e:
    raise ReportError(str(e)) from e
  ceiling_n = int(ceiling_size) or (8192 if platform != "cpu" else 256)
  ceiling = train_bench.matmul_ceiling("bfloat16", ceiling_n)
  task = build_task(c, vocab)
  rules = shd.logical_rules(c.mesh)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, 0)
  length = int(c.data.seq_len)
  fpt = model_flops_per_token(c.model, vocab, length) if c.model.name == "dit" else 0.0
  rng = np.random.default_rng(0)
  bsh = shd.batch_sharding(mesh)
  tokens = [jax.device_put(rng.integers(0, vocab, (global_batch, length), dtype=np.int32), bsh)
            for _ in range(2)]
  rows: List[Dict[str, Any]] = []
  notes: List[str] = []
  common = {"per_chip_batch": per_chip_batch, "global_batch": global_batch,
            "mesh": dict(zip(shd.MESH_AXES, mesh.devices.shape))}

  def spent(what: str, predicted: float = 0.0) -> bool:
    used = time.perf_counter() - start
    if used + predicted <= time_budget_s:
      return False
    why = (f"predicted to end at {used + predicted:.0f} s" if predicted else
           f"{used:.0f} s used")
    notes.append(f"{what} skipped: the time budget of {time_budget_s:g} s ({why})")
    return True

  if "train" in programs and not spent("train"):
    step = make_train_step(task, tx, c, mesh, rules, shardings)
    train_state = state

    def train_call(i):
      nonlocal train_state
      train_state, metrics = compiled(train_state, {"tokens": tokens[i % 2]})
      return metrics

    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      compiled = step.lower(train_state, {"tokens": tokens[0]}).compile()
      compile_s = time.perf_counter() - t0
      times = train_bench.timed(train_call, steps, warmup)
    rows.append({**_step_row("train", times, compile_s, global_batch * length,
                             fpt * global_batch * length, n, ceiling), **common})
    # The step donates its input state: later programs use the trained one.
    state = train_state
  if "eval" in programs and not spent("eval"):
    passes = int(getattr(task, "num_time_samples", 1) or 1)
    batch = {"tokens": tokens[0],
             "weights": jax.device_put(np.ones((global_batch,), np.float32), bsh)}
    key = jax.random.key_data(jax.random.key(0))
    step = make_eval_step(task, c, mesh, rules, shardings.params)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      compiled = step.lower(state.params, batch, key).compile()
      compile_s = time.perf_counter() - t0
      times = train_bench.timed(lambda i: compiled(state.params, batch, key), steps, warmup)
    row = _step_row("eval", times, compile_s, global_batch * length,
                    fpt / 3 * global_batch * length * passes, n, ceiling)
    rows.append({**row, "time_samples": passes, **common})
  if "sample" in programs:
    sampler = task.default_sampler(c)
    last: Optional[Tuple[int, float, float]] = None     # (T, compile s, sampling s)
    for t in [int(t) for t in sample_steps]:
      # The next T's time, from the last: its compile time plus its sampling time scaled by T.
      predicted = last[1] + last[2] * t / last[0] if last else 0.0
      if spent(f"sampling at T = {t}", predicted):
        continue
      _, st = task.generate(state.params, c, num_steps=t, num_samples=global_batch, mesh=mesh,
                            rules=rules)
      nfe, wall = int(st["nfe"]), float(st["wall_time_s"])
      last = (t, float(st["compile_time_s"]), wall)
      flops = fpt / 3 * global_batch * length * nfe
      achieved = flops / max(wall, 1e-9) / n
      mem = train_bench.peak_memory()
      rows.append({"program": "sample", "sampler": sampler, "T": t, "nfe": nfe,
                   "compile_s": float(st["compile_time_s"]), "wall_s": wall,
                   "ms_per_nfe": 1e3 * wall / max(nfe, 1), "tokens": global_batch * length,
                   "tokens_per_s": float(st["tokens_per_s"]),
                   "model_flops_per_device": flops / n,
                   "model_tflops_per_s_per_device": achieved / 1e12,
                   "mfu": achieved / ceiling if fpt else None,
                   "idle_fraction": st.get("idle_fraction"),
                   "peak_bytes_in_use": mem.get("device_peak_bytes"),
                   "host_max_rss_gib": mem["host_max_rss_gib"], **common})
  res = {"mode": "run", "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
         "platform": platform, "device_kind": kind, "devices": n,
         "ceiling": {"dtype": "bfloat16", "n": ceiling_n, "tflops": ceiling / 1e12},
         "vocab_size": vocab,
         "model": {k: config.model[k] for k in ("name", "num_layers", "d_model", "num_heads",
                                                 "dtype", "scan_layers", "remat")
                   if k in config.model},
         "objective": str(config.objective), "ell": int(config.prime.ell),
         "seq_len": length, "num_microbatches": int(config.training.num_microbatches),
         "time_budget_s": float(time_budget_s), "notes": notes, "rows": rows}
  chip = _published_chip(kind)
  if chip is not None:
    res["published_peak_tflops_per_chip"] = chip.peak_flops / 1e12
  res["elapsed_s"] = time.perf_counter() - start
  return res


def find_max_batch(config, topology: str, *, num_slices: int = 1, vocab: int = 50257,
                   limit: int = 4096) -> Dict[str, Any]:
  """The largest per-chip batch whose train step the compiler accepts.

  Doubles the per-chip batch from 1 (in steps that keep every microbatch divisible over
  the mesh's batch axes) until the compiler refuses, then bisects between the last fit
  and the first refusal.  Each probe compiles only the train step.
  """
  devices, info = tpu_devices(topology, num_slices)
  mesh = tpu_mesh(config.mesh, devices, num_slices)
  chip, dpc, chips = CHIPS[info["family"]], info["devices_per_chip"], info["chips"]
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  unit = math.lcm(shards * int(config.training.num_microbatches), chips) // chips
  probes: List[Dict[str, Any]] = []

  def fits(k: int) -> bool:
    per_chip = k * unit
    fn, args, _ = build_programs(config, vocab, mesh, per_chip * chips, ("train",))["train"]
    r = compile_one(fn, args, mesh, chip, dpc)
    probes.append({"per_chip_batch": per_chip, "fits": r["fits"], "compile_s": r["compile_s"],
                   "needed_gib": (r["memory"]["total"] if "memory" in r else r["needed_bytes"])
                   / GIB})
    print(f"per-chip batch {per_chip}: {'fits' if r['fits'] else 'does not fit'} "
          f"({probes[-1]['needed_gib']:.2f} GiB, compiled in {r['compile_s']:.1f} s)", flush=True)
    return r["fits"]

  lo, hi = 0, 1
  while hi * unit <= limit and fits(hi):
    lo, hi = hi, hi * 2
  hi = min(hi, limit // unit + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return {"max_per_chip_batch": lo * unit, "step": unit, "searched_up_to": limit,
          "probes": probes}


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return "?"


# ---- the table

def _gib(b: float) -> str:
  return f"{b / GIB:.3g}"


def _eng(x: float) -> str:
  """1.23e13 -> '12.3 T'."""
  for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {unit}"
  return f"{x:.3g}"


def _collective_summary(coll: Dict[str, Any]) -> str:
  parts = []
  for kind, v in coll.items():
    if not v.get("ops"):
      continue
    axes = ", ".join(f"{a}" for a in sorted(v.get("by_axes", {})))
    parts.append(f"{kind} {v['ops']}x {v['bytes'] / 2 ** 20:.1f} MiB"
                 + (f" [{axes}]" if axes else ""))
  return "; ".join(parts) or "none"


def table(res: Dict[str, Any]) -> str:
  """The report as markdown: one row per program, then its collectives."""
  per = "device (TensorCore)" if res["devices_per_chip"] > 1 else "chip"
  head = (f"{res['topology']}" + (f" x {res['num_slices']} slices" if res["num_slices"] > 1
                                   else "")
          + f" ({res['chips']} chips, {res['device_kind']}; published {res['peak_tflops_per_chip']:g}"
          f" TFLOP/s bf16, {res['hbm_gbps_per_chip']:g} GB/s, {res['hbm_gib_per_chip']:g} GiB "
          f"per chip); jax {res['jax']}, libtpu {res['libtpu']}; {res['objective']} "
          f"ell={res['ell']}, seq {res['seq_len']}, figures per {per}")
  lines = [head, "",
           "| program | seq/chip | HBM GiB (args + temp + out - alias + code) | fits | "
           "compile s | FLOPs (XLA, loops corrected) | vs model | bytes accessed | "
           "bound ms | MFU <= | XLA optimal ms |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in res["rows"]:
    if "memory" not in r:
      lines.append(f"| {r['program']} | {r['per_chip_batch']} | needs {_gib(r['needed_bytes'])}"
                   f" of {_gib(r['available_bytes'])} available | no | {r['compile_s']:.1f} | "
                   "- | - | - | - | - | - |")
      continue
    m = r["memory"]
    mem = (f"{_gib(m['total'])} ({_gib(m['argument'])} + {_gib(m['temp'])} + "
           f"{_gib(m['output'])} - {_gib(m['alias'])} + {_gib(m['generated_code'])}) "
           f"of {_gib(r['capacity_bytes'])}")
    rf = r["roofline"]
    vs = f"{r['flops_vs_model']:.2f}x" if "flops_vs_model" in r else "-"
    mfu = f"{100 * rf['mfu_upper_bound']:.3g}%" if "mfu_upper_bound" in rf else "-"
    opt = f"{1e3 * r['xla_optimal_seconds']:.3g}" if "xla_optimal_seconds" in r else "-"
    lines.append(
        f"| {r['program']} | {r['per_chip_batch']} | {mem} | "
        f"{'yes' if r['fits'] else 'no (over capacity)'} | {r['compile_s']:.1f} | "
        f"{_eng(r['flops_per_device'])} | {vs} | {_eng(r['cost']['bytes_accessed'])}B | "
        f"{1e3 * rf['step_s_lower_bound']:.3g} ({rf['bound_by']}) | {mfu} | {opt} |")
  lines.append("")
  for r in res["rows"]:
    if "collectives" in r:
      lines.append(f"- {r['program']} collectives: {_collective_summary(r['collectives'])}")
  if "max_batch" in res:
    mb = res["max_batch"]
    lines.append(f"- largest per-chip batch whose train step fits: {mb['max_per_chip_batch']} "
                 f"(searched in steps of {mb['step']} up to {mb['searched_up_to']})")
  return "\n".join(lines)


def _memory_cell(r: Dict[str, Any]) -> str:
  """Peak device memory in GiB, or "n/a" with the host's peak resident memory beside it."""
  if r["peak_bytes_in_use"] is None:
    return f"n/a (host RSS {r['host_max_rss_gib']:.2f})"
  return _gib(r["peak_bytes_in_use"])


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{100 * x:.3g}%"


def run_table(res: Dict[str, Any]) -> str:
  """The measured report as markdown: the train and eval steps, then sampling at each T."""
  ceil = res["ceiling"]
  peak = (f"; published peak {res['published_peak_tflops_per_chip']:g} TFLOP/s per chip"
          if "published_peak_tflops_per_chip" in res else "")
  head = (f"measured on {res['devices']} x {res['device_kind']} ({res['platform']}); jax "
          f"{res['jax']}; {ceil['dtype']} {ceil['n']}^3 matmul ceiling {ceil['tflops']:.3g} "
          f"TFLOP/s per device{peak}; {res['objective']} ell={res['ell']}, seq "
          f"{res['seq_len']}, {res['elapsed_s']:.0f} s in all")
  lines = [head, ""]
  steps = [r for r in res["rows"] if r["program"] != "sample"]
  if steps:
    lines += ["| program | seq/device | compile s | ms per step (median) | min ms | tokens/s | "
              "model TFLOP/s/device | MFU | peak GiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in steps:
      lines.append(
          f"| {r['program']} | {r['per_chip_batch']} | {r['compile_s']:.1f} | "
          f"{r['step_ms']:.4g} (of {r['steps']}) | {r['step_ms_min']:.4g} | "
          f"{r['tokens_per_s']:.4g} | {r['model_tflops_per_s_per_device']:.3g} | "
          f"{_pct(r['mfu'])} | {_memory_cell(r)} |")
    lines.append("")
  samples = [r for r in res["rows"] if r["program"] == "sample"]
  if samples:
    lines += ["| sampler | seq/device | T | NFE | compile s | s | ms per NFE | tokens/s | MFU | "
              "peak GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in samples:
      lines.append(
          f"| {r['sampler']} | {r['per_chip_batch']} | {r['T']} | {r['nfe']} | "
          f"{r['compile_s']:.1f} | {r['wall_s']:.3g} | {r['ms_per_nfe']:.3g} | "
          f"{r['tokens_per_s']:.4g} | {_pct(r['mfu'])} | {_memory_cell(r)} |")
    lines.append("")
  for note in res["notes"]:
    lines.append(f"- {note}")
  return "\n".join(lines).rstrip()


def _write(out_dir: str, stem: str, res: Dict[str, Any], md: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
    json.dump(res, f, indent=2, default=str)
  with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
    f.write(md + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. owt_mdm).")
  run = _RUN.value if _RUN.value is not None else attached_platform() != "cpu"
  if run and _FIND.value:
    raise app.UsageError("--find_max_batch compiles for --topology: add --norun.")
  try:
    if run:
      res = run_attached(_CONFIG.value, per_chip_batch=_BATCH.value, vocab=_VOCAB.value,
                         programs=_PROGRAMS.value,
                         sample_steps=[int(t) for t in _SAMPLE_STEPS.value],
                         steps=_STEPS.value, warmup=_WARMUP.value,
                         ceiling_size=_CEIL_SIZE.value, time_budget_s=_BUDGET.value)
      md = run_table(res)
    else:
      res = analyse(_CONFIG.value, _TOPOLOGY.value, num_slices=_SLICES.value,
                    per_chip_batch=_BATCH.value, vocab=_VOCAB.value, programs=_PROGRAMS.value)
      if _FIND.value:
        res["max_batch"] = find_max_batch(_CONFIG.value, _TOPOLOGY.value,
                                          num_slices=_SLICES.value, vocab=_VOCAB.value,
                                          limit=_MAX_BATCH.value)
      md = table(res)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(md)
  if _OUT_DIR.value:
    _write(_OUT_DIR.value, "run" if run else "report", res, md)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flags_parser(
      "python -m mdm_jax.benchmarks.tpu_compile --config=NAME --topology=v5p:2x2x1 "
      "[--per_chip_batch=N] [--find_max_batch] [--run] [--config.KEY=VALUE ...]"))
