"""Dice scores of label maps (the localizer's metric), numpy only.

Dice of class c between a prediction P and the truth T: 2 |P=c & T=c| / (|P=c| + |T=c|); NaN
where the class is absent from both (nothing to score: a scan that stops above C7 is not a
perfect C7 nor a failed one), so means skip it.
"""
from __future__ import annotations

import warnings

import numpy as np

from cspine_jax import constants


def dice_per_class(pred: np.ndarray, true: np.ndarray,
                   num_classes: int = 1 + len(constants.VERTEBRAE)) -> np.ndarray:
  """(num_classes - 1,) Dice of classes 1..num_classes-1 (C1..C7), NaN where absent in both."""
  pred = np.asarray(pred).ravel().astype(np.int64)
  true = np.asarray(true).ravel().astype(np.int64)
  if pred.shape != true.shape:
    raise ValueError(f'shapes differ: {pred.shape} vs {true.shape}')
  k = int(num_classes)
  # One pass: the joint histogram (confusion matrix) gives every class's counts at once.
  joint = np.bincount(true * k + np.clip(pred, 0, k - 1), minlength=k * k).reshape(k, k)
  inter = np.diag(joint)[1:].astype(float)
  sizes = joint.sum(0)[1:] + joint.sum(1)[1:]
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(sizes > 0, 2.0 * inter / sizes, np.nan)


def summarize(per_study: np.ndarray) -> dict[str, float]:
  """{dice_C1..dice_C7, dice_mean} from (studies, 7) per-class Dice (NaN-aware means)."""
  per_study = np.asarray(per_study, float).reshape(-1, len(constants.VERTEBRAE))
  out = {}
  with np.errstate(invalid='ignore'), _quiet():
    for i, name in enumerate(constants.VERTEBRAE):
      out[f'dice_{name}'] = float(np.nanmean(per_study[:, i]))
    out['dice_mean'] = float(np.nanmean(per_study))
  return out


class _quiet:
  """Silences numpy's 'Mean of empty slice' (an all-NaN column is reported as NaN)."""

  def __enter__(self):
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter('ignore', RuntimeWarning)

  def __exit__(self, *exc):
    return self._w.__exit__(*exc)
