"""Published checkpoints by Hub name (``--checkpoint=hf://...``) and ``--to=hf`` folders, offline.

A tiny MDLM fixture (tests/fixtures/published, made once with the authors' code) is converted,
evaluated and exported with ``export_hub_folder``; the exported folder is laid out as the
Hugging Face cache lays out a downloaded repository (``models--ORG--NAME/{blobs,refs,snapshots}``)
and converted back through ``hf://ORG/NAME`` and ``hf://ORG/NAME@COMMIT`` with
``HF_HUB_OFFLINE=1``, which gives back the same weights.
"""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from mdm_jax.core.config import load_config
from mdm_jax.networks.published import ConversionError
from mdm_jax.trainers import hub, published

pytest.importorskip("huggingface_hub")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "published")
REPO = "testorg/tiny-mdlm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _byte_config():
  c = load_config("shakespeare_mdm:tiny")
  c.data.tokenizer = "byte"
  c.eval.batch_size = 8
  c.eval.num_batches = 1
  c.eval.num_time_samples = 1
  return c


def hub_cache_layout(cache: str, repo_id: str, folder: str, commit: str) -> str:
  """Files of ``folder`` as the Hub cache holds repo ``repo_id`` at ``commit`` (branch main)."""
  root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  snap = os.path.join(root, "snapshots", commit)
  os.makedirs(os.path.join(root, "blobs"))
  os.makedirs(os.path.join(root, "refs"))
  os.makedirs(snap)
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), "rb").read()
    blob = hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, "blobs", blob), "wb") as f:
      f.write(data)
    os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
  with open(os.path.join(root, "refs", "main"), "w") as f:
    f.write(commit)
  return snap


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, config, export folder, its summary, the eval record) of the converted fixture."""
  from mdm_jax.trainers import inference  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("hub")
  wd = str(tmp / "wd")
  config = _byte_config()
  published.convert_checkpoint("mdlm", os.path.join(FIX, "mdlm_tiny.safetensors"), wd,
                               base_config=config)
  config = load_config(os.path.join(wd, "config.py"))
  ev = inference.evaluate_checkpoint(config, wd)           # writes eval_step_0.json
  out = str(tmp / "export")
  summary = published.export_hub_folder(config, wd, out, repo_id=REPO)
  return wd, config, out, summary, ev


def test_hf_export_folder_is_ready_to_upload(exported):
  wd, config, out, summary, ev = exported
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "mdm_jax_config.json",
                                     "mdm_jax_tokenizer.json", "model.safetensors"]
  hf = json.load(open(os.path.join(out, "config.json")))
  assert hf["n_heads"] == 2 and hf["n_blocks"] == 2 and hf["target_length"] == 1
  from mdm_jax.data.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer(os.path.join(out, "mdm_jax_tokenizer.json"))
  assert tok.name == "byte" and tok.vocab_size == 256
  card = open(os.path.join(out, "README.md")).read()
  assert card.startswith("---\nlibrary_name: mdm_jax\n")
  # The bound is the one the workdir recorded, with where it came from.
  assert summary["bound"]["source"] == "eval_step_0.json" and summary["bound"]["step"] == 0
  assert f"{ev['nll']:.4f} nats per token" in card and "eval_step_0.json" in card
  assert f"--checkpoint=hf://{REPO}" in card and "--from=mdlm" in card
  assert '"d_model": 16' in card                           # the config, in full
  assert not [p for p in os.listdir(os.path.dirname(out)) if ".converting-" in p]


def test_last_eval_reads_eval_files_and_training_metrics(tmp_path):
  wd = str(tmp_path)
  assert hub.last_eval(wd, 100) is None
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    for step, nll, sup in ((50, 3.0, False), (100, 2.5, False), (150, 2.0, True)):
      f.write(json.dumps({"step": step, "eval/nll": nll, "eval/ppl_bound": np.exp(nll),
                          **({"superseded": True} if sup else {})}) + "\n")
    f.write(json.dumps({"step": 100, "train/loss": 9.0}) + "\n")
  got = hub.last_eval(wd, 200)
  assert (got["step"], got["nll"], got["source"]) == (100, 2.5, "metrics.jsonl")
  assert hub.last_eval(wd, 60)["nll"] == 3.0                # none after the exported step
  with open(os.path.join(wd, "eval_step_100.json"), "w") as f:
    json.dump({"step": 100, "nll": 2.4, "ppl_bound": 11.0, "bound": "valid ELBO"}, f)
  assert hub.last_eval(wd, 200)["source"] == "eval_step_100.json"   # --mode=eval wins a tie


def test_hub_names_parse():
  n = hub.parse_hub_name("hf://kuleshov-group/mdlm-owt")
  assert (n.repo_id, n.revision, n.path) == ("kuleshov-group/mdlm-owt", None, "")
  n = hub.parse_hub_name("hf://chen-hao-chao/mdm-prime@v1/text/owt/last.ckpt")
  assert (n.repo_id, n.revision, n.path) == ("chen-hao-chao/mdm-prime", "v1", "text/owt/last.ckpt")
  assert str(n) == "hf://chen-hao-chao/mdm-prime@v1/text/owt/last.ckpt"
  for bad in ("hf://mdlm-owt", "hf://a/b@", "hf://a b/c"):
    with pytest.raises(ConversionError, match="Hub"):
      hub.parse_hub_name(bad)
  s = hub.hub_settings({"HF_HOME": "/x", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "t"})
  assert s == {"cache_dir": "/x/hub", "offline": True, "token": "t"}
  assert hub.hub_settings({"HF_HOME": "/x", "HF_HUB_CACHE": "/c"})["cache_dir"] == "/c"
  assert not hub.hub_settings({"HF_HUB_OFFLINE": "0"})["offline"]


def _params(config, wd):
  from mdm_jax.trainers import setup  # pylint: disable=import-outside-toplevel
  _, state, *_ = setup.restore_for_inference(config, wd)
  return jax.tree.map(np.asarray, state.params)


def test_hf_names_convert_offline_from_the_cache(exported, tmp_path, monkeypatch):
  wd, config, out, _, _ = exported
  home = str(tmp_path / "hf_home")
  hub_cache_layout(os.path.join(home, "hub"), REPO, out, COMMIT)
  monkeypatch.setenv("HF_HOME", home)
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  want = _params(config, wd)
  for name in (f"hf://{REPO}", f"hf://{REPO}@{COMMIT}/model.safetensors"):
    back = str(tmp_path / f"back_{len(name)}")
    # No --config: the exported run config (byte tokens, V = 256) is the base.
    summary = published.convert_checkpoint("mdlm", name, back)
    assert summary["hub"]["commit"] == COMMIT and summary["hub"]["repo"] == REPO
    prov = json.load(open(os.path.join(back, published.PROVENANCE_FILE)))
    assert prov["hub"]["name"] == name and prov["checkpoint"].startswith(home)
    again = load_config(os.path.join(back, "config.py"))
    assert again.data.tokenizer == "byte"
    jax.tree.map(np.testing.assert_array_equal, _params(again, back), want)


def test_missing_repo_or_revision_offline_is_one_clear_error(tmp_path, monkeypatch):
  home = str(tmp_path / "hf_home")
  os.makedirs(os.path.join(home, "hub"))
  monkeypatch.setenv("HF_HOME", home)
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  for name in ("hf://testorg/no-such-model", f"hf://{REPO}@v9"):
    with pytest.raises(ConversionError,
                       match="not in the Hugging Face cache at .*HF_HUB_OFFLINE=1"):
      published.convert_checkpoint("mdlm", name, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")
