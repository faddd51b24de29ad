"""Published MDLM / MDM-Prime checkpoints in and out of mdm_jax workdirs.

``convert_checkpoint`` reads the authors' weights (a Hugging Face ``.safetensors`` file or a
PyTorch Lightning ``.ckpt``; no torch needed, ``mdm_jax.core.torch_files``), or a Hub name
``hf://ORG/NAME[@REVISION][/PATH]`` fetched through ``huggingface_hub`` (``trainers/hub.py``),
maps them onto the ``dit`` network (``mdm_jax.networks.published``), and writes a normal
workdir:

  DIR/config.py            the resolved config (``--config=DIR/config.py``), the packaged
  DIR/config.json          base config with the network, codec and schedule set to match
  DIR/checkpoints/0/       an Orbax checkpoint: params = the trained weights, ema_params =
                           the EMA copy where the file has one (else the same weights),
                           a fresh optimizer state at step 0
  DIR/converted_from.json  where it came from: format, path, size, SHA-256, architecture

so ``--mode=eval``, ``--mode=sample`` and ``--mode=train`` (continued training, warm-up
restarting at step 0) work on it unchanged.  The workdir is assembled in a temporary
directory beside it and renamed into place at the end: a failure leaves nothing behind.

``export_checkpoint`` writes a workdir's ``dit`` weights in the authors' layout (a
safetensors state dict with the ``backbone.`` prefix, and the Hugging Face-style
``config.json`` next to it), which their ``DIT`` / ``PerceiverDIT`` load with
``load_state_dict`` once the prefix is dropped.  ``export_hub_folder`` writes a folder ready
to upload to the Hub: ``model.safetensors``, ``config.json``, the tokenizer, the run's config
and a model card (``README.md``) with the last evaluated bound and how to load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core import distributed, paths
from mdm_jax.core import sharding as shd
from mdm_jax.core import torch_files
from mdm_jax.core.config import from_dict, load_config, to_dict
from mdm_jax.networks import published as pub
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers import hub
from mdm_jax.tasks import build_task
from mdm_jax.trainers.setup import CHECKPOINT_DIR, restore_for_inference
from mdm_jax.trainers.state import TrainState, make_optimizer, state_shardings

ConversionError = pub.ConversionError
WeightFileError = torch_files.WeightFileError
PROVENANCE_FILE = "converted_from.json"
GPT2_VOCAB = 50257

_CONFIG_PY = '''"""mdm_jax config of a model converted by ``python -m mdm_jax.convert`` ({source}).

See converted_from.json for the checkpoint it came from.  Use it as
``--config={path}`` (any ``--config.KEY=VALUE`` override applies as usual).
"""

import json

from mdm_jax.core.config import from_dict

CONFIG_JSON = {config_json!r}


def get_config(arg: str = ""):
  del arg
  return from_dict(json.loads(CONFIG_JSON))
'''


# ------------------------------------------------------------------ reading
def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _hf_config(path: str) -> Dict[str, Any]:
  """The Hugging Face ``config.json`` beside a safetensors file, if there is one."""
  folder, stem = os.path.dirname(path) or ".", os.path.basename(path).rsplit(".", 1)[0]
  for name in ("config.json", f"{stem}_config.json"):
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      with open(p, encoding="utf-8") as f:
        try:
          return json.load(f)
        except ValueError as e:
          raise ConversionError(f"{p} is not valid JSON ({e}).") from e
  return {}


def read_published(source: str, path: str) -> Dict[str, Any]:
  """{"state", "ema", "hparams", "format"} of a published checkpoint file.

  ``state`` is the backbone's state dict (prefix dropped), ``ema`` the EMA state dict or
  None, ``hparams`` the authors' settings that matter here (heads, ell, time conditioning,
  parameterization, backbone) as far as the file records them.
  """
  if source not in pub.SOURCES:
    raise ConversionError(f"--from must be one of {', '.join(pub.SOURCES)}, got {source!r}.")
  ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
  hp: Dict[str, Any] = {}
  ema = None
  if ext == "safetensors":
    state = pub.strip_prefix(torch_files.read_safetensors(path))
    cfg = _hf_config(path)
    hp = {"num_heads": cfg.get("n_heads"), "time_conditioning": cfg.get("time_conditioning"),
          "ell": cfg.get("target_length")}
    fmt = "safetensors"
  elif ext in ("ckpt", "pt", "pth", "bin"):
    obj = torch_files.read_torch_checkpoint(path)
    if not isinstance(obj, dict):
      raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict or a "
                            "Lightning checkpoint.")
    raw = obj.get("state_dict", obj)
    if not isinstance(raw, dict) or not all(isinstance(v, np.ndarray) for v in raw.values()):
      raise ConversionError(f"{path} has no state dict of tensors (a Lightning checkpoint keeps "
                            "one under 'state_dict').")
    state = pub.strip_prefix(raw)
    ema_entry = obj.get("ema")
    shadow = ema_entry.get("shadow_params") if isinstance(ema_entry, dict) else None
    if shadow:
      ema = pub.ema_state(state, shadow, source)
    cfg = torch_files.plain((obj.get("hyper_parameters") or {}).get("config") or {})
    if isinstance(cfg, dict):
      model, prime = cfg.get("model") or {}, cfg.get("prime") or {}
      hp = {"num_heads": model.get("n_heads"), "time_conditioning": cfg.get("time_conditioning"),
            "ell": prime.get("target_length"), "parameterization": cfg.get("parameterization"),
            "backbone": cfg.get("backbone"), "base": prime.get("base"),
            "seq_len": model.get("length"), "dropout": model.get("dropout"),
            "global_step": obj.get("global_step")}
    fmt = "lightning" if "state_dict" in obj else "torch state dict"
  else:
    raise ConversionError(f"--checkpoint={path}: unknown format {('.' + ext) if ext else ''!r}; "
                          "give a .safetensors file (Hugging Face) or a .ckpt file (Lightning).")
  return {"state": state, "ema": ema, "hparams": {k: v for k, v in hp.items() if v is not None},
          "format": fmt}


def check_hparams(hp: Mapping[str, Any], arch: pub.Architecture, source: str) -> None:
  """The file's recorded settings must describe the network this map reproduces."""
  if hp.get("time_conditioning"):
    raise ConversionError(
        "The checkpoint was trained with time_conditioning=True (the network reads the noise "
        "level sigma(t)); the released MDLM and MDM-Prime models are time-agnostic, and only "
        "those are converted.")
  if hp.get("backbone") not in (None, "dit"):
    raise ConversionError(f"The checkpoint's backbone is {hp['backbone']!r}; only 'dit' converts.")
  if hp.get("parameterization") not in (None, "subs"):
    raise ConversionError(f"The checkpoint's parameterization is {hp['parameterization']!r} "
                          "(SEDD/D3PM): only the masked-diffusion 'subs' models convert.")
  if hp.get("ell") is not None and int(hp["ell"]) != arch.ell:
    raise ConversionError(f"The checkpoint's config says target_length (ell) = {hp['ell']}, its "
                          f"tensors have ell = {arch.ell}: the file is inconsistent.")
  if arch.ell > 1 and hp.get("base") not in (None, arch.base) and int(hp["base"]) != arch.base:
    raise ConversionError(f"The checkpoint's config has base {hp['base']}, its sub-token table "
                          f"{arch.embed_rows} rows (base {arch.base}).")
  del source


# ------------------------------------------------------------------ config
def converted_config(base_config, arch: pub.Architecture, hp: Mapping[str, Any]):
  """``base_config`` (a ConfigDict) with the network, codec and schedule of ``arch``."""
  c = from_dict(to_dict(base_config))
  c.objective = "diffusion"
  for k, v in arch.model_config().items():
    c.model[k] = v
  if hp.get("dropout") is not None:
    c.model.dropout = float(hp["dropout"])
  c.prime.ell = arch.ell
  c.prime.permute = False
  c.prime.carry_over = True
  c.prime.loss = "marginal"
  c.prime.chunk_point = 1.0
  c.data.token_order = "id"
  c.schedule.name = "loglinear"      # both papers: alpha(t) = 1 - (1 - eps) t, eps = 1e-3 (here
                                     # (1 - t)(1 + eps t), which also reaches alpha(1) = 0)
  c.schedule.eps = 1e-3
  return c


def default_base_config(arch: pub.Architecture):
  """OpenWebText with DiT-small and GPT-2 tokens: ``owt_mdm`` (ell = 1) or ``owt_prime``."""
  return load_config("owt_mdm" if arch.ell == 1 else f"owt_prime:ell={arch.ell}")


def exported_config(checkpoint: str):
  """The run config that ``--to=hf`` wrote beside a weight file (``mdm_jax_config.json``),
  as the base config of its conversion; None where there is none."""
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), hub.EXPORT_CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return from_dict(json.load(f))
  except ValueError as e:
    raise ConversionError(f"{path} is not valid JSON ({e}).") from e


def tokenizer_vocab(config) -> Tuple[int, str]:
  """(vocab size, how it was found) of ``config.data``'s tokenizer."""
  from mdm_jax.data import build_data  # pylint: disable=import-outside-toplevel
  try:
    return int(build_data(config.data, None).tokenizer.vocab_size), "the data's tokenizer"
  except FileNotFoundError as e:
    if str(config.data.tokenizer) == "gpt2":
      return GPT2_VOCAB, ("GPT-2's vocabulary (the data is not prepared yet: "
                          f"{str(e).splitlines()[0][:160]})")
    raise ConversionError(f"The vocabulary of config.data cannot be checked because the data "
                          f"is not available ({str(e).splitlines()[0]}). Prepare the data first "
                          "or point --config.data.path at it.") from e


# ------------------------------------------------------------------ writing
def _check_tree(params: Mapping[str, Any], abstract_params: Any) -> None:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  want = pub.tree_paths(nn.unbox(abstract_params))
  got = pub.tree_paths(params)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:6]
    raise ConversionError(f"The converted parameters do not fit the configured network "
                          f"(first differences: {diff}).")


def _claim(workdir: str, overwrite: bool, flag: str = "--workdir") -> str:
  if paths.is_remote(workdir):
    raise ConversionError("--workdir must be a local directory for conversion; copy the "
                          "converted workdir to the bucket afterwards (gsutil -m cp -r).")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    if not overwrite:
      raise ConversionError(f"{flag}={workdir} exists and is not empty; choose a new "
                            "directory (or pass --overwrite to replace it).")
  os.makedirs(os.path.dirname(workdir) or ".", exist_ok=True)
  tmp = f"{workdir}.converting-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  return tmp


def convert_checkpoint(source: str, checkpoint: str, workdir: str, *, base_config=None,
                       num_heads: Optional[int] = None, overwrite: bool = False,
                       progress: Callable[[str], None] = lambda msg: None) -> Dict[str, Any]:
  """Converts a published checkpoint into an mdm_jax workdir; returns a summary.

  Raises:
    WeightFileError: the file is missing, truncated or not a weight file.
    ConversionError: the weights are not the authors' DiT, or do not match the config
      (vocabulary, ell).
    mdm_jax.core.errors.ConfigError: the resulting config is invalid.
  """
  hub_info = None
  if hub.is_hub_name(checkpoint):
    progress(f"fetching {checkpoint} (Hugging Face cache: "
             f"{hub.hub_settings()['cache_dir'] or 'default'}"
             f"{', offline' if hub.hub_settings()['offline'] else ''})")
    hub_info = hub.resolve_checkpoint(checkpoint)
    checkpoint = hub_info["file"]
  if base_config is None:
    base_config = exported_config(checkpoint)
  progress(f"reading {checkpoint}")
  read = read_published(source, checkpoint)
  hp = read["hparams"]
  heads = hp.get("num_heads")
  if num_heads is not None and heads is not None and int(num_heads) != int(heads):
    raise ConversionError(f"--num_heads={num_heads} but the checkpoint's config says "
                          f"n_heads={heads}.")
  arch = pub.infer_architecture(read["state"], num_heads=num_heads or heads, source=source)
  check_hparams(hp, arch, source)
  base = base_config if base_config is not None else default_base_config(arch)
  config = converted_config(base, arch, hp)
  vocab, how = tokenizer_vocab(config)
  if vocab != arch.vocab_size:
    raise ConversionError(
        f"The checkpoint predicts {arch.vocab_size:,} tokens but config.data's tokenizer "
        f"({config.data.tokenizer}; {how}) has {vocab:,}: use the config of the data the "
        "model was trained on (both papers: GPT-2 tokens, --config=owt_mdm / owt_prime).")
  params = pub.from_torch_state(read["state"], arch, bool(config.model.scan_layers))
  ema = (pub.from_torch_state(read["ema"], arch, bool(config.model.scan_layers))
         if read["ema"] is not None else params)
  progress(f"{source} DiT: {arch.num_layers} layers x {arch.d_model}, {arch.num_heads} heads, "
           f"ell = {arch.ell}, V = {arch.vocab_size:,}; EMA: "
           f"{'yes' if read['ema'] is not None else 'no (the file has one set of weights)'}")

  tmp = _claim(workdir, overwrite)
  try:
    # The task, mesh and optimizer of the run (built from the vocabulary alone, so the
    # data need not be prepared before converting).
    task = build_task(config, vocab)
    mesh, rules = shd.make_mesh(config.mesh), shd.logical_rules(config.mesh)
    tx, _ = make_optimizer(config.training)
    abstract, shardings = state_shardings(task, tx, mesh, rules)
    _check_tree(params, abstract.params)
    to_dev = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    p, e = to_dev(params), to_dev(ema)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                       ema_params=e,
                       key=jax.random.key_data(jax.random.key(int(config.seed))))
    state = jax.device_put(state, shardings)
    cfg_dict = to_dict(config)
    ck = ckpt_lib.Checkpointer(os.path.join(tmp, CHECKPOINT_DIR), async_save=False,
                               check_free_space=bool(config.checkpoint.check_free_space))
    try:
      ck.save(0, state, config_dict=cfg_dict, force=True)
      ck.wait()
    finally:
      ck.close()
    config_json = config.to_json_best_effort(indent=2)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      f.write(config_json)
    final = os.path.abspath(os.path.expanduser(workdir))
    with open(os.path.join(tmp, "config.py"), "w", encoding="utf-8") as f:
      f.write(_CONFIG_PY.format(source=source, path=os.path.join(final, "config.py"),
                                config_json=config.to_json_best_effort()))
    provenance = {
        "source": source, "format": read["format"], "checkpoint": os.path.abspath(checkpoint),
        "bytes": os.path.getsize(checkpoint), "sha256": _sha256(checkpoint),
        "ema": read["ema"] is not None, "architecture": vars(arch) | {"base": arch.base},
        "hparams": {k: v for k, v in hp.items() if isinstance(v, (int, float, str, bool))},
        "vocab_checked_against": how,
    }
    if hub_info is not None:
      provenance["hub"] = {k: hub_info[k] for k in ("name", "repo", "revision", "commit", "path")}
    with open(os.path.join(tmp, PROVENANCE_FILE), "w", encoding="utf-8") as f:
      json.dump(provenance, f, indent=2)
    paths.publish_directory(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  return {"workdir": final, "config": os.path.join(final, "config.py"), "source": source,
          **({"hub": provenance["hub"]} if hub_info is not None else {}),
          "format": read["format"], "ema": read["ema"] is not None, "parameters": n,
          "architecture": provenance["architecture"],
          "eval_with": f"python -m mdm_jax.main --mode=eval --config={final}/config.py "
                       f"--workdir={final}"}


def export_checkpoint(config, workdir: str, output: str, *, use_ema: bool = True,
                      progress: Callable[[str], None] = lambda msg: None) -> Dict[str, Any]:
  """Writes the workdir's latest ``dit`` weights in the authors' layout (safetensors)."""
  return _export(config, workdir, output, use_ema, progress)[0]


def _export(config, workdir: str, output: str, use_ema: bool,
            progress: Callable[[str], None]) -> Tuple[Dict[str, Any], Any]:
  """``export_checkpoint``'s work; returns (its summary, the run's tokenizer)."""
  blockers = pub.export_blockers(to_dict(config)["model"])
  if config.objective != "diffusion":
    blockers.append(f"objective={config.objective!r} (only masked diffusion exports)")
  if bool(config.prime.permute):
    blockers.append("prime.permute=True (the authors' codec has no permutation)")
  if str(config.data.token_order) != "id":
    blockers.append(f"data.token_order={config.data.token_order!r} (the authors' models "
                    "number tokens by the tokenizer's ids)")
  if int(config.model.d_model) % int(config.prime.ell):
    blockers.append(f"model.d_model={config.model.d_model} not divisible by prime.ell")
  if blockers:
    raise ConversionError("This model cannot be written in the authors' layout: "
                          + "; ".join(blockers) + ".")
  if not output.endswith(".safetensors"):
    raise ConversionError(f"--output={output} must end in .safetensors.")
  task, state, _, _, data, _ = restore_for_inference(config, workdir)
  # Collective: in a multi-process run every process gathers; process 0 writes below.
  params = distributed.host_arrays(state.ema_params if use_ema else state.params)
  codec = task.codec
  arch = pub.Architecture(
      num_layers=int(config.model.num_layers), d_model=int(config.model.d_model),
      num_heads=int(config.model.num_heads), cond_dim=int(config.model.cond_dim),
      mlp_ratio=int(config.model.mlp_ratio), ell=int(codec.ell), vocab_size=int(codec.vocab_size),
      embed_rows=int(codec.base) + 1)
  tensors = pub.to_torch_state(params, arch)
  writer = jax.process_index() == 0
  if writer:
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
    torch_files.write_safetensors(tmp, tensors, metadata={"format": "pt"})
    os.replace(tmp, output)
  hf = {"model_type": "mdlm" if arch.ell == 1 else "mdm_prime", "hidden_dim": arch.d_model,
        "cond_dim": arch.cond_dim, "n_blocks": arch.num_layers, "n_heads": arch.num_heads,
        "vocab_size": arch.vocab_size + (1 if arch.ell == 1 else 0),
        "model_length": int(config.data.seq_len), "time_conditioning": False,
        "target_length": arch.ell, "base": arch.base}
  cfg_path = output[: -len(".safetensors")] + "_config.json"
  if writer:
    paths.atomic_write(cfg_path, json.dumps(hf, indent=2))
  warnings = pub.export_changes_function(to_dict(config)["model"])
  for w in warnings:
    progress(f"warning: {w}: the authors' network will compute a slightly different function")
  return {"output": os.path.abspath(output), "config": os.path.abspath(cfg_path),
          "tensors": len(tensors), "weights": "ema" if use_ema else "raw",
          "differences": warnings, "step": int(state.step), "hf_config": hf}, data.tokenizer


def export_hub_folder(config, workdir: str, output_dir: str, *, use_ema: bool = True,
                      repo_id: str = "", overwrite: bool = False,
                      progress: Callable[[str], None] = lambda msg: None) -> Dict[str, Any]:
  """Writes a folder ready to upload to the Hugging Face Hub (``--to=hf``)::

    OUT/model.safetensors        the weights in the authors' layout (``export_checkpoint``)
    OUT/config.json              their sizes (Hugging Face style, as the released models have)
    OUT/mdm_jax_config.json      this run's full config (conversion reads it back)
    OUT/mdm_jax_tokenizer.json   the run's tokenizer (``tokenizers.load_tokenizer``)
    OUT/README.md                the model card: the model, the last bound the workdir
                                 recorded, how to load it, the config

  The folder is assembled beside ``output_dir`` and renamed into place when complete.
  Upload it with ``huggingface-cli upload ORG/NAME OUT``; ``--from=... --checkpoint=
  hf://ORG/NAME`` converts it back.
  """
  final = os.path.abspath(os.path.expanduser(output_dir))
  if paths.is_remote(output_dir):
    raise ConversionError("--output for --to=hf must be a local folder (upload it with "
                          "huggingface-cli upload afterwards).")
  tmp = _claim(final, overwrite, "--output")
  evaluation = None
  try:
    summary, tokenizer = _export(config, workdir, os.path.join(tmp, "model.safetensors"),
                                 use_ema, progress)
    if jax.process_index() == 0:
      os.replace(summary["config"], os.path.join(tmp, "config.json"))
      with open(os.path.join(tmp, hub.EXPORT_CONFIG), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
      tokenizer.save(os.path.join(tmp, hub.EXPORT_TOKENIZER))
      evaluation = hub.last_eval(workdir, summary["step"])
      ell = int(summary["hf_config"]["target_length"])
      files = {"model.safetensors": f"the {summary['weights']} weights, `backbone.`-prefixed "
                                    "state dict of the authors' network",
               "config.json": "the network's sizes",
               hub.EXPORT_CONFIG: "the mdm_jax config of the run",
               hub.EXPORT_TOKENIZER: f"the run's {tokenizer.name} tokenizer, read by "
                                     "`mdm_jax.data.tokenizers.load_tokenizer`",
               "README.md": "this card"}
      hub.write_model_card(os.path.join(tmp, "README.md"), config=config,
                           repo_hint=repo_id or f"ORG/{os.path.basename(final)}",
                           source="mdlm" if ell == 1 else "mdm-prime", step=summary["step"],
                           weights=summary["weights"], evaluation=evaluation,
                           hf_config=summary["hf_config"], files=files,
                           differences=summary["differences"])
      paths.publish_directory(tmp, final)
    else:
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"output": final, "files": sorted(os.listdir(final)) if os.path.isdir(final) else [],
          "step": summary["step"], "weights": summary["weights"], "bound": evaluation,
          "differences": summary["differences"],
          "upload_with": f"huggingface-cli upload {repo_id or 'ORG/NAME'} {final}"}


__all__ = ["ConversionError", "WeightFileError", "convert_checkpoint", "export_checkpoint",
           "export_hub_folder", "read_published", "converted_config"]
