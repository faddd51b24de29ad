"""Images as pixel tokens: loaders, quantisation, the image DiT, classifier features,
the Frechet distance and a tiny command-line train + sample run writing a PNG grid."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.core.errors import ConfigError

from mdm_jax.tasks import validate_config
from mdm_jax.metrics import classifier as eval_images
from mdm_jax.trainers.classifier import train_classifier
from mdm_jax.metrics import frechet, inception
from mdm_jax.tasks import build_task
from mdm_jax.data import images
from mdm_jax.data import build_data as make_text_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location(f"_img_cfg_{name[:-3]}",
                                                os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def _fake_fashion_dir(tmp_path, n_train=20, n_test=10, gz=True):
  rng = np.random.default_rng(0)
  ext = ".gz" if gz else ""
  for split, n in (("train", n_train), ("t10k", n_test)):
    images.write_idx(str(tmp_path / f"{split}-images-idx3-ubyte{ext}"),
                     rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    images.write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte{ext}"),
                     (np.arange(n) % 10).astype(np.uint8))
  return str(tmp_path)


# ------------------------------------------------------------------ loaders
@pytest.mark.parametrize("gz", [True, False])
def test_idx_parser_on_synthetic_files(tmp_path, gz):
  d = _fake_fashion_dir(tmp_path, gz=gz)
  out = images.load_fashion_mnist(d)
  xtr, ytr = out["train"]
  assert xtr.shape == (20, 28, 28, 1) and xtr.dtype == np.uint8 and ytr.shape == (20,)
  assert out["test"][0].shape == (10, 28, 28, 1)
  np.testing.assert_array_equal(ytr, np.arange(20) % 10)
  # round trip of the raw array
  a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  images.write_idx(str(tmp_path / "a.idx"), a)
  np.testing.assert_array_equal(images.read_idx(str(tmp_path / "a.idx")), a)
  with open(tmp_path / "bad", "wb") as f:
    f.write(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX"):
    images.read_idx(str(tmp_path / "bad"))


def test_missing_fashion_mnist_names_the_setup_command(tmp_path, monkeypatch):
  monkeypatch.setattr(images, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
  with pytest.raises(FileNotFoundError, match="setup_env.sh"):
    images.find_fashion_mnist()


def test_real_fashion_mnist_full_sets():
  try:
    d = images.load_fashion_mnist()
  except FileNotFoundError as e:
    pytest.skip(f"Debian's Fashion-MNIST is absent ({e}); `bash launch/setup_env.sh` fetches it.")
  (xtr, ytr), (xte, yte) = d["train"], d["test"]
  assert xtr.shape == (60000, 28, 28, 1) and xte.shape == (10000, 28, 28, 1)
  assert xtr.dtype == np.uint8 and xtr.min() == 0 and xtr.max() == 255
  np.testing.assert_array_equal(np.bincount(ytr), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(yte), [1000] * 10)
  assert abs(float(xtr.mean()) - 72.94) < 0.01


def test_fashion_data_object_interface(tmp_path):
  c = _load_config("fashion_mnist_prime.py", "tiny")
  c.data.path = _fake_fashion_dir(tmp_path)
  c.data.num_levels = 16
  data = make_text_data(c.data)
  assert data.tokenizer.vocab_size == 16 and data.seq_len == 784
  batch = next(iter(data.train_dataset(4, 0)))
  assert batch["tokens"].shape == (4, 784) and batch["tokens"].dtype == np.int32
  assert 0 <= batch["tokens"].min() and batch["tokens"].max() < 16
  ev = data.eval_batches(4, 0)
  assert len(ev) == 3 and ev[-1]["weights"].tolist() == [1, 1, 0, 0]   # 10 rows, padded
  img = data.tokenizer.decode(ev[0]["tokens"])
  assert img.shape == (4, 28, 28, 1) and img.dtype == np.uint8
  c.data.seq_len = 100
  with pytest.raises(ValueError, match="seq_len=784"):
    make_text_data(c.data)


@pytest.mark.parametrize("levels", [2, 3, 16, 200, 256])
def test_quantisation_round_trip(levels):
  q = np.arange(levels)
  x = images.dequantize(q, levels)
  assert x.dtype == np.uint8
  np.testing.assert_array_equal(images.quantize(x, levels), q)       # exact on level ids
  allx = np.arange(256, dtype=np.uint8)
  qx = images.quantize(allx, levels)
  assert qx.min() == 0 and qx.max() == levels - 1 and np.all(np.diff(qx.astype(int)) >= 0)
  err = np.abs(images.dequantize(qx, levels).astype(int) - allx.astype(int)).max()
  assert err <= 128 // levels + 1
  if levels == 256:
    np.testing.assert_array_equal(images.dequantize(qx, levels), allx)
  tok = images.ImageTokenizer((2, 3, 3), levels)
  im = np.random.default_rng(levels).integers(0, 256, (2, 3, 3), dtype=np.uint8)
  row = tok.encode(im)
  assert row.shape == (18,) and row.max() < levels
  np.testing.assert_array_equal(row.reshape(2, 3, 3), images.quantize(im, levels))  # raster
  np.testing.assert_array_equal(tok.encode(tok.decode(row)), row)


def test_image_folder_loader(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(1)
  for cls in ("cats", "dogs"):
    os.makedirs(tmp_path / cls)
    for i in range(5):
      Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
          tmp_path / cls / f"{i}.png")
  x, y, names = images.load_image_folder(str(tmp_path), channels=3)
  assert x.shape == (10, 10, 12, 3) and names == ["cats", "dogs"]
  assert np.bincount(y).tolist() == [5, 5]
  x1, _, _ = images.load_image_folder(str(tmp_path), image_size=8, channels=1)
  assert x1.shape == (10, 8, 8, 1)
  c = _load_config("fashion_mnist_prime.py", "tiny")
  c.data.dataset, c.data.path, c.data.channels, c.data.image_size = "image_folder", str(tmp_path), 1, 8
  c.data.seq_len, c.data.eval_fraction = 64, 0.2
  data = make_text_data(c.data)
  assert data.train.shape == (8, 64) and data.eval.shape == (2, 64)
  assert data.class_names == ("cats", "dogs")
  with pytest.raises(FileNotFoundError):
    images.load_image_folder(str(tmp_path / "missing"))


def test_tfds_images_never_downloads(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  c = _load_config("cifar10_prime.py")
  c.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    make_text_data(c.data)


def test_png_grid(tmp_path):
  ims = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  grid = images.image_grid(ims, ncols=3, pad=1)
  assert grid.shape == (2 * 7 + 1, 3 * 8 + 1, 3)
  np.testing.assert_array_equal(grid[1:7, 1:8], ims[0])
  p = images.write_png(str(tmp_path / "g.png"), grid)
  np.testing.assert_array_equal(images.read_png(p), grid)
  from PIL import Image
  np.testing.assert_array_equal(np.asarray(Image.open(p)), grid)
  g1 = images.image_grid(ims[..., :1])
  np.testing.assert_array_equal(images.read_png(images.write_png(str(tmp_path / "h.png"), g1)),
                                g1)


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("ell", [1, 2])
def test_image_dit_shapes_and_loss(ell):
  c = _load_config("fashion_mnist_prime.py", f"ell={ell},tiny")
  c.model.image_shape, c.data.seq_len, c.model.patch_size = (8, 8, 2), 128, 4
  validate_config(c)
  task = build_task(c, 256)
  assert task.codec.base == (256 if ell == 1 else 16)
  digits = jnp.zeros((2, 128, ell), jnp.int32)
  params = nn.unbox(jax.jit(task.model.init)(jax.random.key(0), digits, jnp.ones(2))["params"])
  assert params["head"].shape == (32, 4 * 4 * 2, 256)
  assert params["digit_table"].shape == (task.codec.base + 1, 8 // ell)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 128)), jnp.int32)
  logits = jax.jit(task.apply_fn)(params, task.codec.encode(tokens), jnp.ones(2))
  assert logits.shape == (2, 128, 256)
  per_seq, _ = jax.jit(lambda p, x, k: task.loss(p, x, k, train=True))(params, tokens,
                                                                        jax.random.key(1))
  assert per_seq.shape == (2,) and bool(jnp.all(jnp.isfinite(per_seq)))
  # the head starts at zero: the loss is about the uniform bound on the masked share
  assert float(per_seq.max()) <= 128 * np.log(256) * 1.5


def test_patchify_is_a_permutation():
  from mdm_jax.networks.image_dit import patchify, unpatchify
  x = jnp.arange(2 * 4 * 6 * 3).reshape(2, 4 * 6 * 3, 1)
  p = patchify(x, (4, 6, 3), 2)
  assert p.shape == (2, 6, 12)
  # the first patch holds pixels (0,0),(0,1),(1,0),(1,1), all channels
  first = [(r * 6 + col) * 3 + ch for r in (0, 1) for col in (0, 1) for ch in range(3)]
  np.testing.assert_array_equal(np.asarray(p[0, 0]), first)
  back = unpatchify(p.reshape(2, 6, 12, 1), (4, 6, 3), 2)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_image_configs_validate():
  for name, arg in [("fashion_mnist_prime.py", ""), ("fashion_mnist_prime.py", "ell=4,tiny"),
                    ("fashion_mnist_mdm.py", ""), ("cifar10_prime.py", ""),
                    ("cifar10_prime.py", "mdm"), ("imagenet32_prime.py", "")]:
    c = _load_config(name, arg)
    validate_config(c)
    task = build_task(c, int(c.data.num_levels))
    shapes = jax.eval_shape(task.model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, task.seq_len, task.codec.ell), jnp.int32),
                            jax.ShapeDtypeStruct((1,), jnp.float32))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert n > 1e5, (name, n)
  c = _load_config("cifar10_prime.py")
  assert c.data.seq_len == 3072 and c.training.batch_size == 512 and c.prime.ell == 2
  c.data.seq_len = 100
  with pytest.raises(ConfigError, match="seq_len"):
    validate_config(c)


# ------------------------------------------------------------------ evaluation
def test_classifier_features_and_save_load(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
  y = (x.reshape(64, -1).mean(1) > 127.5).astype(np.int32)     # brightness classes
  x[y == 1] = np.clip(x[y == 1].astype(int) + 60, 0, 255)
  clf = train_classifier(x, y, 2, steps=60, batch_size=32, width=8, feature_dim=16,
                                     path=str(tmp_path / "clf"), eval_images=x, eval_labels=y)
  f = clf.features(x[:10], batch_size=8)
  assert f.shape == (10, 16) and f.dtype == np.float64 and np.isfinite(f).all()
  assert clf.meta["test_accuracy"] > 0.8
  again = eval_images.Classifier.load(str(tmp_path / "clf"))
  np.testing.assert_allclose(again.features(x[:10], batch_size=8), f, rtol=1e-5, atol=1e-6)
  # identical sets have distance ~0
  assert eval_images.classifier_frechet_distance(clf, x, x) < 1e-6
  with pytest.raises(FileNotFoundError, match="train_classifier"):
    eval_images.Classifier.load(str(tmp_path / "none"))


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(500, 6))
  assert frechet.frechet_distance_of_features(f, f) == pytest.approx(0.0, abs=1e-8)
  # diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
  s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
  exact = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = frechet.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(exact, rel=1e-9)
  # a full covariance: rotating both Gaussians together leaves the distance unchanged
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  rot = frechet.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2,
                                     q @ np.diag(s2) @ q.T)
  assert rot == pytest.approx(exact, rel=1e-6)
  # samples of shifted Gaussians: ~ |shift|^2 (sampling error shrinks with N)
  shift = np.array([1.0, 0.5, 0, 0, 0, 0])
  g = rng.normal(size=(20000, 6)) + shift
  h = rng.normal(size=(20000, 6))
  assert frechet.frechet_distance_of_features(g, h) == pytest.approx(1.25, abs=0.05)
  assert eval_images.bits_per_dim(np.log(2.0) * 3) == pytest.approx(3.0)
  with pytest.raises(FileNotFoundError, match="Inception weights not found"):
    inception.standard_fid(None, None, "/nonexistent/inception.npz")


# ------------------------------------------------------------------ command line
def test_cli_train_sample_writes_png_and_image_eval(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(2)
  folder = tmp_path / "imgs"
  for cls in ("dark", "light"):
    os.makedirs(folder / cls)
    for i in range(12):
      base = 40 if cls == "dark" else 200
      Image.fromarray(np.clip(rng.normal(base, 20, (8, 8)), 0, 255).astype(np.uint8)).save(
          folder / cls / f"{i}.png")
  wd = str(tmp_path / "run")
  overrides = [f"--config.data.path={folder}", "--config.data.dataset=image_folder",
               "--config.data.channels=1", "--config.data.seq_len=64",
               "--config.model.image_shape=(8, 8, 1)", "--config.data.eval_fraction=0.25",
               "--config.data.max_eval_examples=0", "--config.data.max_train_examples=0"]
  cfg = "--config=configs/fashion_mnist_prime.py:tiny"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.main", cfg, f"--workdir={wd}",
                         *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  assert final["step"] == 6 and np.isfinite(final["eval_nll"])
  png = os.path.join(wd, "samples", "step_6.png")
  grid = images.read_png(png)
  assert grid.shape[2] == 1 and grid.shape[0] >= 2 * 8
  stats = json.load(open(os.path.join(wd, "samples", "step_6.json")))
  assert stats["num_images"] == 4 and stats["nfe"] >= 1
  # classifier + image evaluation (bits/dim, classifier Frechet distance) from the CLI
  clf_dir = str(tmp_path / "clf")
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.eval_images", "--mode=train_classifier",
                         cfg, *overrides, f"--classifier_path={clf_dir}",
                         "--classifier_steps=20", "--classifier_batch=8"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # ... plus standard FID from Inception weights on disk (random ones, in the .npz format)
  weights = str(tmp_path / "inception_fid.npz")
  np.savez(weights, **inception.to_torch_state(inception.random_weights(seed=1)))
  proc = subprocess.run([sys.executable, "-m", "mdm_jax.eval_images", "--mode=evaluate", cfg,
                         *overrides, f"--workdir={wd}", f"--classifier_path={clf_dir}",
                         "--num_samples=8", f"--inception_weights={weights}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout)
  assert res["bits_per_dim"] == pytest.approx(final["eval_nll"] / np.log(2), rel=1e-4)
  assert res["classifier_frechet_distance"] >= 0 and os.path.isfile(res["grid_png"])
  assert np.isfinite(res["fid"]) and res["fid"] > 0
  assert res["fid_inception_weights"] == weights
