"""Tests for mdm_jax.pictures.masking: partial-masking states and pictures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax import sampling

from mdm_jax.pictures import masking as visualize
from mdm_jax.data.images import dequantize, read_png, write_png
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.diffusion.schedules import linear

# V = 16, ell = 2 -> b = 4, mask id 4.  Token 9 = digits (2, 1).
CODEC = PrimeCodec.create(16, 2)
M = CODEC.mask_id


def test_token_states_and_counts():
  d = np.array([[M, M], [2, M], [M, 1], [2, 1]])
  np.testing.assert_array_equal(visualize.token_states(d, M), [0, 1, 1, 2])
  c = visualize.state_counts(np.stack([d, np.full_like(d, M)]), M)
  np.testing.assert_array_equal(c["masked"], [1, 4])
  np.testing.assert_array_equal(c["partial"], [2, 0])
  np.testing.assert_array_equal(c["complete"], [1, 0])
  np.testing.assert_array_equal(c["masked_digits"], [4, 8])
  # ell = 1 (plain MDM): never partial.
  np.testing.assert_array_equal(visualize.token_states(np.array([[3], [M]]), M), [2, 0])
  with pytest.raises(ValueError, match="integer"):
    visualize.token_states(np.zeros((2, 2), np.float32), M)


def test_masking_frame_colours_and_new_borders(tmp_path):
  d = np.array([[M, M], [2, M], [2, 1]])
  prev = np.array([[M, M], [M, M], [2, M]])
  cell, gap = 6, 2
  img = visualize.masking_frame(d, M, prev, ncols=2, cell=cell, gap=gap)
  tw, th = 2 * cell + 1, 2 * cell
  assert img.shape == (2 * (th + gap) + gap, 2 * (tw + gap) + gap, 3)
  assert img.dtype == np.uint8

  def centre(token, digit):
    r, c = divmod(token, 2)
    y = gap + r * (th + gap) + th // 2
    x = gap + c * (tw + gap) + digit * (cell + 1) + cell // 2
    return tuple(img[y, x])

  def corner(token, digit):
    r, c = divmod(token, 2)
    return tuple(img[gap + r * (th + gap), gap + c * (tw + gap) + digit * (cell + 1)])

  col = visualize.COLOURS
  assert centre(0, 0) == col["masked"] and centre(0, 1) == col["masked"]
  assert centre(1, 0) == col["partial"] and centre(1, 1) == col["masked"]
  assert centre(2, 0) == col["complete"] and centre(2, 1) == col["complete"]
  # Revealed since prev: token 1 digit 0 and token 2 digit 1 get a black border.
  assert corner(1, 0) == col["new"] and corner(2, 1) == col["new"]
  assert corner(2, 0) == col["complete"] and corner(0, 0) == col["masked"]
  # The 4th grid slot is empty background.
  assert tuple(img[gap + th + gap + 1, gap + tw + gap + 1]) == col["background"]
  # Round trip through the project's PNG writer.
  np.testing.assert_array_equal(read_png(write_png(str(tmp_path / "f.png"), img)), img)
  with pytest.raises(ValueError, match="previous"):
    visualize.masking_frame(d, M, prev[:2])


def test_masking_timeline_layout():
  tr = np.array([[[M, M], [M, M]], [[1, M], [M, M]], [[1, 2], [M, 3]]])
  img = visualize.masking_timeline(tr, M, scale=2)
  assert img.shape == (3 * 2, 4 * 2, 3)
  col = visualize.COLOURS
  # row 2 (final state), columns: token0 d0, token0 d1, token1 d0, token1 d1
  row = [tuple(img[2 * 2, 2 * k]) for k in range(4)]
  assert row == [col["complete"], col["complete"], col["masked"], col["partial"]]
  assert tuple(img[2, 0]) == col["partial"] and tuple(img[2, 2]) == col["masked"]


def test_partial_text():
  d = np.array([[2, 1], [M, 3], [M, M], [0, 0]])
  names = {9: "ab", 0: "z"}
  assert visualize.partial_text(d, CODEC, names.__getitem__) == "ab?_z"
  assert visualize.partial_text(d, CODEC, names.__getitem__, masked="#", partial="%") == "ab%#z"


def test_partial_image_values():
  # 256 levels, ell = 2 -> b = 16.  Four grey pixels in a 2x2 image.
  codec = PrimeCodec.create(256, 2)
  m = codec.mask_id
  d = np.array([[3, 7], [5, m], [m, m], [m, 15]])
  img = visualize.partial_image(d, codec, (2, 2, 1))
  assert img.shape == (2, 2, 3) and img.dtype == np.uint8
  assert tuple(img[0, 0]) == (3 * 16 + 7,) * 3                        # complete: its value
  mean = np.mean(np.arange(5 * 16, 6 * 16))                           # levels 80..95
  expect = (1 - 0.35) * mean + 0.35 * np.asarray(visualize.COLOURS["partial"])
  np.testing.assert_allclose(img[0, 1], np.rint(expect), atol=1)      # partial: tinted mean
  assert tuple(img[1, 0]) == visualize.COLOURS["mask_pixel"]         # masked
  lv = visualize.consistent_level_means(d, codec)
  np.testing.assert_allclose(lv, [55, 87.5, 127.5, np.mean(np.arange(16) * 16 + 15)])
  # Fewer levels (V = 16, ell = 2, b = 4): the complete value goes through dequantize.
  d16 = np.array([[2, 1]])
  img16 = visualize.partial_image(d16, CODEC, (1, 1, 1), num_levels=16)
  assert img16[0, 0, 0] == dequantize(np.array([9]), 16)[0]
  with pytest.raises(ValueError, match="needs"):
    visualize.partial_image(d, codec, (3, 3, 1))


def test_on_a_real_ancestral_trajectory(tmp_path):
  """States along a sampler trajectory only move forward, and the frames can be written."""
  codec = PrimeCodec.create(16, 2)
  length, steps = 12, 8

  def apply_fn(params, digits, t, train=False, rng=None):
    del t, train, rng
    return jnp.zeros(digits.shape[:2] + (16,)) + params

  res = jax.jit(lambda p, k: sampling.ancestral_sample(
      apply_fn, p, k, codec=codec, schedule=linear(), batch_size=2, seq_len=length,
      num_steps=steps, return_trajectory=True))(jnp.zeros(()), jax.random.key(0, impl="rbg"))
  traj = np.concatenate([np.asarray(res.trajectory), np.asarray(res.digits)[None]])[:, 0]
  assert traj.shape == (steps + 2, length, 2)
  st = visualize.token_states(traj, codec.mask_id)
  assert (np.diff(st.astype(int), axis=0) >= 0).all()        # revealed digits never change
  assert (st[0] == visualize.MASKED).all() and (st[-1] == visualize.COMPLETE).all()
  counts = visualize.state_counts(traj, codec.mask_id)
  np.testing.assert_array_equal(counts["masked"] + counts["partial"] + counts["complete"],
                                length)
  assert (np.diff(counts["masked_digits"]) <= 0).all()
  for s in range(1, len(traj)):
    frame = visualize.masking_frame(traj[s], codec.mask_id, traj[s - 1], ncols=6)
    write_png(str(tmp_path / f"step_{s:03d}.png"), frame)
  back = read_png(str(tmp_path / f"step_{len(traj) - 1:03d}.png"))
  np.testing.assert_array_equal(back, visualize.masking_frame(
      traj[-1], codec.mask_id, traj[-2], ncols=6))


def _trajectory(steps=9, length=12, seed=0):
  """A made-up ell = 2 trajectory [steps, L, 2]: all masked, then digits revealed at random."""
  rng = np.random.default_rng(seed)
  tr = np.full((steps, length, 2), M)
  order = rng.permutation(length * 2)
  for s in range(1, steps):
    k = (length * 2 * s) // (steps - 1)
    tr[s].reshape(-1)[order[:k]] = rng.integers(0, CODEC.base, k)
  return tr


def test_masking_figure_has_axes_legend_and_a_title_with_sampler_and_ell():
  tr = _trajectory()
  fig = visualize.masking_figure(tr, M, sampler="first_hitting", ell=2)
  title = visualize.figure_title(fig)
  assert "first_hitting" in title and "\u2113 = 2" in title and "8 steps" in title
  (ax,) = fig.axes
  assert "position" in ax.get_xlabel() and "step" in ax.get_ylabel()
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ["masked", "partly observed (its known digits)", "visible (token known)"]
  # Rows are steps top to bottom, columns token positions.
  assert ax.get_ylim() == (8.5, -0.5) and ax.get_xlim() == (-0.5, 11.5)
  # ell = 1: no token can be partly observed, so the legend leaves that state out.
  fig1 = visualize.masking_figure(tr[..., :1], M, sampler="ancestral")
  assert "\u2113 = 1" in visualize.figure_title(fig1)
  assert len(fig1.axes[0].get_legend().get_texts()) == 2
  with pytest.raises(ValueError, match="ell=3"):
    visualize.masking_figure(tr, M, ell=3)


def test_masking_picture_png_is_readable_and_larger_than_the_bare_timeline(tmp_path):
  tr = _trajectory()
  img = visualize.masking_picture(tr, M, sampler="ancestral")
  path = write_png(str(tmp_path / "step_8_masking.png"), img)
  back = read_png(path)
  np.testing.assert_array_equal(back, img)
  bare = visualize.masking_timeline(tr, M, scale=4)   # what the run wrote before
  assert back.shape[0] >= 500 and back.shape[1] >= 900
  assert back.shape[0] > 5 * bare.shape[0] and back.shape[1] > 5 * bare.shape[1]
  colours = {tuple(c) for c in back.reshape(-1, 3)}
  col = visualize.COLOURS
  assert {col["masked"], col["partial"], col["complete"]} <= colours
