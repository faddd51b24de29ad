"""Standard FID: the FID Inception-v3 port, its weight readers and the FID pipeline.

The oracle is jax-fid (PyPI, an independent Flax port of the same network,
installed by launch/setup_env.sh without its pinned dependencies): with the same
random weights, read from the same file, both must give the same 2048-d features.
Random He-scaled weights keep activations O(1) through all 94 conv layers, so a
wrong padding, pool, branch order or layout conversion changes the features.
"""

import pickle
import tempfile

import numpy as np
import pytest

from mdm_jax.metrics import frechet, inception

SIZE = 75        # the smallest input Inception-v3 accepts: keeps the test cheap


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  d = tmp_path_factory.mktemp("inception")
  tree = inception.random_weights(seed=3)
  (d / "jax_fid").mkdir()
  pkl = d / "jax_fid" / "inception_v3_weights_fid.pickle"   # where jax-fid looks for it
  with open(pkl, "wb") as f:
    pickle.dump(tree, f)
  sd = inception.to_torch_state(tree)
  sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(7)   # present in real state dicts
  sd["fc.weight"] = np.zeros((1008, 2048), np.float32)           # the classifier head: ignored
  npz = d / "inception_fid.npz"
  np.savez(npz, **sd)
  return {"dir": d, "tree": tree, "pickle": str(pkl), "npz": str(npz)}


def _images(seed, n, base):
  rng = np.random.default_rng(seed)
  return np.clip(rng.normal(base, 60, (n, 28, 28, 1)), 0, 255).astype(np.uint8)


def test_features_match_jax_fid_and_fid_pipeline(weights, monkeypatch):
  import jax
  from jax_fid import inception as jf   # the independent port (setup_env.sh installs it)
  variables = inception.load_weights(weights["pickle"])
  a = _images(0, 6, 90)
  ours = inception.inception_features(a, variables, batch_size=4, image_size=SIZE)  # pads 6 -> 8
  assert ours.shape == (6, inception.FEATURE_DIM)
  assert np.isfinite(ours).all() and ours.std() > 1e-3
  # jax-fid reads "pretrained" weights from <tempdir>/jax_fid/<name>: point it at ours
  monkeypatch.setattr(tempfile, "tempdir", str(weights["dir"]))
  model = jf.InceptionV3(pretrained=True)
  x = inception.preprocess(a, SIZE)
  ref_vars = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  ref = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(ref_vars, x))
  ref = ref.reshape(len(a), -1)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  # the padding of the last batch (rows 4, 5 padded to 4) does not leak into its rows
  alone = inception.inception_features(a[4:6], variables, batch_size=4, image_size=SIZE)
  np.testing.assert_allclose(alone, ours[4:6], rtol=1e-5, atol=1e-6)
  # FID: identical sets ~ 0; a brighter set is far; inception.standard_fid is the same pipeline
  b = _images(1, 6, 200)
  same = frechet.frechet_distance_of_features(ours, ours)
  far = inception.standard_fid(a, b, weights["npz"], batch_size=4, image_size=SIZE)
  assert same < 1e-6 * far and far > 0


def test_npz_state_dict_and_pickle_give_the_same_variables(weights):
  import jax
  v1 = inception.load_weights(weights["pickle"])
  v2 = inception.load_weights(weights["npz"])
  leaves1, tdef1 = jax.tree_util.tree_flatten(v1)
  leaves2, tdef2 = jax.tree_util.tree_flatten(v2)
  assert tdef1 == tdef2 and len(leaves1) == 94 * 5   # 94 convs: kernel + bn scale/bias/mean/var
  for x, y in zip(leaves1, leaves2):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  k = np.asarray(v1["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])
  assert k.shape == (1, 7, 128, 128)                     # HWIO after the OIHW transpose
  np.testing.assert_array_equal(k, weights["tree"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])


def test_bad_weight_files_say_what_is_wrong(weights, tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    inception.load_weights(str(tmp_path / "nope.npz"))
  other = tmp_path / "weights.h5"
  other.write_bytes(b"x")
  with pytest.raises(ValueError, match="Unknown Inception weights format"):
    inception.load_weights(str(other))
  truncated = tmp_path / "cut.pickle"
  truncated.write_bytes(open(weights["pickle"], "rb").read()[:1000])
  with pytest.raises(ValueError, match="Is the file complete"):
    inception.load_weights(str(truncated))
  sd = dict(np.load(weights["npz"]))
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  sd["Conv2d_1a_3x3.conv.weight"] = sd["Conv2d_1a_3x3.conv.weight"][:16]
  np.savez(tmp_path / "wrong.npz", **sd)
  with pytest.raises(ValueError, match=r"missing 1 tensors.*Mixed_7c/branch_pool/bn/var.*"
                                       r"Conv2d_1a_3x3/conv/kernel: file \(3, 3, 3, 16\)"):
    inception.load_weights(str(tmp_path / "wrong.npz"))
  v = inception.load_weights(weights["npz"])
  with pytest.raises(ValueError, match=">= 75"):
    inception.make_feature_fn(v, image_size=32)
  with pytest.raises(ValueError, match=r"\[N, H, W\]"):
    inception.preprocess(np.zeros((2, 8, 8, 2), np.uint8), SIZE)
