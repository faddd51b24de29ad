"""The train state and the optimizer, placed on a device mesh without a host copy."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mdm_jax.core import distributed
from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.networks import weight_decay_mask


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar
  params: Any
  opt_state: Any
  ema_params: Any
  key: jax.Array           # uint32 raw key data (checkpoint friendly)


def make_optimizer(tc) -> Tuple[optax.GradientTransformation, Callable]:
  """AdamW with warm-up and a constant or cosine schedule, global-norm clipping, weight
  decay on the network's weight matrices and tables only (chosen by parameter path,
  ``networks.weight_decay_mask``: never norm scales, biases or schedule parameters, and
  the same for scanned and unrolled layers); returns (optimizer, learning-rate schedule)."""
  warm = max(int(tc.warmup_steps), 1)
  lr = float(tc.learning_rate)
  if tc.lr_schedule == "constant":
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
                                 [warm])
  elif tc.lr_schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(
        0.0, lr, warm, max(int(tc.num_steps), warm + 1), end_value=lr * float(tc.min_lr_ratio))
  else:
    raise ConfigError(f"training.lr_schedule must be constant|cosine, got {tc.lr_schedule!r}.")
  tx = optax.chain(
      optax.clip_by_global_norm(float(tc.grad_clip)) if tc.grad_clip > 0 else optax.identity(),
      optax.adamw(sched, b1=float(tc.b1), b2=float(tc.b2), weight_decay=float(tc.weight_decay),
                  mask=weight_decay_mask))
  return tx, sched


def init_boxed(task, tx, key, batch_size: int = 2) -> TrainState:
  """The state with logically boxed parameters (their axis names give the shardings)."""
  k_param, k_state = jax.random.split(key)
  params = task.init_params(k_param, batch_size)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, key=jax.random.key_data(k_state))


def state_shardings(task, tx, mesh, rules) -> Tuple[Any, Any]:
  """(abstract unboxed state, NamedSharding tree) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(init_boxed, task, tx), jax.random.key(0))
  return nn.unbox(boxed), shd.logical_shardings(boxed, mesh, rules)


def init_state(task, tx, mesh, rules, seed: int) -> Tuple[TrainState, Any]:
  """A fresh state placed by the mesh's shardings (each device builds only its shard)."""
  abstract, shardings = state_shardings(task, tx, mesh, rules)
  del abstract
  # Placement comes from out_shardings; the model's activation constraints are
  # not needed (and scanned parameter boxes must not be constrained) at init.
  init = jax.jit(lambda k: nn.unbox(init_boxed(task, tx, k)), out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init(jax.random.key(seed))
  return state, shardings


@jax.jit
def _nonfinite_counts(params, opt_state, ema_params):
  def count(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sum((jnp.sum(~jnp.isfinite(x)) for x in leaves), jnp.zeros((), jnp.int32))
  return count(params), count(opt_state), count(ema_params)


def nonfinite_parts(state: TrainState) -> Dict[str, int]:
  """{"params": n, ...}: how many non-finite numbers each part of the state holds (only
  the parts that hold any).  Checked before every save, so none is ever committed."""
  counts = distributed.host_arrays(
      _nonfinite_counts(state.params, state.opt_state, state.ema_params))
  return {name: int(n) for name, n in zip(("params", "opt_state", "ema_params"), counts) if n}
