"""Pictures of partial masking: which sub-tokens are masked, partly or fully observed.

Pure NumPy functions of digit arrays ([..., L, ell] int, ``codec.mask_id`` marks a
masked digit), for the notebooks in ``colabs/`` and for debugging samplers.  Feed
them a sampler trajectory (``ancestral_sample(..., return_trajectory=True)``: the
digits before each step, followed by the final ``digits``) and write the frames with
``mdm_jax.pictures.pixels.write_png``.

A token is in one of three states (``token_states``):

* ``MASKED``: all ell digits masked;
* ``PARTIAL``: some digits observed, some masked (only possible with ell > 1: Prime);
* ``COMPLETE``: every digit observed, so the token is known.

Colours: masked digits grey, observed digits of a partly observed token orange,
digits of a complete token green; a digit revealed since the previous frame has
a black border.

``masking_figure`` draws a trajectory as a labelled matplotlib figure (position
across, sampling step down, a legend of the three states, the sampler and ell in
the title); ``masking_picture`` renders it to the RGB array that a run writes as
``samples/step_N_masking.png``.  ``masking_timeline`` is the same picture bare, one
block per digit.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from mdm_jax.pictures.pixels import dequantize

MASKED, PARTIAL, COMPLETE = 0, 1, 2
STATE_NAMES = ("masked", "partial", "complete")
COLOURS = {
    "masked": (150, 150, 150),
    "partial": (245, 150, 30),
    "complete": (40, 160, 80),
    "new": (0, 0, 0),
    "background": (255, 255, 255),
    "mask_pixel": (70, 110, 210),      # partial_image: a masked pixel channel
}


def _digits(digits, ndim_min: int = 2) -> np.ndarray:
  d = np.asarray(digits)
  if d.ndim < ndim_min or not np.issubdtype(d.dtype, np.integer):
    raise ValueError(f"digits must be an integer array [..., L, ell], got {d.dtype} {d.shape}.")
  return d


def token_states(digits, mask_id: int) -> np.ndarray:
  """int8 [..., L]: MASKED (0), PARTIAL (1) or COMPLETE (2) for each token."""
  d = _digits(digits)
  observed = (d != mask_id).sum(-1)
  ell = d.shape[-1]
  return np.where(observed == 0, MASKED, np.where(observed == ell, COMPLETE, PARTIAL)
                  ).astype(np.int8)


def state_counts(digits, mask_id: int) -> Dict[str, np.ndarray]:
  """Per leading index (e.g. per step of a trajectory [S, L, ell]): how many tokens are
  masked / partial / complete, and how many digits are still masked."""
  d = _digits(digits)
  st = token_states(d, mask_id)
  out = {name: (st == k).sum(-1) for k, name in enumerate(STATE_NAMES)}
  out["masked_digits"] = (d == mask_id).sum((-1, -2))
  return out


def _digit_colours(digits: np.ndarray, mask_id: int, previous: Optional[np.ndarray]):
  """uint8 [L, ell, 3] fill colours and bool [L, ell] 'revealed since previous'."""
  st = token_states(digits, mask_id)                       # [L]
  masked = digits == mask_id
  fill = np.where((st == COMPLETE)[:, None, None], COLOURS["complete"], COLOURS["partial"])
  fill = np.broadcast_to(fill, digits.shape + (3,)).copy()
  fill[masked] = COLOURS["masked"]
  new = np.zeros(digits.shape, bool)
  if previous is not None:
    previous = _digits(previous)
    if previous.shape != digits.shape:
      raise ValueError(f"previous has shape {previous.shape}, digits {digits.shape}.")
    new = (previous == mask_id) & ~masked
  return fill.astype(np.uint8), new


def masking_frame(digits, mask_id: int, previous=None, *, ncols: int = 16, cell: int = 8,
                  gap: int = 3) -> np.ndarray:
  """One sequence's masking state as an RGB picture, uint8 [H, W, 3].

  digits: [L, ell].  Tokens are laid out in rows of ``ncols``; each token is a box of
  ell vertical strips (its sub-tokens, most significant first), ``cell`` pixels wide
  and 2 * ``cell`` high, boxes ``gap`` pixels apart.  ``previous`` (the state one step
  earlier, same shape) draws a black border round every digit revealed since then.
  """
  d = _digits(digits)
  if d.ndim != 2:
    raise ValueError(f"masking_frame takes one sequence [L, ell], got {d.shape}.")
  length, ell = d.shape
  ncols = max(1, min(int(ncols), length))
  nrows = -(-length // ncols)
  tw, th = ell * cell + (ell - 1), 2 * cell            # 1 px separator between digit strips
  img = np.full((nrows * (th + gap) + gap, ncols * (tw + gap) + gap, 3),
                COLOURS["background"], np.uint8)
  fill, new = _digit_colours(d, mask_id, previous)
  for i in range(length):
    r, c = divmod(i, ncols)
    y0, x0 = gap + r * (th + gap), gap + c * (tw + gap)
    for j in range(ell):
      xs = x0 + j * (cell + 1)
      img[y0:y0 + th, xs:xs + cell] = fill[i, j]
      if new[i, j]:
        img[y0:y0 + th, xs] = img[y0:y0 + th, xs + cell - 1] = COLOURS["new"]
        img[y0, xs:xs + cell] = img[y0 + th - 1, xs:xs + cell] = COLOURS["new"]
  return img


def masking_timeline(trajectory, mask_id: int, *, scale: int = 4) -> np.ndarray:
  """A whole trajectory [S, L, ell] in one RGB picture: row s = state s, column = digit.

  Digit j of token i is column i * ell + j (a token's digits are adjacent), coloured
  as in ``masking_frame``; each element is a ``scale`` x ``scale`` block.
  """
  tr = _digits(trajectory, 3)
  if tr.ndim != 3:
    raise ValueError(f"masking_timeline takes [steps, L, ell], got {tr.shape}.")
  rows = [_digit_colours(tr[s], mask_id, None)[0].reshape(-1, 3) for s in range(tr.shape[0])]
  img = np.stack(rows)                                      # [S, L*ell, 3]
  return img.repeat(scale, 0).repeat(scale, 1)


FIGURE_SIZE = (10.0, 5.6)      # inches; at FIGURE_DPI: 1000 x 560 pixels
FIGURE_DPI = 100
LEGEND_LABELS = {"masked": "masked",
                 "partial": "partly observed (its known digits)",
                 "complete": "visible (token known)"}


def _state_image(trajectory: np.ndarray, mask_id: int) -> np.ndarray:
  """int8 [S, L*ell]: per digit, MASKED (a masked digit), PARTIAL (an observed digit of a
  partly observed token) or COMPLETE (a digit of a known token) -- the colours of
  ``masking_frame``."""
  st = token_states(trajectory, mask_id)                               # [S, L]
  per_digit = np.broadcast_to(st[..., None], trajectory.shape).copy()  # [S, L, ell]
  per_digit[trajectory == mask_id] = MASKED
  return per_digit.reshape(trajectory.shape[0], -1)


def masking_figure(trajectory, mask_id: int, *, sampler: str = "", ell: Optional[int] = None,
                   sample: int = 0, figsize=FIGURE_SIZE):
  """A sampler trajectory [S, L, ell] as a labelled matplotlib ``Figure`` (Agg, no pyplot).

  Row k (read downwards) is the state after k sampling steps, from all masked at
  t = 1 (row 0) to the last state before noise removal; column i is token position i,
  split into its ell digit strips (most significant first).  The title names the
  sampler, ell, the sequence length and the step count; the legend the three states.
  ``ell`` defaults to the trajectory's last axis.
  """
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.colors import BoundaryNorm, ListedColormap
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch
  # pylint: enable=import-outside-toplevel

  tr = _digits(trajectory, 3)
  if tr.ndim != 3:
    raise ValueError(f"masking_figure takes [steps, L, ell], got {tr.shape}.")
  steps, length, digits = tr.shape
  ell = int(digits if ell is None else ell)
  if ell != digits:
    raise ValueError(f"ell={ell} but the trajectory has {digits} digits per token.")
  rgb = [np.asarray(COLOURS[name], np.float64) / 255 for name in STATE_NAMES]
  cmap = ListedColormap(rgb)
  fig = Figure(figsize=figsize, dpi=FIGURE_DPI)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(_state_image(tr, mask_id), aspect="auto", interpolation="nearest", cmap=cmap,
            norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3),
            extent=(-0.5, length - 0.5, steps - 0.5, -0.5))
  ax.set_xlabel(f"token position (each split into its {ell} digits)" if ell > 1
                else "token position", fontsize=11)
  ax.set_ylabel("sampling step (0 = all masked at t = 1; t falls to 0 downwards)", fontsize=11)
  ax.tick_params(labelsize=10)
  name = sampler or "sampler"
  fig.suptitle(f"Masking of sample {sample}: {name}, \u2113 = {ell}", fontsize=13)
  ax.set_title(f"{length} tokens, {steps - 1} steps", fontsize=10)
  handles = [Patch(facecolor=rgb[k], edgecolor="black", linewidth=0.5,
                   label=LEGEND_LABELS[n]) for k, n in enumerate(STATE_NAMES)
             if ell > 1 or k != PARTIAL]                   # ell = 1: never partly observed
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
            fontsize=10, frameon=False)
  fig.tight_layout()
  return fig


def figure_title(fig) -> str:
  """The figure's title (``suptitle``) and its axes' titles, one per line."""
  sup = fig._suptitle  # pylint: disable=protected-access
  parts = [sup.get_text()] if sup is not None else []
  return "\n".join(parts + [ax.get_title() for ax in fig.axes if ax.get_title()])


def figure_rgb(fig) -> np.ndarray:
  """uint8 [H, W, 3]: a figure drawn on its Agg canvas."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def masking_picture(trajectory, mask_id: int, *, sampler: str = "",
                    ell: Optional[int] = None) -> np.ndarray:
  """``masking_figure`` rendered: uint8 [H, W, 3] (1000 x 560 at the default size)."""
  return figure_rgb(masking_figure(trajectory, mask_id, sampler=sampler, ell=ell))


def partial_text(digits, codec, decode_token: Callable[[int], str], *, masked: str = "_",
                 partial: str = "?") -> str:
  """Text of one sequence in a partial state: complete tokens decoded, others shown as
  ``masked`` (no digit known) or ``partial`` (some digits known)."""
  d = _digits(digits)
  if d.ndim != 2:
    raise ValueError(f"partial_text takes one sequence [L, ell], got {d.shape}.")
  st = token_states(d, codec.mask_id)
  toks = np.asarray(codec.decode(np.where(d == codec.mask_id, 0, d)))
  out = []
  for s, t in zip(st, toks):
    if s == COMPLETE:
      out.append(decode_token(int(t)) if t >= 0 else "\ufffd")   # -1: an invalid code
    else:
      out.append(masked if s == MASKED else partial)
  return "".join(out)


def consistent_level_means(digits, codec) -> np.ndarray:
  """float [..., L]: the mean token id among the tokens consistent with each token's
  observed digits (the token itself when complete; (V-1)/2 when fully masked)."""
  d = _digits(digits)
  table = codec.digit_table()                               # [V, ell]
  lead = d.shape[:-1]
  flat = d.reshape(-1, d.shape[-1])
  out = np.empty(len(flat), np.float64)
  ids = np.arange(codec.vocab_size, dtype=np.float64)
  for n, row in enumerate(flat):
    ok = np.all((row == codec.mask_id) | (table == row), axis=-1)
    out[n] = ids[ok].mean() if ok.any() else np.nan
  return out.reshape(lead)


def partial_image(digits, codec, image_shape: Sequence[int], num_levels: int = 256,
                  *, tint: float = 0.35) -> np.ndarray:
  """uint8 [H, W, 3]: an image whose pixel channels are partly masked.

  digits: [H*W*C, ell] (one image's tokens, raster order, channel fastest).  A complete
  channel shows its value, a partly observed one the mean level consistent with its
  known digits, tinted orange by ``tint``; a fully masked channel is blue (grey images)
  or 0 (colour images).
  """
  d = _digits(digits)
  h, w, c = (int(s) for s in image_shape)
  if d.shape[0] != h * w * c:
    raise ValueError(f"digits has {d.shape[0]} tokens, image_shape {tuple(image_shape)} needs "
                     f"{h * w * c}.")
  if c not in (1, 3):
    raise ValueError(f"partial_image draws 1- or 3-channel images, got {c} channels.")
  st = token_states(d, codec.mask_id).reshape(h, w, c)
  means = np.nan_to_num(consistent_level_means(d, codec)).reshape(h, w, c)
  val = dequantize(np.rint(means).astype(np.int64), num_levels).astype(np.float64)
  if c == 3:
    return np.where(st == MASKED, 0.0, val).astype(np.uint8)
  grey = np.repeat(val, 3, axis=-1)                        # [H, W, 3]
  orange = np.asarray(COLOURS["partial"], np.float64)
  part = (st[..., 0] == PARTIAL)[..., None]
  img = np.where(part, (1 - tint) * grey + tint * orange, grey)
  img = np.where((st[..., 0] == MASKED)[..., None], np.asarray(COLOURS["mask_pixel"]), img)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)
