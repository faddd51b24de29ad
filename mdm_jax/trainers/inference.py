"""Using a trained run: evaluate it, sample from it, or load it as a text scorer."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import jax

from mdm_jax.core import distributed, paths
from mdm_jax.core import sharding as shd
from mdm_jax.core.config import from_dict, to_dict
from mdm_jax.core.errors import ConfigError
from mdm_jax.metrics.gen_ppl import Scorer
from mdm_jax.networks import gpt2
from mdm_jax.trainers.samples import sample_and_write, sample_file_name
from mdm_jax.trainers.setup import restore_for_inference
from mdm_jax.trainers.steps import evaluate, make_eval_step


def evaluate_checkpoint(config, workdir: str) -> Dict[str, Any]:
  """The eval metric of the checkpoint in ``workdir`` (``task.eval_summary``), written to
  ``workdir/eval_step_N.json``."""
  task, state, mesh, rules, data, shardings = restore_for_inference(config, workdir)
  eval_step = make_eval_step(task, config, mesh, rules, shardings.params)
  batches = data.eval_batches(int(config.eval.batch_size), int(config.eval.num_batches),
                              *shd.process_batch_slice(mesh))
  params = state.ema_params if config.eval.use_ema else state.params
  res = evaluate(eval_step, task, params, batches, mesh, int(config.eval.seed))
  res["step"] = int(state.step)
  res.setdefault("bound", task.bound_name)
  if jax.process_index() == 0:
    with paths.open(paths.join(workdir, f"eval_step_{int(state.step)}.json"), "w") as f:
      json.dump(res, f, indent=2)
  return res


def sample_checkpoint(config, workdir: str, num_steps: Optional[int] = None) -> Dict[str, Any]:
  """Samples from the checkpoint in ``workdir`` (``sampling.*``; ``num_steps`` overrides
  ``sampling.num_steps``) and writes them under ``workdir/samples/`` in files named by
  step, sampler, steps and seed (``samples.sample_file_name``), never over the training
  run's ``step_N.*``."""
  task, state, mesh, rules, data, _ = restore_for_inference(config, workdir)
  if num_steps:
    config = config.unlock() if hasattr(config, "unlock") else config
    config.sampling.num_steps = int(num_steps)
  params = state.ema_params if config.sampling.use_ema else state.params
  out = sample_and_write(task, params, config, data, workdir, int(state.step), mesh=mesh,
                         rules=rules, write=jax.process_index() == 0,
                         scorer=scorer_from_config(config),
                         name=sample_file_name(config, int(state.step),
                                               paths.join(workdir, "samples")))
  out.pop("texts", None)
  return out


def load_scorer(workdir: str, config=None, restore: Optional[str] = None) -> Scorer:
  """Restores the AR run in ``workdir`` as a ``Scorer`` of texts.

  ``workdir = "gpt2:FOLDER"`` loads the GPT-2 in a local Hugging Face folder instead
  (``mdm_jax.networks.gpt2``; the peers' protocol, ``gen_ppl.score_texts_judge``).

  Args:
    workdir: the AR run, or ``gpt2:FOLDER``.
    config: its configuration (checked against the checkpoint); None = the
      ``config.json`` the run saved.
    restore: "latest" or "best"; None = the config's ``checkpoint.restore``.

  Raises:
    ConfigError: ``workdir`` holds no run, or a diffusion run (only an AR model
      gives exact token probabilities to score with).
  """
  if str(workdir).startswith(gpt2.PREFIX):
    return gpt2.gpt2_scorer(str(workdir)[len(gpt2.PREFIX):])
  workdir = paths.resolve(workdir)
  if config is None:
    path = paths.join(workdir, "config.json")
    if not paths.exists(path):
      raise ConfigError(
          f"No trained run in {workdir} (no config.json). Train an autoregressive scorer first, "
          f"e.g. python -m mdm_jax.main --config=shakespeare_ar --workdir={workdir}")
    with paths.open(path) as f:
      config = from_dict(json.load(f))
  else:
    config = from_dict(to_dict(config))   # an unlocked copy
  if config.objective != "ar":
    raise ConfigError(
        f"The scorer in {workdir} was trained with objective={config.objective!r}; generative "
        "perplexity needs an autoregressive run (objective='ar', e.g. --config=shakespeare_ar), "
        "whose token probabilities are exact.")
  if restore:
    config.checkpoint.restore = restore
  task, state, _, _, data, _ = restore_for_inference(config, workdir)
  params = state.ema_params if config.eval.use_ema else state.params
  nll = jax.jit(task.token_nll)
  return Scorer(token_nll=lambda tokens: distributed.host_arrays(nll(params, tokens)),
                tokenizer=data.tokenizer, seq_len=int(task.seq_len), name=workdir,
                step=int(state.step), eval_rows=getattr(data, "eval", None))


def scorer_from_config(config) -> Optional[Scorer]:
  """The scorer named by ``sampling.scorer_workdir`` (an AR run or ``gpt2:FOLDER``; None
  when it is empty).

  Raises:
    ConfigError: a scorer in a multi-process run (score afterwards with
      ``--mode=score``), or a bad scorer run (see ``load_scorer``).
  """
  path = str(config.sampling.scorer_workdir or "")
  if not path:
    return None
  if jax.process_count() > 1:
    raise ConfigError(
        "sampling.scorer_workdir scores samples in single-process runs only; in a "
        f"{jax.process_count()}-process run leave it empty and score the written samples "
        "afterwards with --mode=score.")
  return load_scorer(path)
