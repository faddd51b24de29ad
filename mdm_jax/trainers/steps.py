"""The jitted train and eval steps, with explicit shardings; they know no task.

``make_train_step`` draws stratified times over the *global* batch (``task.sample_times``),
cuts the batch into microbatches (gradient accumulation), calls ``task.loss`` on each
with per-row randomness (so neither microbatching nor sharding changes the draws),
averages to nats per token, applies the optimizer and the EMA, and donates the state.
The EMA's decay at step n (0-based) is min(ema_decay, (1 + n) / (10 + n)) with
``training.ema_warmup`` (the default), so the average forgets the initial parameters
within the first steps instead of after ~1/(1 - ema_decay) of them.
``make_phased_step`` is the step of a task trained by parts (``Task.update_phases``:
Di[M]O's generator then auxiliary updates, the feature classifier's one update): each
phase differentiates its loss in its part of the parameters and applies that part's
optimizer before the next phase runs.  ``make_step`` picks the one a run's task needs.
These are the only places an optimizer update is applied (``apply_update``).
``make_eval_step`` / ``evaluate`` add up ``task.eval_sums`` over fixed eval batches and
report ``task.eval_summary``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mdm_jax.core import distributed
from mdm_jax.core import sharding as shd
from mdm_jax.trainers.state import TrainState

# optax >= 0.2.6 has optax.tree.norm; older releases only optax.global_norm.
tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def apply_update(tx, grads, opt_state, params):
  """One optimizer update: (new params, new optimizer state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def ema_update(ema, params, step, decay: float, warmup: bool):
  """decay * ema + (1 - decay) * params, the decay capped by (1 + n) / (10 + n) at 0-based
  step n when ``warmup``; ``params`` itself when ``decay`` is 0."""
  if decay <= 0:
    return params
  d = jnp.float32(decay)
  if warmup:
    n = step.astype(jnp.float32)
    d = jnp.minimum(d, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_step(run, shardings):
  """The jitted ``(state, batch) -> (state, metrics)`` of ``run``'s task."""
  if run.task.trains_by_phases:
    return make_phased_step(run.task, run.tx, run.mesh, run.rules, shardings,
                            ema_decay=run.settings.ema_decay,
                            ema_warmup=run.settings.ema_warmup)
  return make_train_step(run.task, run.tx, run.config, run.mesh, run.rules, shardings)


def make_phased_step(task, tx, mesh, rules, shardings, *, ema_decay: float,
                     ema_warmup: bool = False, donate: bool = True):
  """A jitted ``(state, batch) -> (state, metrics)`` for a task trained by parts.

  The step's key is fold_in(state.key, step); ``task.update_phases(key)`` gives the
  phases, run in order, each updating ``params[phase.part]`` with ``tx[phase.part]`` (or
  every parameter with ``tx`` when ``part`` is None); then the EMA of
  ``task.ema_part``.  ``task.frozen`` goes in as an argument, placed by
  ``task.frozen_shardings``.  ``mesh=None``: no explicit shardings (unit tests).
  """

  def step_fn(state: TrainState, batch, frozen):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    params, opt_state = state.params, state.opt_state
    metrics: Dict[str, Any] = {}
    for phase in task.update_phases(key):
      part = phase.part
      own = params if part is None else params[part]
      (loss, m), grads = jax.value_and_grad(
          lambda p, ph=phase: ph.loss(p, params, batch, frozen, ph.key), has_aux=True)(own)
      part_tx = tx if part is None else tx[part]
      part_opt = opt_state if part is None else opt_state[part]
      new_own, new_opt = apply_update(part_tx, grads, part_opt, own)
      if part is None:
        params, opt_state = new_own, new_opt
      else:
        params, opt_state = {**params, part: new_own}, {**opt_state, part: new_opt}
      metrics.update({f"{phase.name}_loss": loss, f"{phase.name}_grad_norm": tree_norm(grads),
                      **m})
    averaged = params if task.ema_part is None else {task.ema_part: params[task.ema_part]}
    ema = ema_update(state.ema_params, averaged, state.step, ema_decay, ema_warmup)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new, metrics

  def traced(state, batch, frozen):
    with nn.logical_axis_rules(rules or ()):
      return step_fn(state, batch, frozen)

  kwargs = {}
  if mesh is not None:
    kwargs = dict(in_shardings=(shardings, shd.batch_sharding(mesh), task.frozen_shardings),
                  out_shardings=(shardings, shd.replicated(mesh)))
  jitted = jax.jit(traced, donate_argnums=(0,) if donate else (), **kwargs)
  return lambda state, batch: jitted(state, batch, task.frozen)


def make_train_step(task, tx, config, mesh, rules, shardings):
  """A jitted ``(state, batch) -> (state, metrics)``; ``batch`` holds ``tokens`` and any
  further per-row fields, all sharded over the mesh's batch axes."""
  tc = config.training
  n_micro = int(tc.num_microbatches)
  ema_decay = float(tc.ema_decay)
  ema_warmup = bool(tc.get("ema_warmup", True))
  bsz = int(tc.batch_size)
  length = task.seq_len
  micro_sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))

  def loss_fn(params, tokens, key, t, rows, extra):
    # extra: further per-row batch fields (e.g. image class labels) passed to task.loss by name
    per_seq, metrics = task.loss(params, tokens, key, train=True, t=t, row_ids=rows, **extra)
    return jnp.sum(per_seq), metrics

  def step_fn(state: TrainState, batch):
    tokens = batch["tokens"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    k_t, k_loss = jax.random.split(key)
    # Stratified times over the *global* batch, then cut into microbatches.
    t_all = task.sample_times(k_t, bsz)
    tok_mb = jax.lax.with_sharding_constraint(
        tokens.reshape(n_micro, bsz // n_micro, length), micro_sharding)
    t_mb = t_all.reshape(n_micro, bsz // n_micro)
    rows_mb = jnp.arange(bsz, dtype=jnp.int32).reshape(n_micro, bsz // n_micro)
    extra_mb = {k: v.reshape((n_micro, bsz // n_micro) + v.shape[1:])
                for k, v in batch.items() if k != "tokens"}
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    # Masks are drawn per global row, so microbatching changes nothing but the
    # summation order; dropout (if any) uses a per-microbatch key.
    def micro(carry, xs):
      g_acc, l_acc = carry
      tok, t, rows, extra = xs
      (l, metrics), g = grad_fn(state.params, tok, k_loss, t, rows, extra)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
      return (g_acc, l_acc + l), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, total), metrics = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32)),
        (tok_mb, t_mb, rows_mb, extra_mb))
    norm = 1.0 / (bsz * length)                      # -> nats per token
    grads = jax.tree.map(lambda g: g * norm, grads)
    params, opt_state = apply_update(tx, grads, state.opt_state, state.params)
    ema = ema_update(state.ema_params, params, state.step, ema_decay, ema_warmup)
    out = {"loss": total * norm, "grad_norm": tree_norm(grads)}
    out.update(jax.tree.map(jnp.mean, metrics))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new, out

  def traced(state, batch):
    with nn.logical_axis_rules(rules):
      return step_fn(state, batch)

  batch_sh = shd.batch_sharding(mesh)   # every batch field ("tokens", optional "labels")
  return jax.jit(traced, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(task, config, mesh, rules, param_shardings):
  """A jitted ``(params, batch, key) -> task.eval_sums(...)`` with the batch sharded."""
  del config

  def fn(params, batch, key):
    with nn.logical_axis_rules(rules):
      return task.eval_sums(params, batch, key)   # raw uint32 key data

  # Replicated sums: every process reads the same totals without a gather.
  return jax.jit(fn, in_shardings=(param_shardings, shd.batch_sharding(mesh),
                                   shd.replicated(mesh)), out_shardings=shd.replicated(mesh))


def evaluate(eval_step, task, params, batches: List[Dict[str, np.ndarray]], mesh,
             seed: int) -> Dict[str, Any]:
  """``task.eval_summary`` of the eval sums over fixed batches (summed in float64).

  Every batch gets the key key(seed) and a ``row_ids`` field, each row's global index in
  the eval set (batch i of global size B holds rows i B .. i B + B - 1, this process
  its slice of them), from which the task draws that row's randomness: the result does
  not depend on the eval batch size, the mesh or the process count.  Rows without a
  ``weights`` field count 1.
  """
  totals: Dict[str, np.ndarray] = {}
  key = jax.random.key_data(jax.random.key(seed))
  bs = shd.batch_sharding(mesh)
  index, count = shd.process_batch_slice(mesh)
  offset = 0
  with jax.set_mesh(mesh):
    for b in batches:
      b = dict(b)
      local = len(b["tokens"])
      b.setdefault("weights", np.ones(local, np.float32))
      b.setdefault("row_ids", offset + index * local + np.arange(local, dtype=np.int32))
      offset += local * count
      gb = {k: shd.global_batch(v, bs) for k, v in b.items()}
      sums = eval_step(params, gb, key)
      for k, v in distributed.host_arrays(sums).items():
        totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
  return task.eval_summary(totals)
