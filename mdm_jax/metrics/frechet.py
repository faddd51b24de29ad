"""The Frechet distance between two sets of features (the FID formula), in float64.

Gaussian fits of the features, tr((S1 S2)^(1/2)) from two symmetric eigendecompositions.
Used with the project's own classifier features (``classifier.py``) and with the FID
Inception-v3 features (``inception.py``).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) in float64 of [N, D] features (N >= 2)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"feature_stats needs [N >= 2, D] features, got {f.shape}.")
  return f.mean(0), np.cov(f, rowvar=False)


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, by two symmetric eigendecompositions.

  S1 S2 has the eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the
  trace of its square root is the sum of their square roots.  Unlike
  ``scipy.linalg.sqrtm`` of the non-symmetric product, this needs no complex Schur
  form, no regularisation of singular covariances (round-off negatives are clipped
  to 0), and is ~7x faster for 2048-d Inception features.
  """
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root1 @ sigma2 @ root1
  return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (the FID formula)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2,
                                                                                  np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"Mismatched statistics: {mu1.shape}/{mu2.shape}, {s1.shape}/{s2.shape}.")
  diff = mu1 - mu2
  fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
  return max(fd, 0.0)


def frechet_distance_of_features(f1, f2) -> float:
  return frechet_distance(*feature_stats(f1), *feature_stats(f2))
