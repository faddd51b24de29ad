"""Published MDLM / MDM-Prime checkpoints: the converted network computes the authors' function.

The fixtures in tests/fixtures/published/ were written by ``make_reference.py`` there, with
the authors' own model classes (MDLM's ``DIT``, MDM-Prime's ``PerceiverDIT`` and carry-over
filter) at small random weights, in both published formats, together with those networks'
outputs on fixed inputs.  These tests convert the files with mdm_jax and compare.  Where
PyTorch and checkouts of the two repositories are available, ``test_live_against_authors_code``
regenerates the references first (set MDM_JAX_TORCH_PYTHON and MDM_JAX_AUTHORS_REPOS, see
that test).
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.core import torch_files
from mdm_jax.core.config import load_config
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.networks import build_model
from mdm_jax.networks import published as pub
from mdm_jax.trainers import published

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "published")
TOL = 1e-4

CASES = [("mdlm_tiny.safetensors", "mdlm", "raw"), ("mdlm_tiny.ckpt", "mdlm", "raw"),
         ("mdlm_tiny.ckpt", "mdlm", "ema"), ("prime_tiny_l2.ckpt", "mdm-prime", "raw"),
         ("prime_tiny_l2.ckpt", "mdm-prime", "ema")]


def _byte_config(ell: int):
  c = load_config("shakespeare_mdm:tiny" if ell == 1 else "shakespeare_prime:tiny")
  c.data.tokenizer = "byte"
  return c


def forward_differences(fixture_dir: str, name: str, source: str, tag: str):
  """max |logits - authors'| and max |log p - authors'| (finite entries) for one case."""
  ref = np.load(os.path.join(fixture_dir, "reference.npz"))
  read = published.read_published(source, os.path.join(fixture_dir, name))
  arch = pub.infer_architecture(read["state"], num_heads=read["hparams"].get("num_heads", 2),
                                source=source)
  state = read["ema"] if tag == "ema" else read["state"]
  assert state is not None
  config = published.converted_config(_byte_config(arch.ell), arch, read["hparams"])
  model = build_model(config.model, vocab_size=arch.vocab_size, ell=arch.ell, base=arch.base)
  params = pub.from_torch_state(state, arch)
  key = "mdlm" if source == "mdlm" else "prime"
  x = ref["mdlm_tokens"][..., None] if key == "mdlm" else ref["prime_digits"]
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.zeros(x.shape[0])))
  d_logits = float(np.abs(logits - ref[f"{key}_{tag}_logits"]).max())
  want = ref[f"{key}_{tag}_logprobs"]
  if key == "mdlm":       # the SUBS distribution of a masked position: softmax over V tokens
    masked = ref["mdlm_tokens"] == arch.vocab_size
    got = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    d_logp = float(np.abs(got[masked] - want[masked]).max())
  else:                   # carry-over: tokens consistent with the observed digits
    codec = PrimeCodec.create(arch.vocab_size, arch.ell)
    got = np.asarray(codec.token_logprobs(jnp.asarray(logits), jnp.asarray(x)))
    finite = np.isfinite(want)
    assert np.array_equal(finite, got > -1e8), "carry-over allows other tokens than the authors'"
    d_logp = float(np.abs(got[finite] - want[finite]).max())
  return d_logits, d_logp


@pytest.mark.parametrize("name,source,tag", CASES)
def test_forward_matches_authors_network(name, source, tag):
  d_logits, d_logp = forward_differences(FIX, name, source, tag)
  assert d_logits <= TOL and d_logp <= TOL, (d_logits, d_logp)


def test_a_wrong_option_breaks_the_match():
  """The comparison can fail: the three options that make our DiT theirs each matter."""
  read = published.read_published("mdlm", os.path.join(FIX, "mdlm_tiny.ckpt"))
  arch = pub.infer_architecture(read["state"], num_heads=2, source="mdlm")
  ref = np.load(os.path.join(FIX, "reference.npz"))
  x = jnp.asarray(ref["mdlm_tokens"][..., None])
  for key, value in (("norm_eps", 1e-6), ("mlp_bias", False), ("head_bias", False)):
    config = published.converted_config(_byte_config(1), arch, read["hparams"])
    config.model[key] = value
    model = build_model(config.model, vocab_size=256, ell=1, base=256)
    params = pub.from_torch_state(read["state"], arch)
    if not value and key.endswith("bias"):
      drop = {"mlp_bias": ("mlp_in_bias", "mlp_out_bias"), "head_bias": ("head_bias",)}[key]
      params = {**params, "blocks": {k: v for k, v in params["blocks"].items() if k not in drop}}
      params = {k: v for k, v in params.items() if k not in drop}
    logits = np.asarray(model.apply({"params": params}, x, jnp.zeros(x.shape[0])))
    assert np.abs(logits - ref["mdlm_raw_logits"]).max() > TOL, key   # eps alone: ~4e-4


def test_reader_builds_no_foreign_objects():
  """The Lightning file's OmegaConf config and tokenizer object come back as records."""
  obj = torch_files.read_torch_checkpoint(os.path.join(FIX, "prime_tiny_l2.ckpt"))
  hp = torch_files.plain(obj["hyper_parameters"])
  assert hp["config"]["prime"]["target_length"] == 2 and hp["config"]["model"]["n_heads"] == 2
  assert isinstance(hp["tokenizer"], torch_files.Opaque)
  assert "GPT2TokenizerFast" in hp["tokenizer"].qualname
  assert obj["global_step"] == 2000 and len(obj["ema"]["shadow_params"]) == 30


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The Prime (ell = 2) Lightning checkpoint converted through the command line."""
  wd = str(tmp_path_factory.mktemp("conv") / "prime_l2")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "mdm_jax.convert", "--from=mdm-prime",
       f"--checkpoint={FIX}/prime_tiny_l2.ckpt", f"--workdir={wd}",
       "--config=shakespeare_prime:tiny", "--config.data.tokenizer=byte"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd, json.loads(proc.stdout)


def test_converted_workdir_evaluates_samples_and_trains(converted):
  from mdm_jax.trainers import inference, loop  # pylint: disable=import-outside-toplevel
  from mdm_jax.trainers.setup import restore_for_inference  # pylint: disable=import-outside-toplevel
  wd, summary = converted
  assert summary["ema"] and summary["architecture"]["ell"] == 2
  prov = json.load(open(os.path.join(wd, published.PROVENANCE_FILE)))
  assert prov["format"] == "lightning" and len(prov["sha256"]) == 64
  config = load_config(os.path.join(wd, "config.py"))
  assert config.model.mlp_bias and config.model.head_bias and config.model.norm_eps == 1e-5
  # The checkpoint holds the file's weights: params = raw, ema_params = the EMA copy.
  read = published.read_published("mdm-prime", os.path.join(FIX, "prime_tiny_l2.ckpt"))
  arch = pub.infer_architecture(read["state"], num_heads=2, source="mdm-prime")
  _, state, *_ = restore_for_inference(config, wd)
  for got, want in ((state.params, pub.from_torch_state(read["state"], arch)),
                    (state.ema_params, pub.from_torch_state(read["ema"], arch))):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)
  config.sampling.num_samples = 2
  config.sampling.num_steps = 4
  ev = inference.evaluate_checkpoint(config, wd)
  assert ev["step"] == 0 and np.isfinite(ev["nll"]) and ev["bound"].startswith("valid")
  out = inference.sample_checkpoint(config, wd)
  assert os.path.isfile(out["samples_txt"])
  # Continued training starts at the converted step and moves the weights.
  config.training.num_steps = 2
  config.eval.every_steps = 0
  config.sampling.every_steps = 0
  final = loop.train_and_evaluate(config, wd)
  assert final["step"] == 2


def test_export_round_trip(converted, tmp_path):
  wd, _ = converted
  config = load_config(os.path.join(wd, "config.py"))
  out = str(tmp_path / "model.safetensors")
  # The workdir was trained 2 steps by the test above only if it ran first; export step 0's
  # weights from a fresh conversion to compare against the file exactly.
  fresh = str(tmp_path / "fresh")
  published.convert_checkpoint("mdm-prime", os.path.join(FIX, "prime_tiny_l2.ckpt"), fresh,
                               base_config=config)
  published.export_checkpoint(config, fresh, out, use_ema=False)
  exported = torch_files.read_safetensors(out)
  original = torch_files.read_torch_checkpoint(os.path.join(FIX, "prime_tiny_l2.ckpt"))["state_dict"]
  assert sorted(exported) == sorted(original)       # load_state_dict(strict=True) accepts it
  for k, v in original.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  # ... and converting the export gives the same parameters again.
  again = published.read_published("mdm-prime", out)
  arch = pub.infer_architecture(again["state"], num_heads=again["hparams"].get("num_heads"),
                                source="mdm-prime")
  assert arch.num_heads == 2                        # from the config.json written beside it
  first = pub.from_torch_state(pub.strip_prefix(original), arch)
  jax.tree.map(np.testing.assert_array_equal, pub.from_torch_state(again["state"], arch), first)


# ------------------------------------------------------------------ bad input
def _convert(tmp_path, name="mdlm_tiny.ckpt", source="mdlm", path=None, **kw):
  wd = str(tmp_path / "wd")
  kw.setdefault("base_config", _byte_config(1 if source == "mdlm" else 2))
  try:
    return published.convert_checkpoint(source, path or os.path.join(FIX, name), wd, **kw)
  finally:
    assert not glob.glob(wd + ".converting-*"), "a temporary workdir was left behind"


def _assert_nothing_written(tmp_path):
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("case,match", [
    ("other_architecture", "no tensor 'vocab_embed.embedding'|no 'blocks.0"),
    ("missing_key", "no tensor 'blocks.1.mlp.2.bias'"),
    ("wrong_paper", "convert it with --from=mdm-prime"),
    ("vocabulary", "predicts 256 tokens but config.data's tokenizer"),
    ("heads", "--num_heads=4 but the checkpoint's config says n_heads=2"),
])
def test_bad_checkpoints_fail_clearly_and_write_nothing(tmp_path, case, match):
  if case == "other_architecture":
    path = str(tmp_path / "gpt.safetensors")
    torch_files.write_safetensors(path, {"transformer.wte.weight": np.zeros((8, 4), np.float32),
                                         "blocks.0.attn.c_attn.weight": np.zeros((4, 12),
                                                                                 np.float32)})
    kw = dict(path=path)
  elif case == "missing_key":
    state = torch_files.read_safetensors(os.path.join(FIX, "mdlm_tiny.safetensors"))
    del state["backbone.blocks.1.mlp.2.bias"]
    path = str(tmp_path / "partial.safetensors")
    torch_files.write_safetensors(path, state)
    kw = dict(path=path, num_heads=2)
  elif case == "wrong_paper":
    kw = dict(name="prime_tiny_l2.ckpt", base_config=_byte_config(2))
  elif case == "vocabulary":
    cfg = load_config("shakespeare_mdm:tiny")
    cfg.data.tokenizer = "char"
    kw = dict(base_config=cfg)
  else:
    kw = dict(num_heads=4)
  with pytest.raises(pub.ConversionError, match=match):
    _convert(tmp_path, **kw)
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["mdlm_tiny.ckpt", "mdlm_tiny.safetensors"])
def test_truncated_file_fails_clearly(tmp_path, name):
  data = open(os.path.join(FIX, name), "rb").read()
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(torch_files.WeightFileError, match="truncated"):
    _convert(tmp_path, path=path, num_heads=2)
  _assert_nothing_written(tmp_path)


def test_recorded_settings_must_match_the_tensors():
  arch = pub.Architecture(2, 16, 2, 8, 4, ell=2, vocab_size=256, embed_rows=17)
  with pytest.raises(pub.ConversionError, match="target_length .ell. = 3"):
    published.check_hparams({"ell": 3}, arch, "mdm-prime")
  with pytest.raises(pub.ConversionError, match="time_conditioning=True"):
    published.check_hparams({"time_conditioning": True}, arch, "mdm-prime")
  with pytest.raises(pub.ConversionError, match="SEDD/D3PM"):
    published.check_hparams({"parameterization": "sedd"}, arch, "mdm-prime")


def test_failure_while_writing_leaves_no_workdir(tmp_path, monkeypatch):
  from mdm_jax.trainers import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

  def boom(*args, **kwargs):
    raise OSError("disk went away")

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", boom)
  with pytest.raises(OSError, match="disk went away"):
    _convert(tmp_path, num_heads=2)
  _assert_nothing_written(tmp_path)


def test_existing_workdir_is_not_replaced(tmp_path):
  (tmp_path / "wd").mkdir()
  (tmp_path / "wd" / "keep.txt").write_text("mine")
  with pytest.raises(pub.ConversionError, match="exists and is not empty"):
    _convert(tmp_path, num_heads=2)
  assert (tmp_path / "wd" / "keep.txt").read_text() == "mine"


def test_cli_reports_one_line_error(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "mdm_jax.convert", "--from=mdlm",
       f"--checkpoint={FIX}/prime_tiny_l2.ckpt", f"--workdir={tmp_path}/wd"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: This checkpoint has sub-token")
  assert not os.path.exists(tmp_path / "wd")


def test_live_against_authors_code(tmp_path):
  """Regenerates the references with the authors' code and PyTorch, then compares.

  Needs MDM_JAX_TORCH_PYTHON (a Python with torch, numpy, safetensors, einops, omegaconf,
  huggingface_hub) and MDM_JAX_AUTHORS_REPOS=MDLM_CHECKOUT:MDM_PRIME_CHECKOUT.
  """
  python, repos = os.environ.get("MDM_JAX_TORCH_PYTHON"), os.environ.get("MDM_JAX_AUTHORS_REPOS")
  if not python or not repos:
    pytest.skip("set MDM_JAX_TORCH_PYTHON and MDM_JAX_AUTHORS_REPOS to run the authors' code "
                "live (the committed fixtures are compared above)")
  mdlm_repo, prime_repo = repos.split(":")
  proc = subprocess.run([python, os.path.join(FIX, "make_reference.py"), f"--mdlm_repo={mdlm_repo}",
                         f"--prime_repo={prime_repo}", f"--out={tmp_path}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, source, tag in CASES:
    d_logits, d_logp = forward_differences(str(tmp_path), name, source, tag)
    assert d_logits <= TOL and d_logp <= TOL, (name, tag, d_logits, d_logp)
  shutil.rmtree(tmp_path, ignore_errors=True)
