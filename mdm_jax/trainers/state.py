"""The train state and the optimizer, placed on a device mesh without a host copy.

One state for every task: ``params`` is the task's parameter tree (for a task trained by
parts, e.g. Di[M]O, a dict of parts), ``opt_state`` the optimizer's state (a dict of one
state per part when ``tx`` is a dict of optimizers), ``ema_params`` the average of the
parameters (or of the task's ``Task.ema_part``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

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


def _name_matches(path: Tuple[str, ...], names) -> bool:
  joined = "/".join(str(p) for p in path)
  return any(joined == n or joined.endswith("/" + n) for n in names)


def frozen_labels(params, names) -> Any:
  """'frozen' / 'train' per parameter (boxed leaves included), by name or path suffix."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: ("frozen" if _name_matches(k, names) else "train") for k in flat})


def make_optimizer(tc, *, learning_rate: Optional[float] = None,
                   frozen_names: Optional[Sequence[str]] = None
                   ) -> Tuple[optax.GradientTransformation, Callable]:
  """AdamW with warm-up and a constant or cosine schedule, global-norm clipping, weight
  decay on the network's weight matrices and tables only (chosen by parameter path,
  ``networks.weight_decay_mask``: never norm scales, biases or schedule parameters, and
  the same for scanned and unrolled layers); returns (optimizer, learning-rate schedule).

  With ``frozen_names`` (a part of a task trained by parts, ``config.distill``): Adam at
  ``learning_rate`` with a linear warm-up that counts the first step (lr (n + 1) / warm,
  so the first step moves) then constant, global-norm clipping, and no update for the
  parameters whose path ends in one of the names.
  """
  warm = max(int(tc.warmup_steps), 1)
  lr = float(tc.learning_rate if learning_rate is None else learning_rate)
  if frozen_names is not None:
    def warm_then_constant(count):
      return lr * jnp.minimum(1.0, (count + 1.0) / warm)
    train_tx = optax.chain(
        optax.clip_by_global_norm(float(tc.grad_clip)) if tc.grad_clip > 0 else optax.identity(),
        optax.adam(warm_then_constant, b1=float(tc.b1), b2=float(tc.b2)))
    names = tuple(frozen_names)
    return optax.multi_transform({"train": train_tx, "frozen": optax.set_to_zero()},
                                 lambda p: frozen_labels(p, names)), warm_then_constant
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


def init_opt_state(tx, params):
  """``tx.init(params)``; with a dict of optimizers, one state per part of ``params``."""
  if isinstance(tx, dict):
    return {part: tx[part].init(params[part]) for part in tx}
  return tx.init(params)


def ema_of(task, params):
  """What the EMA averages: every parameter, or the task's ``ema_part`` alone."""
  part = task.ema_part
  return params if part is None else {part: params[part]}


def init_boxed(task, tx, key, batch_size: int = 2, frozen=None) -> TrainState:
  """The state with logically boxed parameters (their axis names give the shardings).

  ``frozen`` is the task's read-only input (``Task.frozen``) when the state is built for
  real; ``None`` when only its shapes are wanted (``state_shardings``).
  """
  params, k_state = task.init_train_params(key, batch_size, frozen)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=init_opt_state(tx, params), ema_params=ema_of(task, params),
                    key=jax.random.key_data(k_state))


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
  # A task's frozen input (a teacher) is an argument, never a constant folded into the graph.
  init = jax.jit(lambda k, f: nn.unbox(init_boxed(task, tx, k, frozen=f)),
                 out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init(jax.random.key(seed), task.frozen)
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
