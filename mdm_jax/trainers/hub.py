"""Published checkpoints by Hugging Face Hub name, and folders ready to upload to the Hub.

``resolve_checkpoint("hf://ORG/NAME[@REVISION][/PATH]")`` fetches a model repository (or
one file of it) through ``huggingface_hub`` and returns the local file to convert.  The
Hub's own settings apply, read from the environment when the command runs:

* the cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``;
  a file already cached is not downloaded again;
* offline mode: with ``HF_HUB_OFFLINE=1`` nothing is fetched and only the cache is read;
* the token for private or gated repositories: ``HF_TOKEN`` (or ``huggingface-cli login``).

``REVISION`` is a branch, a tag or a commit hash (default ``main``).  Without ``PATH`` the
repository must hold one ``.safetensors`` file (as ``kuleshov-group/mdlm-owt`` and the
folders ``--to=hf`` writes do); Lightning ``.ckpt`` repositories hold many, so name one.

``write_model_card`` writes the ``README.md`` of such a folder (``--to=hf``): the model,
the last evaluated bound found in the workdir, and how to load it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional

from mdm_jax.core import paths
from mdm_jax.networks.published import ConversionError

SCHEME = "hf://"
# The Hub's truth values for HF_HUB_OFFLINE.
_TRUE = {"1", "ON", "YES", "TRUE"}
# What a repository without a PATH is fetched for: the weights and the small files beside them.
_REPO_FILES = ["*.safetensors", "*.json", "*.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
EXPORT_CONFIG = "mdm_jax_config.json"          # the full mdm_jax config of an exported run
EXPORT_TOKENIZER = "mdm_jax_tokenizer.json"    # its tokenizer (``tokenizers.load_tokenizer``)


@dataclasses.dataclass(frozen=True)
class HubName:
  """``hf://ORG/NAME@REVISION/PATH`` split up (``revision`` None = the default branch)."""
  repo_id: str
  revision: Optional[str]
  path: str

  def __str__(self) -> str:
    rev = f"@{self.revision}" if self.revision else ""
    return f"{SCHEME}{self.repo_id}{rev}{'/' + self.path if self.path else ''}"


def is_hub_name(checkpoint: str) -> bool:
  return str(checkpoint).startswith(SCHEME)


def parse_hub_name(checkpoint: str) -> HubName:
  """``hf://ORG/NAME``, ``hf://ORG/NAME@REV``, ``hf://ORG/NAME@REV/dir/file.ckpt``.

  Raises:
    ConversionError: not of that form.
  """
  rest = str(checkpoint)[len(SCHEME):] if is_hub_name(checkpoint) else ""
  parts = rest.split("/")
  if len(parts) < 2 or not parts[0] or not parts[1]:
    raise ConversionError(f"--checkpoint={checkpoint}: a Hub name is hf://ORG/NAME, optionally "
                          "with @REVISION and /PATH/IN/REPO (e.g. hf://kuleshov-group/mdlm-owt).")
  name, _, revision = parts[1].partition("@")
  repo_id = f"{parts[0]}/{name}"
  path = "/".join(parts[2:]).strip("/")
  if not _REPO_ID.match(repo_id) or (revision == "" and "@" in parts[1]):
    raise ConversionError(f"--checkpoint={checkpoint}: {repo_id!r} is not a Hub repository id "
                          "(ORG/NAME), or the @REVISION after it is empty.")
  return HubName(repo_id, revision or None, path)


def hub_settings(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
  """The cache folder, offline mode and token the Hub reads from the environment, now."""
  env = os.environ if environ is None else environ
  cache = env.get("HF_HUB_CACHE") or (os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME")
                                      else None)
  offline = any(str(env.get(k, "")).upper() in _TRUE
                for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
  return {"cache_dir": os.path.expanduser(cache) if cache else None, "offline": offline,
          "token": env.get("HF_TOKEN") or None}


def _describe_failure(name: HubName, settings: Mapping[str, Any], e: BaseException) -> str:
  where = settings["cache_dir"] or "the default Hugging Face cache (~/.cache/huggingface/hub)"
  kind = type(e).__name__
  rev = name.revision or "main"
  if settings["offline"]:
    return (f"{name} (revision {rev!r}) is not in the Hugging Face cache at {where}, and "
            "HF_HUB_OFFLINE=1 forbids downloading it: fetch it once where there is internet "
            f"(unset HF_HUB_OFFLINE, or `huggingface-cli download {name.repo_id}`), or point "
            f"HF_HUB_CACHE / HF_HOME at the cache that holds it ({kind}).")
  if kind in ("RepositoryNotFoundError", "GatedRepoError"):
    return (f"{name}: the Hub has no repository {name.repo_id!r} that this token may read "
            f"(a private or gated one needs HF_TOKEN) ({kind}).")
  if kind in ("RevisionNotFoundError",):
    return f"{name}: the repository has no revision {rev!r} ({kind})."
  if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
    return f"{name}: the repository has no file {name.path!r} at revision {rev!r} ({kind})."
  return (f"Could not fetch {name} from the Hugging Face Hub, and it is not in the cache at "
          f"{where} ({kind}: {' '.join(str(e).split())[:300]}).")


def resolve_checkpoint(checkpoint: str,
                       environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
  """Fetches ``hf://...`` (or finds it in the cache); returns {"file", "repo", "revision",
  "commit", "path"}: the local weight file and where it came from.

  Raises:
    ConversionError: a bad name, huggingface_hub missing, or the repository, revision or
      file not found (offline: not in the cache).
  """
  name = parse_hub_name(checkpoint)
  settings = hub_settings(environ)
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(f"--checkpoint={checkpoint} needs the huggingface_hub package: pip "
                          f"install huggingface_hub ({e}).") from e
  kw = dict(repo_id=name.repo_id, revision=name.revision, cache_dir=settings["cache_dir"],
            local_files_only=settings["offline"], token=settings["token"])
  try:
    if name.path:
      file = huggingface_hub.hf_hub_download(filename=name.path, **kw)
      if name.path.endswith(".safetensors"):     # the small files beside it, where there are any
        folder, stem = os.path.dirname(name.path), os.path.basename(name.path).rsplit(".", 1)[0]
        for extra in ("config.json", f"{stem}_config.json", EXPORT_CONFIG):
          try:
            huggingface_hub.hf_hub_download(filename=f"{folder}/{extra}".lstrip("/"), **kw)
          except Exception:  # pylint: disable=broad-except  (an optional file)
            pass
    else:
      folder = huggingface_hub.snapshot_download(allow_patterns=_REPO_FILES, **kw)
      file = _single_weight_file(folder, name)
  except ConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the Hub's many error types)
    raise ConversionError(_describe_failure(name, settings, e)) from e
  commit = _commit_of(file)
  return {"file": file, "name": str(name), "repo": name.repo_id,
          "revision": name.revision or "main", "commit": commit,
          "path": name.path or os.path.basename(file)}


def _commit_of(file: str) -> Optional[str]:
  """The commit hash of a file in the Hub cache (``.../snapshots/<commit>/...``)."""
  parts = os.path.abspath(file).split(os.sep)
  if "snapshots" not in parts[:-1]:
    return None
  return parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1]


def _single_weight_file(folder: str, name: HubName) -> str:
  found = sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True))
  if len(found) == 1:
    return found[0]
  if not found:
    raise ConversionError(f"{name} holds no .safetensors file: name the checkpoint inside it, "
                          f"e.g. {SCHEME}{name.repo_id}/path/to/last.ckpt (a Lightning repository "
                          "holds several).")
  top = [f for f in found if os.path.relpath(f, folder) == "model.safetensors"]
  if top:
    return top[0]
  rel = ", ".join(os.path.relpath(f, folder) for f in found[:4])
  raise ConversionError(f"{name} holds {len(found)} .safetensors files ({rel}): name one, "
                        f"e.g. {SCHEME}{name.repo_id}/{os.path.relpath(found[0], folder)}.")


# ------------------------------------------------------------------ the model card
def last_eval(workdir: str, step: int) -> Optional[Dict[str, Any]]:
  """The latest evaluation at or before ``step`` that the workdir recorded, or None.

  Read from ``eval_step_N.json`` (``--mode=eval``) and the ``eval/*`` lines of
  ``metrics.jsonl`` (training); {"step", "nll", "ppl_bound", "bound", "source"}.
  """
  found: List[Dict[str, Any]] = []
  for path in paths.glob(workdir, "eval_step_*.json"):
    try:
      rec = json.loads(paths.read_text(path))
      found.append({"step": int(rec["step"]), "nll": float(rec["nll"]),
                    "ppl_bound": rec.get("ppl_bound"), "bound": rec.get("bound"),
                    "source": os.path.basename(path), "rank": 1})
    except (OSError, ValueError, KeyError, TypeError):
      continue
  metrics = paths.join(workdir, "metrics.jsonl")
  if paths.exists(metrics):
    for line in paths.read_text(metrics).splitlines():
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if "eval/nll" in rec and not rec.get("superseded"):
        found.append({"step": int(rec["step"]), "nll": float(rec["eval/nll"]),
                      "ppl_bound": rec.get("eval/ppl_bound"), "bound": None,
                      "source": "metrics.jsonl", "rank": 0})
  found = [f for f in found if f["step"] <= int(step)]
  if not found:
    return None
  best = max(found, key=lambda f: (f["step"], f["rank"]))
  best.pop("rank")
  return best


def write_model_card(path: str, *, config, repo_hint: str, source: str, step: int,
                     weights: str, evaluation: Optional[Mapping[str, Any]],
                     hf_config: Mapping[str, Any], files: Mapping[str, str],
                     differences: List[str]) -> str:
  """Writes the folder's ``README.md``: front matter, the model, its bound, how to load it."""
  m, d = config.model, config.data
  ell = int(hf_config.get("target_length", 1))
  vocab = int(hf_config["vocab_size"]) - (1 if ell == 1 else 0)   # MDLM's head has a [MASK] row
  if evaluation is None:
    bound = ("No evaluation is recorded in the workdir (run `--mode=eval` before exporting to "
             "report the bound here).")
  else:
    ppl = evaluation.get("ppl_bound")
    ppl_text = f", perplexity ≤ {float(ppl):.3f}" if ppl is not None else ""
    kind = evaluation.get("bound") or ("valid bound" if str(config.objective) == "diffusion"
                                       else "exact NLL")
    bound = (f"{float(evaluation['nll']):.4f} nats per token{ppl_text}: {kind}, on the "
             f"`{d.dataset}` eval split at step {evaluation['step']}"
             + ("" if int(evaluation["step"]) == int(step) else
                f" (the exported weights are step {step})")
             + f"; from the workdir's `{evaluation['source']}`, with "
             f"eval.num_time_samples = {config.eval.num_time_samples}, "
             f"{config.eval.num_batches} batch(es) of {config.eval.batch_size} sequences.")
  rows = "\n".join(f"| `{k}` | {v} |" for k, v in files.items())
  diff = "".join(f"\n- {w}: the authors' network computes a slightly different function."
                 for w in differences)
  card = f"""---
library_name: mdm_jax
tags:
- masked-diffusion
- {"mdm-prime" if ell > 1 else "mdlm"}
- jax
---

# {repo_hint}

A masked diffusion language model (mdm_jax's `dit` network), exported with
`python -m mdm_jax.convert --to=hf` in the layout of the {source} authors' code.

## Model

| | |
|---|---|
| network | DiT, {m.num_layers} blocks, width {m.d_model}, {m.num_heads} heads |
| sub-tokens ℓ | {ell}{f" (base {hf_config.get('base')})" if ell > 1 else ""} |
| vocabulary | {vocab} tokens ({d.tokenizer} tokenizer) |
| sequence length | {d.seq_len} |
| schedule | {config.schedule.name} |
| training steps | {step} ({weights} weights) |

## Bound

{bound}

## Files

| file | what |
|---|---|
{rows}

## How to load it

With mdm_jax (no PyTorch needed), from the Hub (or from a copy of this folder, with
`--checkpoint=FOLDER/model.safetensors`):

```bash
python -m mdm_jax.convert --from={source} --checkpoint=hf://{repo_hint} --workdir=runs/model
python -m mdm_jax.main --mode=eval --config=runs/model/config.py --workdir=runs/model
```

`{EXPORT_CONFIG}` beside the weights gives the converted workdir this run's data and
training settings (an explicit `--config` replaces them).  The authors' PyTorch `DIT`
(ℓ = 1) or `PerceiverDIT` (ℓ > 1) loads `model.safetensors` with
`model.load_state_dict({{k.removeprefix("backbone."): v for k, v in state.items()}})`,
built with the sizes in `config.json`.{diff}

## Config

<details><summary>the full mdm_jax config</summary>

```json
{config.to_json_best_effort(indent=2)}
```

</details>
"""
  paths.atomic_write(path, card)
  return path


__all__ = ["HubName", "is_hub_name", "parse_hub_name", "hub_settings", "resolve_checkpoint",
           "last_eval", "write_model_card", "EXPORT_CONFIG", "EXPORT_TOKENIZER"]
