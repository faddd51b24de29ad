"""The decoding-order picture of a per-position schedule, written after every evaluation.

``write_order`` writes ``<workdir>/order/step_N.{json,png}``: the mean masking (=
unmasking) time E[tau_i] and the mean decoding rank of every position, and a picture of
how they moved over the steps written so far.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np

from mdm_jax.core import paths

from mdm_jax.pictures.pixels import write_png


def write_order(summary: Dict[str, Any], workdir: str) -> Tuple[str, str]:
  """Writes <workdir>/order/step_N.json and .png; returns their paths.

  ``summary`` is a schedule's ``order_summary`` (step, schedule, seq_len,
  mean_unmask_time, mean_decode_rank).  The PNG shows (top) a heat map of the mean unmasking time of every position
  at every step written so far, and (bottom) this step's mean unmasking time
  and mean decoding rank against position.
  """
  d = paths.join(workdir, "order")
  paths.makedirs(d)
  summ = summary
  step, length = int(summ["step"]), int(summ["seq_len"])
  jpath = paths.join(d, f"step_{step}.json")
  with paths.open(jpath, "w") as f:
    json.dump(summ, f)
  history = []
  for p in paths.glob(d, "step_*.json"):
    try:
      with paths.open(p) as f:
        h = json.load(f)
    except (OSError, ValueError):
      continue
    if len(h.get("mean_unmask_time", [])) == length:
      history.append((int(h["step"]), h["mean_unmask_time"]))
  history.sort()
  ppath = paths.join(d, f"step_{step}.png")
  _plot_order(summ, history, ppath)
  return jpath, ppath


def _plot_order(summ, history, path):
  times = np.asarray([h for _, h in history], np.float32)
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    write_png(path, _grey(times))
    return
  fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 6), gridspec_kw={"height_ratios": [1.2, 1]})
  im = ax0.imshow(times, aspect="auto", cmap="viridis", interpolation="nearest",
                  extent=(-0.5, times.shape[1] - 0.5, len(history) - 0.5, -0.5))
  ax0.set_yticks(range(len(history)))
  ax0.set_yticklabels([str(s) for s, _ in history])
  ax0.set_ylabel("training step")
  ax0.set_title(f"{summ['schedule']}: mean unmasking time per position\n"
                "(sampling runs t = 1 -> 0; bright = decoded early)", fontsize=10)
  fig.colorbar(im, ax=ax0, label="E[tau_i]")
  x = np.arange(summ["seq_len"])
  ax1.plot(x, summ["mean_unmask_time"], color="tab:blue", label="E[tau_i]")
  ax1.set_xlabel("position i")
  ax1.set_ylabel("mean unmasking time", color="tab:blue")
  ax2 = ax1.twinx()
  ax2.plot(x, summ["mean_decode_rank"], color="tab:red", alpha=0.7, label="mean decode rank")
  ax2.set_ylabel("mean decode rank (0 = first)", color="tab:red")
  ax1.set_title(f"step {summ['step']}")
  fig.tight_layout()
  with paths.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def _grey(img) -> np.ndarray:
  """An 8-bit grey picture of a [rows, L] array, 8 x 4 pixels per value."""
  img = np.atleast_2d(np.asarray(img, np.float32))
  lo, hi = float(np.min(img)), float(np.max(img))
  a = np.uint8(np.round(255 * (img - lo) / max(hi - lo, 1e-12)))
  return np.repeat(np.repeat(a, 8, axis=0), 4, axis=1)
