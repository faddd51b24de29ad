"""Two real JAX processes on localhost (CPU, gloo) against one process with the same devices.

``launch/local_multiprocess.py`` starts 2 processes x 2 simulated CPU devices that form
one 4-device job; each reference is 1 process x 4 devices with the same config, mesh and
device order.  Two meshes put the parameters across the processes, as pods run:

* ``fsdp``: mesh (1, 4, 1), parameters and batch rows sharded over both processes;
* ``fsdp_tensor``: mesh (1, 2, 2) with ``mesh.device_order=(0, 2, 3, 1)``, so that BOTH
  the fsdp and the tensor axis cross the processes, with a learned schedule
  (``learned_poly``) whose parameters live in the train state.

Each 2-process job evaluates, samples and checkpoints inside the run, is sent SIGTERM
on one process mid-run (as a TPU maintenance event or SLURM would), saves the same step
on every process and exits 75, and is resumed.  Its per-step losses, eval bounds, samples
and final parameters must equal the uninterrupted 1-process run's; then ``--mode=eval``
and ``--mode=sample`` as 2 processes must reproduce that run's bound and samples.  Only
process 0 may write logs and samples, and the 2-process checkpoint must be restorable by
a 1-process run.  The fast tests check the launcher's failure handling and the dry runs
of the TPU-pod and SLURM scripts.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
STEPS = 6
EVERY = 2      # eval, checkpoint and samples every 2 steps
ARGS = ["--config=configs/shakespeare_prime.py:tiny",
        "--config.data.tokenizer=char",          # no BPE training: seconds matter here
        f"--config.training.num_steps={STEPS}", "--config.training.log_every=1",
        f"--config.eval.every_steps={EVERY}", "--config.eval.num_batches=1",
        f"--config.checkpoint.every_steps={EVERY}", f"--config.sampling.every_steps={EVERY}",
        "--config.sampling.num_steps=2"]
# (Kept apart from ARGS: a second --config.mesh.shape would be appended, not replace it.)
MESHES = {
    "fsdp": ["--config.mesh.shape=(1,4,1)"],
    "fsdp_tensor": ["--config.mesh.shape=(1,2,2)", "--config.mesh.device_order=(0,2,3,1)",
                    "--config.schedule.name=learned_poly"],
}
SIGNALLED = {"fsdp": 1, "fsdp_tensor": 0}     # the process that gets SIGTERM


# LLVM -O0 halves the CPU time of the many small compiles here (train, eval and
# sampling steps in every process); both sides use it, so results stay comparable.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _env(devices=None):
  env = dict(os.environ)
  for k in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "JAX_NUM_CPU_DEVICES"):
    env.pop(k, None)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = FAST_COMPILE      # the launcher keeps it and adds the device count
  if devices:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  return env


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]


def _train_metric(workdir, key="train/loss"):
  return {r["step"]: r[key] for r in _records(workdir) if key in r}


def _restore_numpy(workdir, step):
  """The saved train state as numpy arrays, independent of the saving topology."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _launch(args, workdir, log):
  return subprocess.Popen([sys.executable, LAUNCHER, "--num_processes=2",
                           "--devices_per_process=2", "--timeout=540", "--quiet", "--",
                           *args, f"--workdir={workdir}"],
                          cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _one_process(args, workdir, log):
  return subprocess.Popen([sys.executable, "-m", "mdm_jax.main", *args, f"--workdir={workdir}"],
                          cwd=ROOT, env=_env(devices=4), stdout=log, stderr=subprocess.STDOUT)


def _process_logs(workdir):
  out = []
  for i in range(2):
    path = os.path.join(workdir, "logs", f"process_{i}.log")
    if os.path.isfile(path):
      out.append(f"--- process {i} ---\n" + open(path).read()[-6000:])
  return "\n".join(out)


def _wait(proc, what, log_path, workdir=None, expect=0):
  proc.wait(timeout=600)
  if proc.returncode != expect:
    pytest.fail(f"{what}: status {proc.returncode}, expected {expect}:\n"
                + open(log_path).read()[-3000:] + (_process_logs(workdir) if workdir else ""))


def _sigterm_after_first_step(workdir, process, launcher, timeout=400):
  """Sends SIGTERM to one process of the job once step 1 is logged (training under way)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  pid_file = os.path.join(workdir, "logs", f"process_{process}.pid")
  deadline = time.time() + timeout
  while time.time() < deadline and launcher.poll() is None:
    if os.path.isfile(pid_file) and os.path.isfile(metrics) and \
        '"train/loss"' in open(metrics).read():
      os.kill(int(open(pid_file).read()), signal.SIGTERM)
      return
    time.sleep(0.05)
  pytest.fail(f"{workdir}: training never started (or ended before the signal).")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{mesh: (one-process workdir, two-process workdir, {"eval": ..., "sample": ...})}."""
  base = tmp_path_factory.mktemp("mp")
  t0 = time.time()
  dirs = {m: (str(base / f"{m}_one_process"), str(base / f"{m}_two_processes")) for m in MESHES}
  logs = {}

  def log(name):
    logs[name] = str(base / f"{name}.log")
    return open(logs[name], "w")

  # 1. All four jobs at once (XLA compiles mostly on one core, so this saves wall time); the
  #    2-process ones are sent SIGTERM on one process once training runs.
  procs = {}
  for m, extra in MESHES.items():
    ref_dir, mp_dir = dirs[m]
    procs[f"{m}_ref"] = _one_process([*ARGS, *extra], ref_dir, log(f"{m}_ref"))
    procs[f"{m}_mp"] = _launch([*ARGS, *extra], mp_dir, log(f"{m}_mp"))
  for m in MESHES:
    _sigterm_after_first_step(dirs[m][1], SIGNALLED[m], procs[f"{m}_mp"])
  for m in MESHES:
    _wait(procs[f"{m}_ref"], f"{m}: 1-process run", logs[f"{m}_ref"])
    _wait(procs[f"{m}_mp"], f"{m}: preempted 2-process run", logs[f"{m}_mp"], dirs[m][1],
          expect=75)
  preempted = {}
  for m in MESHES:
    preempted[m] = [open(os.path.join(dirs[m][1], "logs", f"process_{i}.log")).read()
                    for i in range(2)]
  # 2. Re-running the same command resumes.
  procs = {m: _launch([*ARGS, *MESHES[m]], dirs[m][1], log(f"{m}_resume")) for m in MESHES}
  for m, p in procs.items():
    _wait(p, f"{m}: resumed 2-process run", logs[f"{m}_resume"], dirs[m][1])
  # 3. --mode=eval and --mode=sample as 2 processes (logs elsewhere: the run's stay).
  procs = {}
  for m in MESHES:
    for mode in ("eval", "sample"):
      log_dir = str(base / f"{m}_{mode}_logs")
      procs[(m, mode)] = subprocess.Popen(
          [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=2",
           "--timeout=400", f"--log_dir={log_dir}", "--", *ARGS, *MESHES[m],
           f"--workdir={dirs[m][1]}", f"--mode={mode}"],
          cwd=ROOT, env=_env(), stdout=log(f"{m}_{mode}"), stderr=subprocess.STDOUT)
  modes = {m: {} for m in MESHES}
  for (m, mode), p in procs.items():
    _wait(p, f"{m}: 2-process --mode={mode}", logs[f"{m}_{mode}"])
    out = open(logs[f"{m}_{mode}"]).read()
    modes[m][mode] = json.loads(out[out.rindex("\n{") + 1:out.rindex("}") + 1])
  print(f"1-process and 2-process runs, resumes, eval and sample: {time.time() - t0:.1f} s")
  return {m: (*dirs[m], modes[m], preempted[m]) for m in MESHES}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_form_one_job(runs, mesh):
  _, mp_dir, _, _ = runs[mesh]
  log0 = open(os.path.join(mp_dir, "logs", "process_0.log")).read()
  log1 = open(os.path.join(mp_dir, "logs", "process_1.log")).read()
  assert "process 0 of 2" in log0 and "process 1 of 2" in log1
  shape = {"fsdp": "'data': 1, 'fsdp': 4, 'tensor': 1",
           "fsdp_tensor": "'data': 1, 'fsdp': 2, 'tensor': 2"}[mesh]
  assert shape in log0                            # one 4-device mesh over both processes
  # Only process 0 logs metrics, prints progress and writes samples.
  assert f"{STEPS}/{STEPS}" in log0 and f"{STEPS}/{STEPS}" not in log1
  assert "sample 0 at step" in log0 and "sample 0 at step" not in log1
  steps = [r["step"] for r in _records(mp_dir) if "train/loss" in r]
  assert steps == list(range(1, STEPS + 1))      # one writer, resumed: no duplicated records
  for step in range(EVERY, STEPS + 1, EVERY):
    assert os.path.isfile(os.path.join(mp_dir, "samples", f"step_{step}.txt"))
  # Every process took part in the checkpoint (one iterator state per process).
  data = os.listdir(os.path.join(mp_dir, "checkpoints", str(STEPS), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
  if mesh == "fsdp_tensor":      # the learned order's picture after every eval, from process 0
    for step in range(EVERY, STEPS + 1, EVERY):
      assert os.path.isfile(os.path.join(mp_dir, "order", f"step_{step}.png")), step


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sigterm_to_one_process_saves_the_same_step_everywhere(runs, mesh):
  _, mp_dir, _, preempted = runs[mesh]
  stopped = []
  for i, log in enumerate(preempted):
    marker = "preempted (SIGTERM): stopped after step "
    assert marker in log, f"process {i} did not stop through the preemption path:\n{log[-3000:]}"
    stopped.append(int(log[log.index(marker) + len(marker):].split()[0]))
  assert stopped[0] == stopped[1] < STEPS, stopped   # one agreed step, before the end
  data = os.listdir(os.path.join(mp_dir, "checkpoints", str(stopped[0]), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_losses_bounds_samples_and_parameters_match_one_process(runs, mesh):
  """The preempted and resumed 2-process run equals the uninterrupted 1-process run."""
  ref_dir, mp_dir, _, _ = runs[mesh]
  ref, got = _train_metric(ref_dir), _train_metric(mp_dir)
  print("step  1 process x 4 devices   2 processes x 2 devices (preempted, resumed)")
  for s in sorted(ref):
    print(f"{s:4d}  {ref[s]:.7f}             {got.get(s, float('nan')):.7f}")
  assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
  for s in ref:
    np.testing.assert_allclose(got[s], ref[s], rtol=1e-6, err_msg=f"train loss, step {s}")
  gn_ref = _train_metric(ref_dir, "train/grad_norm")
  gn_got = _train_metric(mp_dir, "train/grad_norm")
  for s in gn_ref:
    np.testing.assert_allclose(gn_got[s], gn_ref[s], rtol=1e-5, err_msg=f"grad norm, step {s}")
  ev_ref, ev_got = _train_metric(ref_dir, "eval/nll"), _train_metric(mp_dir, "eval/nll")
  assert sorted(ev_got) == sorted(ev_ref) == list(range(EVERY, STEPS + 1, EVERY))
  for s in ev_ref:
    np.testing.assert_allclose(ev_got[s], ev_ref[s], rtol=1e-5, err_msg=f"eval bound, step {s}")
  for step in range(EVERY, STEPS + 1, EVERY):
    texts = [json.load(open(os.path.join(d, "samples", f"step_{step}.json")))["texts"]
             for d in (ref_dir, mp_dir)]
    assert texts[0] == texts[1], f"samples at step {step}"

  a, b = _restore_numpy(ref_dir, STEPS), _restore_numpy(mp_dir, STEPS)
  import jax  # pylint: disable=import-outside-toplevel
  assert int(a["step"]) == int(b["step"]) == STEPS
  if mesh == "fsdp_tensor":
    assert "schedule" in a["params"]             # the learned schedule is in the state
  for name in ("params", "ema_params"):
    la, lb = jax.tree_util.tree_leaves_with_path(a[name]), jax.tree.leaves(b[name])
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name}{jax.tree_util.keystr(path)}")
  fa = json.load(open(os.path.join(ref_dir, "final_metrics.json")))
  fb = json.load(open(os.path.join(mp_dir, "final_metrics.json")))
  np.testing.assert_allclose(fb["eval_nll"], fa["eval_nll"], rtol=1e-5)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_eval_and_sample_modes_as_two_processes_match_one_process(runs, mesh):
  ref_dir, mp_dir, modes, _ = runs[mesh]
  final = json.load(open(os.path.join(ref_dir, "final_metrics.json")))
  assert modes["eval"]["step"] == STEPS
  np.testing.assert_allclose(modes["eval"]["nll"], final["eval_nll"], rtol=1e-5)
  assert os.path.isfile(os.path.join(mp_dir, f"eval_step_{STEPS}.json"))
  # --mode=sample: same checkpoint, sampler and seed as the run's last samples.
  name = [f for f in os.listdir(os.path.join(mp_dir, "samples"))
          if f.startswith(f"step_{STEPS}-") and f.endswith(".json")]
  assert len(name) == 1, name
  got = json.load(open(os.path.join(mp_dir, "samples", name[0])))["texts"]
  ref = json.load(open(os.path.join(ref_dir, "samples", f"step_{STEPS}.json")))["texts"]
  assert got == ref


def test_two_process_checkpoint_restores_in_one_process(runs):
  _, mp_dir, _, _ = runs["fsdp"]
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", *ARGS, f"--workdir={mp_dir}",
                         "--mode=eval", "--config.mesh.shape=(-1,1,1)"],
                        cwd=ROOT, env=_env(devices=1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  ev = json.loads(proc.stdout[proc.stdout.index("{"):])
  final = json.load(open(os.path.join(mp_dir, "final_metrics.json")))
  assert ev["step"] == STEPS
  np.testing.assert_allclose(ev["nll"], final["eval_nll"], rtol=1e-5)


def test_two_process_checkpoint_resumes_training_in_one_process(runs, tmp_path):
  """Resuming with another process count continues the same data stream and losses."""
  import shutil  # pylint: disable=import-outside-toplevel
  ref_dir, mp_dir, _, _ = runs["fsdp"]
  a, b = str(tmp_path / "ref"), str(tmp_path / "mp")
  shutil.copytree(ref_dir, a)
  shutil.copytree(mp_dir, b)
  more = [*ARGS, *MESHES["fsdp"], f"--config.training.num_steps={STEPS + 2}"]
  procs = [subprocess.Popen([sys.executable, "-m", "mdm_jax.main", *more, f"--workdir={d}"],
                            cwd=ROOT, env=_env(devices=4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for d in (a, b)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  ref, got = _train_metric(a), _train_metric(b)
  for s in (STEPS + 1, STEPS + 2):
    np.testing.assert_allclose(got[s], ref[s], rtol=1e-6, err_msg=f"resumed step {s}")


def test_two_checkpointers_save_the_same_step_at_once_across_processes(tmp_path):
  """Regression: after an eval, the train loop saves one step into checkpoints/ and
  checkpoints_best/ at once.  Orbax keys its barriers by the step directory's name, so
  without a per-manager prefix the two managers' background threads met at each other's
  barriers and the 2-process job hung or failed (seen on CI)."""
  (tmp_path / "two_ckpts.py").write_text(textwrap.dedent("""\
      import os, random, sys, time
      from mdm_jax.core import distributed
      distributed.maybe_initialize()
      distributed.dump_stacks_on_signal()
      import jax, numpy as np
      from mdm_jax.trainers import checkpoint
      base = sys.argv[1]
      mesh = jax.make_mesh((jax.device_count(),), ("d",))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
      rng = random.Random(jax.process_index())      # the processes drift apart
      last = checkpoint.Checkpointer(os.path.join(base, "checkpoints"), max_to_keep=2)
      best = checkpoint.Checkpointer(os.path.join(base, "checkpoints_best"), max_to_keep=1,
                                     best_metric="eval_nll")
      for step in range(1, 5):
        x = jax.device_put(np.full((8, 4), step, np.float32), sharding)
        best.save(step, {"x": x}, force=True, metrics={"eval_nll": 10.0 - step})
        time.sleep(rng.random() * 0.2)
        last.save(step, {"x": x}, force=True)
        time.sleep(rng.random() * 0.2)
      last.close()
      best.close()
      print("saved", sorted(last.all_steps()), best.best_step(), flush=True)
  """))
  env = _env()
  env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
  proc = subprocess.run([sys.executable, LAUNCHER, "-n", "2", "--devices_per_process=2",
                         "--module=two_ckpts", "--timeout=90", "--quiet",
                         f"--log_dir={tmp_path}/logs", "--", str(tmp_path / "out")],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=150)
  logs = "\n".join(open(tmp_path / "logs" / f"process_{i}.log").read()[-3000:]
                   for i in range(2) if (tmp_path / "logs" / f"process_{i}.log").exists())
  assert proc.returncode == 0, proc.stderr[-3000:] + logs
  for i in range(2):
    assert "saved [3, 4] 4" in open(tmp_path / "logs" / f"process_{i}.log").read()
  restored = _restore_numpy(str(tmp_path / "out"), 4)
  np.testing.assert_array_equal(restored["x"], np.full((8, 4), 4, np.float32))


# ---------------------------------------------------------------- fast launcher tests
def test_launcher_propagates_a_failure_and_stops_the_others(tmp_path):
  (tmp_path / "child.py").write_text(textwrap.dedent("""\
      import os, sys, time
      pid = int(os.environ["JAX_PROCESS_ID"])
      assert os.environ["JAX_NUM_PROCESSES"] == "3"
      assert os.environ["JAX_COORDINATOR_ADDRESS"].startswith("localhost:")
      print(f"child {pid} up", flush=True)
      if pid == 1:
          time.sleep(2)   # the others have printed by then, even on a loaded machine
          sys.exit(3)
      time.sleep(120)
  """))
  env = _env()
  env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
  t0 = time.time()
  proc = subprocess.run([sys.executable, LAUNCHER, "-n", "3", "--module=child",
                         f"--log_dir={tmp_path}/logs", "--"], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr
  assert time.time() - t0 < 30                   # the sleepers were killed, not awaited
  assert "process 1 exited with status 3" in proc.stderr
  for i in range(3):
    assert f"child {i} up" in open(tmp_path / "logs" / f"process_{i}.log").read()


def test_launcher_timeout_dumps_every_process_stack(tmp_path):
  """A hung job: past --timeout each child writes its Python stacks, then all are stopped.

  The timeout leaves the children time to import jax and install the handler even on a
  loaded 2-core CI machine (with 4 s, one child was still importing when it came).
  """
  (tmp_path / "hang.py").write_text(textwrap.dedent("""\
      import os, time
      from mdm_jax.core import distributed
      distributed.dump_stacks_on_signal()
      print(f"child {os.environ['JAX_PROCESS_ID']} waiting", flush=True)
      def wait_for_the_others():
          time.sleep(120)
      wait_for_the_others()
  """))
  env = _env()
  env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
  t0 = time.time()
  proc = subprocess.run([sys.executable, LAUNCHER, "-n", "2", "--module=hang", "--timeout=20",
                         "--quiet", f"--log_dir={tmp_path}/logs", "--"], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 124, proc.stderr
  assert time.time() - t0 < 80                   # stopped at the timeout, not at the sleep's end
  assert "timeout after 20 s" in proc.stderr
  for i in range(2):
    log = open(tmp_path / "logs" / f"process_{i}.log").read()
    assert f"child {i} waiting" in log
    assert "wait_for_the_others" in log, log     # the stack dump names the waiting function
    assert f"last lines of process {i}" in proc.stderr


def test_launcher_env():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  try:
    import local_multiprocess as lm  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  env = lm.process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"},
                       port=1234, num_processes=2, process_id=1, devices_per_process=2,
                       platform="cpu")
  assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
  assert env["JAX_NUM_PROCESSES"] == "2" and env["JAX_PROCESS_ID"] == "1"
  assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
  assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  assert 0 < lm.free_port() < 65536


def test_cpu_collectives_switch(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from mdm_jax.core import distributed  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert distributed._cpu_is_the_platform()     # pylint: disable=protected-access
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not distributed._cpu_is_the_platform()  # pylint: disable=protected-access
  monkeypatch.delenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", raising=False)
  assert distributed.enable_cpu_collectives()
  assert jax.config.jax_cpu_collectives_implementation == "gloo"
  monkeypatch.setenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "mpi")
  assert not distributed.enable_cpu_collectives()  # an explicit choice is left alone


def _dry(script, sub, extra_env=None):
  env = dict(os.environ, DRY_RUN="1", **(extra_env or {}))
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *sub], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_parse(script):
  proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_tpu_pod_dry_run():
  env = {"TPU_NAME": "mdm-test", "ZONE": "us-east5-a", "ACCELERATOR": "v5p-32",
         "CONFIG": "configs/owt_prime.py:ell=4", "WORKDIR": "/mnt/gcs/runs/p4",
         "BUCKET": "gs://bucket"}
  out = {}
  for sub in ("create", "setup", "train", "logs", "delete"):
    p = _dry("tpu_pod.sh", [sub], env)
    assert p.returncode == 0, (sub, p.stderr)
    out[sub] = p.stdout
  assert "gcloud compute tpus tpu-vm create mdm-test" in out["create"]
  assert "--zone=us-east5-a" in out["create"] and "--accelerator-type=v5p-32" in out["create"]
  assert "--version=" in out["create"]
  for sub in ("setup", "train"):
    assert "gcloud compute tpus tpu-vm ssh mdm-test" in out[sub] and "--worker=all" in out[sub]
  assert "mdm_jax.main" in out["train"] and "configs/owt_prime.py:ell=4" in out["train"]
  assert "/mnt/gcs/runs/p4" in out["train"] and "MDM_JAX_DISTRIBUTED=1" in out["train"]
  assert "gcsfuse --implicit-dirs bucket" in out["setup"]
  assert "gcloud compute tpus tpu-vm scp" in out["logs"] or "gsutil" in out["logs"]
  assert "gcloud compute tpus tpu-vm delete mdm-test" in out["delete"]
  bad = _dry("tpu_pod.sh", ["bogus"])
  assert bad.returncode != 0 and "create|setup|train|logs|delete" in bad.stderr + bad.stdout


def test_slurm_dry_run():
  p = _dry("slurm_gpu.sbatch", [], {"SLURM_NTASKS": "16", "SLURM_NNODES": "2",
                                      "SLURM_JOB_ID": "42"})
  assert p.returncode == 0, p.stderr
  assert "srun" in p.stdout and "mdm_jax.main" in p.stdout
