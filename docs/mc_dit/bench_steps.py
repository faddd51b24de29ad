"""Seconds per train step of the three arms, interleaved in one process so that they share the
same machine load: python docs/mc_dit/bench_steps.py [batch] [rounds] [steps_per_round]"""
import json
import sys
import time

import jax
import numpy as np

from mdm_jax.configs import fashion_mnist_mcdit
from mdm_jax.core import sharding as shd
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import init_state, make_optimizer
from mdm_jax.trainers.steps import make_train_step

batch, rounds, per = (int(a) for a in (sys.argv[1:] + ["32", "5", "5"][len(sys.argv) - 1:])[:3])
rng = np.random.default_rng(0)
steps = {}
for arm in ("dit", "mdt", "mcdit"):
  c = fashion_mnist_mcdit.get_config(f"arm={arm}")
  c.training.batch_size = batch
  c.mesh.shape = (1, 1, 1)
  task = build_task(c, 256)
  mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
  rules = shd.logical_rules(c.mesh)
  tx, _ = make_optimizer(c.training)
  state, sh = init_state(task, tx, mesh, rules, 0)
  fn = make_train_step(task, tx, c, mesh, rules, sh)
  bs = shd.batch_sharding(mesh)
  b = {"tokens": shd.global_batch(rng.integers(0, 256, (batch, 784)).astype(np.int32), bs),
       "labels": shd.global_batch((np.arange(batch) % 10).astype(np.int32), bs)}
  with jax.set_mesh(mesh):
    state, m = fn(state, b)
    jax.block_until_ready(m)
  steps[arm] = [fn, state, b, mesh, []]
for _ in range(rounds):
  for arm, s in steps.items():
    fn, state, b, mesh, times = s
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      for _ in range(per):
        state, m = fn(state, b)
      jax.block_until_ready(m)
      times.append((time.perf_counter() - t0) / per)
    s[1] = state
res = {arm: {"median_s_per_step": float(np.median(s[4])), "min_s_per_step": float(min(s[4]))}
       for arm, s in steps.items()}
for arm in res:
  res[arm]["ratio_to_dit"] = res[arm]["median_s_per_step"] / res["dit"]["median_s_per_step"]
res["batch_size"], res["rounds"], res["steps_per_round"] = batch, rounds, per
print(json.dumps(res, indent=2))
