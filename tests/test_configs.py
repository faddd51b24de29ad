"""Every config in configs/ loads, validates, and builds its model and train state abstractly.

Nothing is allocated: ``jax.eval_shape`` of the initialiser gives the parameter
shapes, which are checked against the DiT's parameter count derived from its
layer shapes, and the full-size DiT-small is checked to have the ~85-95 M
parameters outside the embedding and the head that its 12 x 768 shape implies.
"""

import glob
import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from mdm_jax.core.flags import last_override_wins

from mdm_jax.tasks import validate_config

from mdm_jax.trainers.setup import validate_batch
from mdm_jax.core import sharding as shd
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import make_optimizer
from mdm_jax.trainers.state import state_shardings
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not os.path.basename(p).startswith("_"))
FULL_SIZE = ["owt_mdm.py", "owt_prime.py", "owt_ar.py", "lm1b_mdm.py", "lm1b_prime.py"]
GPT2_VOCAB = 50257          # r50k_base: 50,000 merges + 256 bytes + <|endoftext|>


def load(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name[:-3]}",
                                                os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def vocab_for(config) -> int:
  """The tokenizer's vocab size, without building it (no data, no files)."""
  kind = config.data.tokenizer
  if kind == "gpt2":
    return GPT2_VOCAB
  if kind == "bpe":
    return int(config.data.bpe_vocab_size)
  return {"char": 84, "byte": 256}[kind]


def dit_param_count(config, vocab: int, base: int, ell: int) -> dict:
  """Parameters of mdm_jax's DiT from its layer shapes (see mdm_jax/networks/dit.py)."""
  m = config.model
  d, c, L, f = int(m.d_model), int(m.cond_dim), int(m.num_layers), int(m.mlp_ratio) * int(m.d_model)
  per_block = (d * 3 * d            # qkv
               + d * d              # attention output
               + d * f + f * d      # MLP in / out
               + c * 6 * d + 6 * d  # adaLN modulation (kernel + bias)
               + 2 * d)             # two LayerNorm scales
  w = int(m.get("local_conv", 0))
  if w:
    per_block += w * d + d          # local_conv taps + its norm scale
  cond = (256 * c + c) + (c * c + c)                 # time/constant embedding MLP
  final = (c * 2 * d + 2 * d) + d                    # final adaLN + LayerNorm scale
  rows = (base + 1) * (ell if m.get("per_slot_tables", False) else 1)
  embed = rows * (d if m.get("digit_merge", "concat") == "sum" else d // ell)   # digit table(s)
  multiple = int(m.get("vocab_multiple", 0))
  width = -(-vocab // multiple) * multiple if multiple > 1 else vocab   # a padded head's columns
  head = 0 if m.tie_embeddings else d * width
  return {"body": L * per_block + cond + final, "embed": embed, "head": head,
          "total": L * per_block + cond + final + embed + head}


def abstract_params(task):
  digits = jax.ShapeDtypeStruct((2, task.seq_len, task.codec.ell), jnp.int32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  boxed = jax.eval_shape(task.model.init, jax.random.key(0), digits, t)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.unbox(boxed)["params"]


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_every_config_file_is_covered():
  assert set(FULL_SIZE) <= set(CONFIG_FILES)
  assert {"base.py", "shakespeare_prime.py", "shakespeare_mdm.py", "shakespeare_ar.py"} <= \
      set(CONFIG_FILES)


# Image configs (model image_dit) are built and checked in tests/test_images.py; the Gaussian
# mc_dit configs in tests/test_mc_dit.py.
IMAGE_CONFIGS = {"fashion_mnist_prime.py", "fashion_mnist_mdm.py", "cifar10_prime.py",
                 "imagenet32_prime.py", "fashion_mnist_mcdit.py", "cifar10_mcdit.py"}
CASES = [(n, "") for n in CONFIG_FILES if n not in IMAGE_CONFIGS] + [
    ("shakespeare_prime.py", "tiny"), ("shakespeare_prime.py", "ell=3,tiny"),
    ("owt_prime.py", "ell=2"), ("owt_prime.py", "ell=8,microbatches=4"),
    ("owt_mdm.py", "smoke"), ("owt_ar.py", "microbatches=8"),
    ("lm1b_prime.py", "ell=5"), ("lm1b_prime.py", "ell=2,smoke"),
    ("owt_1b.py", "ell=2"), ("owt_1b.py", "smoke")]


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_loads_validates_and_builds(name, arg):
  config = load(name, arg)
  assert config.model.name == "dit", f"{name}: add image configs to IMAGE_CONFIGS"
  validate_config(config)
  vocab = vocab_for(config)
  task = build_task(config, vocab)
  params = abstract_params(task)
  expect = dit_param_count(config, vocab, task.codec.base, task.codec.ell)
  params.pop("schedule", None)   # a learned multivariate schedule's own (few) parameters
  assert count(params) == expect["total"], (name, arg)
  assert count(params["embed"]) == expect["embed"]
  # Every config's batch splits over 8 devices on its own mesh.
  mesh = shd.make_mesh(config.mesh, jax.devices()[:8])
  validate_batch(config, mesh)


def test_owt_1b_has_a_billion_parameters_and_the_owt_recipe():
  config = load("owt_1b.py")
  task = build_task(config, GPT2_VOCAB)
  n = count(abstract_params(task))
  assert 1.0e9 < n < 1.6e9, n
  assert (config.model.num_layers, config.model.d_model) == (24, 2048)
  assert config.data.seq_len == 1024 and config.data.tokenizer == "gpt2"
  assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"
  assert tuple(config.mesh.shape) == (1, -1, 1)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_configs_are_dit_small(name):
  config = load(name)
  m, tc, data = config.model, config.training, config.data
  assert (m.num_layers, m.d_model, m.num_heads) == (12, 768, 12)
  assert m.dtype == "bfloat16" and m.param_dtype == "float32"
  assert tc.batch_size == 512 and tc.ema_decay == 0.9999 and tc.warmup_steps > 0
  assert tc.b2 > tc.b1 > 0 and tc.learning_rate > 0
  assert data.dataset == "array_record" and data.path
  assert tuple(config.mesh.shape)[1] == -1                  # FSDP over every device
  if name.startswith("owt"):
    assert data.seq_len == 1024 and data.tokenizer == "gpt2" and "gpt2_bpe_path" in data
  else:
    assert data.seq_len == 128
  assert config.objective == ("ar" if name == "owt_ar.py" else "diffusion")
  ell = int(config.prime.ell)
  assert ell == 1 if "prime" not in name else 2 <= ell <= 8

  vocab = vocab_for(config)
  task = build_task(config, vocab)
  params = abstract_params(task)
  body = count(params) - count(params["embed"]) - count(params.get("head", {}))
  expect = dit_param_count(config, vocab, task.codec.base, task.codec.ell)
  assert body == expect["body"]
  # Bounds from the shape alone: the 12 x 768 blocks' matmuls hold 12 * 12 * d^2 =
  # 84.9 M weights (qkv 3d^2, out d^2, MLP 8d^2); the adaLN modulation adds
  # 12 * 6d * (cond + 1) = 7.1 M and the rest < 0.3 M, so 84.9 M <= body <= 1.1 x that.
  d, L = 768, 12
  assert 12 * L * d * d <= body <= 1.1 * 12 * L * d * d, body
  assert 85e6 < body < 95e6
  print(f"{name}: {body / 1e6:.2f} M non-embedding, {count(params) / 1e6:.2f} M in all "
        f"(V={vocab}, ell={task.codec.ell}, b={task.codec.base})")


def test_full_size_train_state_is_fsdp_sharded():
  """The optimizer state and parameters of DiT-small are sharded over 8 devices' fsdp axis."""
  config = load("owt_prime.py", "ell=4")
  task = build_task(config, GPT2_VOCAB)
  mesh = shd.make_mesh(config.mesh, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  tx, _ = make_optimizer(config.training)
  abstract, shardings = state_shardings(task, tx, mesh, shd.logical_rules(config.mesh))
  spec = shardings.params["blocks"]["mlp_in"].spec
  assert "fsdp" in jax.tree.leaves(tuple(spec)), spec
  per_device = sum(math.prod(s.shard_shape(a.shape)) for a, s in
                   zip(jax.tree.leaves(abstract.params), jax.tree.leaves(shardings.params)))
  assert per_device < 0.2 * count(abstract.params)          # mostly sharded, not replicated


@pytest.mark.parametrize("name,arg", [("owt_prime.py", "ell=1"), ("owt_prime.py", "ell=9"),
                                      ("owt_mdm.py", "ell=2"), ("owt_mdm.py", "bogus")])
def test_bad_variants_are_rejected(name, arg):
  with pytest.raises(ValueError):
    load(name, arg)


def test_repeated_override_last_one_wins():
  # ml_collections alone appends a repeated tuple override ((2,1,1) then (4,1,1) gives a
  # 6-tuple); the CLIs' parser keeps the last value of every repeated key, as absl does
  # for scalars.  The parser needs a fresh global FLAGS and sys.argv, so a subprocess.
  prog = (
      "import sys\n"
      "from absl import flags\n"
      "from ml_collections import config_flags\n"
      "from mdm_jax.core.flags import flags_parser\n"
      "config_flags.DEFINE_config_file('config')\n"
      "flags_parser('test')(sys.argv)\n"
      "c = flags.FLAGS.config\n"
      "print(tuple(c.mesh.shape), c.training.num_steps, c.prime.ell)\n")
  argv = ["--config=shakespeare_prime:tiny",
          "--config.mesh.shape=(2,1,1)", "--config.training.num_steps=4",
          "--config.mesh.shape=(4,1,1)", "--config.training.num_steps=5"]
  proc = subprocess.run([sys.executable, "-c", prog, *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["(4,", "1,", "1)", "5", "2"], proc.stdout
  assert last_override_wins(
      ["p", "--config.a=1", "--config.b=2", "--other=1", "--config.a=3", "--config.ab=4"]) == [
          "p", "--config.b=2", "--other=1", "--config.a=3", "--config.ab=4"]
