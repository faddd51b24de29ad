"""The train loop: one code path from a laptop CPU to a TPU pod.

``train_and_evaluate(config, workdir)`` builds the data pipeline, the task
(codec, schedule, backbone, objective), a device mesh from ``config.mesh``,
a sharded train state, and runs jit-compiled train steps with explicit in/out
shardings and a donated state.  It evaluates the perplexity bound, writes
metrics (JSONL + TensorBoard), checkpoints with Orbax (state + data iterator
+ config) and writes text samples, all under ``workdir``.  Re-running the same
command resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from mdm_jax import checkpoint as ckpt_lib
from mdm_jax import config_utils
from mdm_jax import eval_text
from mdm_jax import losses
from mdm_jax import metrics_writer
from mdm_jax import multivariate
from mdm_jax import prime as prime_lib
from mdm_jax import sharding as shd
from mdm_jax.models import build_model
from mdm_jax.schedules import Schedule, get_schedule


# optax >= 0.2.6 has optax.tree.norm; older releases only optax.global_norm.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar
  params: Any
  opt_state: Any
  ema_params: Any
  key: jax.Array           # uint32 raw key data (checkpoint friendly)


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything the objective and samplers need, derived from the config."""
  objective: str                      # diffusion | ar
  codec: prime_lib.PrimeCodec
  schedule: Schedule
  loss_cfg: losses.DiffusionLossConfig
  model: nn.Module
  seq_len: int
  time_conditioning: bool

  @property
  def vocab_size(self) -> int:
    return self.codec.vocab_size

  def apply_fn(self, params, digits, t, *, train: bool = False, rng=None):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return self.model.apply({"params": params}, digits, t, train=train, rngs=rngs)

  def loss(self, params, tokens, key, *, train: bool, t=None, row_ids=None):
    """Per-sequence training objective in nats, and metrics."""
    if self.objective == "ar":
      if row_ids is not None:
        key = jax.random.fold_in(key, row_ids[0])
      return losses.ar_loss(self.apply_fn, params, tokens, key, bos_id=self.codec.mask_id,
                            train=train)
    if multivariate.is_multivariate(self.schedule):   # per-position (learned-order) schedule
      return multivariate.diffusion_loss(
          self.apply_fn, params, tokens, key, codec=self.codec, schedule=self.schedule,
          cfg=self.loss_cfg, train=train, t=t, row_ids=row_ids)
    return losses.diffusion_loss(self.apply_fn, params, tokens, key, codec=self.codec,
                                 schedule=self.schedule, cfg=self.loss_cfg, train=train, t=t,
                                 row_ids=row_ids)

  def bound(self, params, tokens, key, num_time_samples: int):
    """Per-sequence evaluation NLL (AR, exact) or valid NELBO bound (diffusion)."""
    if self.objective == "ar":
      return losses.ar_loss(self.apply_fn, params, tokens, key, bos_id=self.codec.mask_id,
                            train=False)[0]
    if multivariate.is_multivariate(self.schedule):
      return multivariate.diffusion_bound(
          self.apply_fn, params, tokens, key, codec=self.codec, schedule=self.schedule,
          cfg=self.loss_cfg, num_time_samples=num_time_samples)
    return losses.diffusion_bound(self.apply_fn, params, tokens, key, codec=self.codec,
                                  schedule=self.schedule, cfg=self.loss_cfg,
                                  num_time_samples=num_time_samples)


def build_task(config, vocab_size: int) -> Task:
  config_utils.validate_config(config)
  if config.objective == "gaussian":   # Gaussian image diffusion (mdm_jax/gaussian_task.py)
    from mdm_jax.gaussian_task import build_gaussian_task  # pylint: disable=import-outside-toplevel
    return build_gaussian_task(config, vocab_size)
  ar = config.objective == "ar"
  codec = prime_lib.codec_from_config(vocab_size, config.prime)
  model = build_model(config.model, vocab_size=vocab_size, ell=codec.ell, base=codec.base,
                      causal=ar)
  loss_cfg = losses.DiffusionLossConfig(
      form=config.prime.loss, carry_over=bool(config.prime.carry_over),
      t_min=float(config.training.t_min), antithetic=bool(config.training.antithetic),
      weighting=str(config.training.get("loss_weighting", "elbo")),
      chunk_point=float(config.prime.get("chunk_point", 1.0)))
  schedule = get_schedule(config.schedule)
  if multivariate.is_multivariate(schedule):
    schedule = schedule.for_codec(codec)
  if multivariate.is_multivariate(schedule) and loss_cfg.chunk_point < 1.0:
    raise ValueError("prime.chunk_point < 1 (grouped noise) needs a univariate schedule; "
                     f"schedule.name={config.schedule.name!r} masks per position.")
  if multivariate.is_multivariate(schedule):   # learned schedule parameters join the model's
    model = multivariate.attach(model, schedule)
  return Task(objective=config.objective, codec=codec, schedule=schedule,
              loss_cfg=loss_cfg, model=model, seq_len=int(config.data.seq_len),
              time_conditioning=bool(config.model.time_conditioning))


# ------------------------------------------------------------------ optimizer
def make_optimizer(tc) -> Tuple[optax.GradientTransformation, Callable]:
  warm = max(int(tc.warmup_steps), 1)
  lr = float(tc.learning_rate)
  if tc.lr_schedule == "constant":
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
                                 [warm])
  elif tc.lr_schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(
        0.0, lr, warm, max(int(tc.num_steps), warm + 1), end_value=lr * float(tc.min_lr_ratio))
  else:
    raise ValueError(f"training.lr_schedule must be constant|cosine, got {tc.lr_schedule!r}.")
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(float(tc.grad_clip)) if tc.grad_clip > 0 else optax.identity(),
      optax.adamw(sched, b1=float(tc.b1), b2=float(tc.b2), weight_decay=float(tc.weight_decay),
                  mask=decay_mask))
  return tx, sched


# ------------------------------------------------------------------ state
def _init_boxed(task: Task, tx, key, batch_size: int = 2):
  k_param, k_state = jax.random.split(key)
  digits = jnp.zeros((batch_size, task.seq_len, task.codec.ell), jnp.int32)
  params = task.model.init(k_param, digits, jnp.ones((batch_size,), jnp.float32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, key=jax.random.key_data(k_state))


def state_shardings(task: Task, tx, mesh, rules) -> Tuple[Any, Any]:
  """(abstract unboxed state, NamedSharding tree) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, task, tx), jax.random.key(0))
  return nn.unbox(boxed), shd.logical_shardings(boxed, mesh, rules)


def init_state(task: Task, tx, mesh, rules, seed: int) -> Tuple[TrainState, Any]:
  abstract, shardings = state_shardings(task, tx, mesh, rules)
  del abstract
  # Placement comes from out_shardings; the model's activation constraints are
  # not needed (and scanned parameter boxes must not be constrained) at init.
  init = jax.jit(lambda k: nn.unbox(_init_boxed(task, tx, k)), out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init(jax.random.key(seed))
  return state, shardings


# ------------------------------------------------------------------ steps
def make_train_step(task: Task, tx, config, mesh, rules, shardings):
  tc = config.training
  n_micro = int(tc.num_microbatches)
  ema_decay = float(tc.ema_decay)
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
    t_all = losses.sample_times(k_t, bsz, task.loss_cfg.t_min, task.loss_cfg.antithetic)
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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                         state.ema_params, params)
    else:
      ema = params
    out = {"loss": total * norm, "grad_norm": _tree_norm(grads)}
    out.update(jax.tree.map(jnp.mean, metrics))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new, out

  def traced(state, batch):
    with nn.logical_axis_rules(rules):
      return step_fn(state, batch)

  batch_sh = shd.batch_sharding(mesh)   # every batch field ("tokens", optional "labels")
  return jax.jit(traced, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(task: Task, config, mesh, rules, param_shardings):
  if hasattr(task, "make_eval_step"):   # a task with its own metric (GaussianTask: L_G by level)
    return task.make_eval_step(config, mesh, rules, param_shardings)
  k_samples = int(config.eval.num_time_samples)

  def fn(params, batch, key):
    with nn.logical_axis_rules(rules):
      per_seq = task.bound(params, batch["tokens"], key, k_samples)
    w = batch["weights"]
    return jnp.sum(per_seq * w), jnp.sum(w) * batch["tokens"].shape[1]

  bs = shd.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(param_shardings, {"tokens": bs, "weights": bs},
                                   shd.replicated(mesh)))


def evaluate(eval_step, params, batches, mesh, seed: int) -> Dict[str, float]:
  """Token-weighted NELBO (nats/token) and the perplexity bound over fixed batches."""
  if hasattr(eval_step, "evaluate"):    # see make_eval_step
    return eval_step.evaluate(params, batches, mesh, seed)
  total, count = 0.0, 0.0
  base = jax.random.key(seed)
  bs = shd.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    for i, b in enumerate(batches):
      gb = {"tokens": shd.global_batch(b["tokens"], bs), "weights": shd.global_batch(
          b.get("weights", np.ones(len(b["tokens"]), np.float32)), bs)}
      s, c = eval_step(params, gb, jax.random.key_data(jax.random.fold_in(base, i)))
      total += float(s)
      count += float(c)
  nll = total / max(count, 1.0)
  return {"nll": nll, "ppl_bound": float(math.exp(min(nll, 700.0))), "bits_per_token":
          nll / math.log(2.0), "eval_tokens": count}


# ------------------------------------------------------------------ loop
BEST_DIR = "checkpoints_best"


def check_same_tokenizer_everywhere(tokenizer) -> None:
  """In a multi-process job, fails unless every process holds the same tokenizer.

  Each process builds its tokenizer (and, with ``data.token_order``, its vocabulary
  numbering) from the corpus itself; if two hosts disagreed, they would train one
  model on two numberings without any other symptom.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  digest = np.frombuffer(hashlib.sha256(tokenizer.fingerprint().encode()).digest(),
                         np.uint8).astype(np.int32)
  multihost_utils.assert_equal(
      digest, "The processes built different tokenizers or vocabulary orders from the same "
      "corpus (compare workdir/tokenizer/ on each host); set --config.data.token_order=id or "
      "give every host the same corpus and software.")

def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the configured model; returns the final metrics."""
  from mdm_jax.data import make_text_data   # pylint: disable=import-outside-toplevel
  from mdm_jax import sample as sample_lib  # pylint: disable=import-outside-toplevel

  config_utils.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  data = make_text_data(config.data, workdir)
  check_same_tokenizer_everywhere(data.tokenizer)
  task = build_task(config, data.tokenizer.vocab_size)
  mesh = shd.make_mesh(config.mesh)
  rules = shd.logical_rules(config.mesh)
  config_utils.validate_batch(config, mesh)
  tx, lr_sched = make_optimizer(config.training)
  state, shardings = init_state(task, tx, mesh, rules, int(config.seed))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("Model: %s, %.2fM parameters; codec V=%d ell=%d b=%d; mesh %s", config.model.name,
               n_params / 1e6, task.codec.vocab_size, task.codec.ell, task.codec.base,
               dict(mesh.shape))

  train_ds = data.train_dataset(int(config.training.batch_size), int(config.data.shuffle_seed),
                                jax.process_index(), jax.process_count())
  train_iter = iter(train_ds)
  cfg_dict = config_utils.to_dict(config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=int(config.checkpoint.max_to_keep),
                               async_save=bool(config.checkpoint.async_save))
  best_ckpt = None
  if int(config.checkpoint.keep_best):
    best_ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, BEST_DIR),
                                      max_to_keep=int(config.checkpoint.keep_best),
                                      async_save=bool(config.checkpoint.async_save),
                                      best_metric="eval_nll")
  if ckpt.latest_step() is not None:
    ckpt.check_compatible(cfg_dict)
    abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    state = ckpt.restore(abstract, data_iter=train_iter)
    logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
  config_utils.save_config(config, workdir)

  train_step = make_train_step(task, tx, config, mesh, rules, shardings)
  eval_step = make_eval_step(task, config, mesh, rules, shardings.params)
  eval_batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches),
                                   jax.process_index(), jax.process_count())
  writer = metrics_writer.MetricsWriter(workdir, enabled=is_main)
  num_steps = int(config.training.num_steps)
  start = int(state.step)
  tokens_per_step = int(config.training.batch_size) * task.seq_len
  progress = metrics_writer.Progress(num_steps, start, tokens_per_step, enabled=is_main)
  bs = {"tokens": shd.batch_sharding(mesh)}
  last_eval: Dict[str, float] = {}

  def eval_params(s):
    return s.ema_params if config.eval.use_ema else s.params

  scorer = eval_text.scorer_from_config(config)   # sampling.scorer_workdir: gen ppl of samples

  def do_sample(s, step):
    if not is_main and jax.process_count() == 1:
      return
    sample_lib.sample_and_write(task, eval_params(s) if config.sampling.use_ema else s.params,
                                config, data.tokenizer, workdir, step, mesh=mesh, rules=rules,
                                write=is_main, known_words=getattr(data, "known_words", None),
                                known_bigrams=getattr(data, "known_bigrams", None),
                                scorer=scorer)

  metrics = None
  with jax.set_mesh(mesh):
    for step in range(start, num_steps):
      batch = next(train_iter)
      gb = {k: shd.global_batch(v, bs["tokens"]) for k, v in batch.items()}
      state, metrics = train_step(state, gb)
      done = step + 1
      if done % int(config.training.log_every) == 0 or done == num_steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
          raise FloatingPointError(
              f"Training loss became {m['loss']} at step {done}. Lower training.learning_rate "
              "or set training.grad_clip, and resume from the last checkpoint.")
        m["lr"] = float(lr_sched(done))
        progress.update(done, m)
        writer.write(done, {f"train/{k}": v for k, v in m.items()} | progress.rates())
      if (config.eval.every_steps and done % int(config.eval.every_steps) == 0) or done == num_steps:
        last_eval = evaluate(eval_step, eval_params(state), eval_batches, mesh,
                             int(config.eval.seed))
        writer.write(done, {f"eval/{k}": v for k, v in last_eval.items() if not isinstance(v, str)})
        progress.message(f"eval @ {done}: " + last_eval.get(
            "message", f"nll {last_eval['nll']:.4f} nats/token, "
            f"perplexity bound {last_eval.get('ppl_bound', float('nan')):.3f}"))
        if is_main and multivariate.is_multivariate(task.schedule) \
            and task.schedule.family != "slot":   # learned-order picture (positions)
          multivariate.write_order(task.schedule, eval_params(state), task.seq_len, workdir, done)
        if best_ckpt is not None and done not in set(best_ckpt.all_steps()):
          best_ckpt.save(done, state, None, cfg_dict, force=True,
                         metrics={"eval_nll": float(last_eval["nll"])})
      if (config.checkpoint.every_steps and done % int(config.checkpoint.every_steps) == 0) \
          or done == num_steps:
        ckpt.save(done, state, train_iter, cfg_dict, force=done == num_steps)
      if config.sampling.every_steps and done % int(config.sampling.every_steps) == 0 \
          and done != num_steps:
        do_sample(state, done)
  ckpt.close()
  if best_ckpt is not None:
    best_ckpt.close()
  if start < num_steps or not last_eval:
    if not last_eval:
      last_eval = evaluate(eval_step, eval_params(state), eval_batches, mesh, int(config.eval.seed))
    do_sample(state, num_steps)
  writer.close()
  result = {"step": int(state.step), **{f"eval_{k}": v for k, v in last_eval.items()}}
  if metrics is not None:
    result["train_loss"] = float(jax.device_get(metrics["loss"]))
  if is_main:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


# ------------------------------------------------------------------ inference entry points
def restore_for_inference(config, workdir: str):
  """(task, state, mesh, rules, data) from a checkpoint in workdir.

  ``config.checkpoint.restore`` picks the latest step or the best one by eval
  bound (kept under ``checkpoints_best/`` when ``checkpoint.keep_best > 0``).
  """
  from mdm_jax.data import make_text_data  # pylint: disable=import-outside-toplevel
  config_utils.validate_config(config)
  which = config.checkpoint.restore
  sub = BEST_DIR if which == "best" else "checkpoints"
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, sub), read_only=True, async_save=False,
                               best_metric="eval_nll" if which == "best" else None)
  step = ckpt.best_step() if which == "best" else ckpt.latest_step()
  if step is None:
    hint = (" Best-by-eval checkpoints are written when checkpoint.keep_best > 0 and an eval "
            "runs; use --config.checkpoint.restore=latest." if which == "best" else "")
    raise ckpt_lib.CheckpointError(
        f"No checkpoint found under {os.path.join(workdir, sub)}. Train first with "
        f"--mode=train --workdir={workdir}.{hint}")
  ckpt.check_compatible(config_utils.to_dict(config), step)
  data = make_text_data(config.data, workdir)
  check_same_tokenizer_everywhere(data.tokenizer)
  task = build_task(config, data.tokenizer.vocab_size)
  mesh = shd.make_mesh(config.mesh)
  rules = shd.logical_rules(config.mesh)
  tx, _ = make_optimizer(config.training)
  abstract, shardings = state_shardings(task, tx, mesh, rules)
  state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step=step)
  ckpt.close()
  logging.info("Restored %s checkpoint step %d from %s.", which, step, ckpt.directory)
  return task, state, mesh, rules, data, shardings


def evaluate_checkpoint(config, workdir: str) -> Dict[str, Any]:
  task, state, mesh, rules, data, shardings = restore_for_inference(config, workdir)
  eval_step = make_eval_step(task, config, mesh, rules, shardings.params)
  batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches),
                              jax.process_index(), jax.process_count())
  params = state.ema_params if config.eval.use_ema else state.params
  res = evaluate(eval_step, params, batches, mesh, int(config.eval.seed))
  res["step"] = int(state.step)
  res.setdefault("bound", "exact NLL (AR)" if task.objective == "ar" else "valid ELBO (marginal)")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_step_{int(state.step)}.json"), "w") as f:
      json.dump(res, f, indent=2)
  return res


def sample_checkpoint(config, workdir: str, num_steps: Optional[int] = None) -> Dict[str, Any]:
  from mdm_jax import sample as sample_lib  # pylint: disable=import-outside-toplevel
  task, state, mesh, rules, data, _ = restore_for_inference(config, workdir)
  if num_steps:
    config = config.unlock() if hasattr(config, "unlock") else config
    config.sampling.num_steps = int(num_steps)
  params = state.ema_params if config.sampling.use_ema else state.params
  out = sample_lib.sample_and_write(task, params, config, data.tokenizer, workdir,
                                    int(state.step), mesh=mesh, rules=rules,
                                    write=jax.process_index() == 0,
                                    known_words=getattr(data, "known_words", None),
                                    known_bigrams=getattr(data, "known_bigrams", None),
                                    scorer=eval_text.scorer_from_config(config))
  out.pop("texts", None)
  return out
