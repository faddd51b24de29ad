"""Why a learned tilt moves or not: the bound against kappa for a fixed trained network,
and the signal-to-noise ratio of the two-mask gradient of kappa, split by t.

  python docs/results/assets/learned_schedules/diagnose.py --workdir RUN \
      [--kappas 0 0.5 1 1.5 2] [--at 0.01 1.0] [--num_batches 64] [--num_time_samples 16]

RUN is a finished Prime run (any schedule); its EMA network is kept fixed.

* Bound against kappa: the evaluation bound (the 16 x 16 held-out rows of the run's
  evaluation, ``num_time_samples`` stratified times each, the same key for every kappa, so
  times and uniforms are shared) of the network under ``slot_poly`` with each kappa.  Its slope is the gradient the schedule sees.
* Gradient noise: for ``learned_tilt`` at kappa (theta = (kappa, 0)), the per-step
  estimate of d loss / d kappa (16 training rows, two masks each, stratified t, exactly
  as in training, before ``grad_scale``) over ``num_batches`` steps: its mean, standard
  deviation and their ratio, and per row the share of the variance from each decile of t.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mdm_jax.diffusion import elbo
from mdm_jax.diffusion.schedules.learned_tilt import LearnedTiltSchedule
from mdm_jax.diffusion.schedules.slot_poly import SlotPolySchedule
from mdm_jax.trainers.setup import restore_for_inference


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--kappas", type=float, nargs="*", default=[0.0, 0.5, 1.0, 1.5, 2.0])
  p.add_argument("--at", type=float, nargs="*", default=[0.01, 1.0])
  p.add_argument("--num_batches", type=int, default=64)
  p.add_argument("--num_time_samples", type=int, default=16)
  a = p.parse_args()
  config = ml_collections.ConfigDict(json.load(open(os.path.join(a.workdir, "config.json"))))
  config.checkpoint.restore = "latest"
  task, state, _, _, data, _ = restore_for_inference(config, a.workdir)
  params = jax.device_get(state.ema_params)
  codec, cfg = task.codec, task.loss_cfg
  out = {"workdir": a.workdir, "step": int(state.step)}

  batches = data.eval_batches(16, 16, 0, 1)
  key = jax.random.key(1234)

  bounds = {}
  for kappa in a.kappas:
    fn = jax.jit(lambda pr, tok, w, k, kappa=kappa: jnp.sum(w * elbo.diffusion_bound(
        task.apply_fn, pr, tok, k, codec=codec,
        schedule=SlotPolySchedule(slot_tilt=kappa, ell=codec.ell), cfg=cfg,
        num_time_samples=a.num_time_samples)))
    tot, n = 0.0, 0
    for i, b in enumerate(batches):                     # weight 0: padding rows
      w = np.asarray(b.get("weights", np.ones(len(b["tokens"]))), np.float32)
      tot += float(fn(params, jnp.asarray(b["tokens"]), jnp.asarray(w),
                      jax.random.fold_in(key, i)))
      n += float(w.sum()) * b["tokens"].shape[1]
    bounds[kappa] = tot / n
    print(f"kappa {kappa:4.2f}: bound {bounds[kappa]:.4f} nats/token", flush=True)
  out["bound_by_kappa"] = bounds

  sched = LearnedTiltSchedule(ell=codec.ell, num_masks=2)
  train = np.asarray(data.train)
  rng = np.random.default_rng(0)
  grads = {}
  for kappa in a.at:
    theta = jnp.array([kappa] + [0.0] * (codec.ell - 1), jnp.float32)

    @jax.jit
    def per_row(theta, tokens, k):
      t = elbo.sample_times(jax.random.fold_in(k, 7), tokens.shape[0], cfg.t_min, True)

      def losses(th):
        pr = dict(params)
        pr["schedule"] = {"theta": th}
        return elbo.diffusion_loss(task.apply_fn, pr, tokens, k, codec=codec, schedule=sched,
                                   cfg=cfg, train=True, t=t)[0]
      return jax.jacrev(losses)(theta)[:, 0], t       # d loss_row / d kappa, [B]

    rows_g, rows_t, steps = [], [], []
    for i in range(a.num_batches):
      idx = rng.integers(0, train.shape[0], 16)
      g, t = per_row(theta, jnp.asarray(train[idx]), jax.random.key(100 + i))
      g, t = np.asarray(g, np.float64), np.asarray(t)
      rows_g.append(g)
      rows_t.append(t)
      steps.append(g.mean())
    g, t, steps = np.concatenate(rows_g), np.concatenate(rows_t), np.asarray(steps)
    dec = np.minimum((t * 10).astype(int), 9)
    share = [float(np.sum((g[dec == d] - g.mean()) ** 2) / np.sum((g - g.mean()) ** 2))
             for d in range(10)]
    mean_by_decile = [float(g[dec == d].mean()) for d in range(10)]
    grads[kappa] = {"mean": float(steps.mean()), "std_per_step": float(steps.std()),
                    "snr_per_step": float(abs(steps.mean()) / steps.std()),
                    "se_of_mean": float(steps.std() / np.sqrt(len(steps))),
                    "variance_share_by_t_decile": share, "mean_by_t_decile": mean_by_decile}
    print(f"kappa {kappa:4.2f}: d loss/d kappa per step {steps.mean():+.4f} +- "
          f"{steps.std() / np.sqrt(len(steps)):.4f} (std per step {steps.std():.4f}, "
          f"SNR {abs(steps.mean()) / steps.std():.3f}); variance share of t < 0.1: "
          f"{share[0]:.2f}", flush=True)
  out["gradient"] = grads
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
