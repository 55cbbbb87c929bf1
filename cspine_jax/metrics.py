r"""The RSNA 2022 metric and the clinical figures, in numpy, and a scorer for Kaggle submissions.

  python -m cspine_jax.metrics --solution=train.csv --submission=submission.csv

prints per-target figures and, as its last line, the RSNA score (lower is better).

RSNA 2022 weighted multi-label log loss (DESIGN.md section 1): per study, over the 8 targets
(patient_overall, C1..C7), weights 7,1,...,1 where the label is negative and 14,2,...,2 where it is
positive; the study's loss is sum(w * bce) / sum(w); the score is the mean over studies;
probabilities are clipped to [1e-15, 1 - 1e-15].
"""
from __future__ import annotations

import csv
import os
import sys

from absl import app
from absl import flags
import numpy as np

from cspine_jax import constants

EPS = 1e-15


def rsna_weights(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  return np.where(labels > 0.5, np.asarray(constants.POSITIVE_WEIGHTS),
                  np.asarray(constants.NEGATIVE_WEIGHTS))


def rsna_study_losses(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """(N,) weighted log loss of each study; labels and probs are (N, 8) in TARGETS order."""
  labels = np.asarray(labels, np.float64)
  p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
  if labels.shape != p.shape or labels.ndim != 2 or labels.shape[1] != constants.NUM_TARGETS:
    raise ValueError(f'labels {labels.shape} and probs {p.shape} must both be (N, 8)')
  bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  w = rsna_weights(labels)
  return (w * bce).sum(1) / w.sum(1)


def rsna_score(labels: np.ndarray, probs: np.ndarray) -> float:
  return float(rsna_study_losses(labels, probs).mean())


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan if one class."""
  y = np.asarray(y).astype(bool)
  score = np.asarray(score, np.float64)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  order = np.argsort(score, kind='mergesort')
  ranks = np.empty(len(score), np.float64)
  sorted_scores = score[order]
  # Average ranks over ties.
  boundaries = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1, len(score)]
  for a, b in zip(boundaries[:-1], boundaries[1:]):
    ranks[order[a:b]] = 0.5 * (a + b - 1) + 1
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(false positive rates, true positive rates) at every distinct threshold, from (0,0)."""
  y = np.asarray(y).astype(bool)
  order = np.argsort(-np.asarray(score, np.float64), kind='mergesort')
  s, y = np.asarray(score)[order], y[order]
  last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
  tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
  tpr = np.r_[0, tps / max(1, y.sum())]
  fpr = np.r_[0, fps / max(1, (~y).sum())]
  return fpr, tpr


def sensitivity_specificity(y: np.ndarray, score: np.ndarray, threshold: float
                            ) -> tuple[float, float]:
  y = np.asarray(y).astype(bool)
  pred = np.asarray(score) >= threshold
  sens = float((pred & y).sum() / y.sum()) if y.any() else float('nan')
  spec = float((~pred & ~y).sum() / (~y).sum()) if (~y).any() else float('nan')
  return sens, spec


def report(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
  """Everything eval prints: RSNA score, per-target AUC, patient sensitivity/specificity."""
  labels, probs = np.asarray(labels), np.asarray(probs)
  out = {'rsna_score': rsna_score(labels, probs), 'scored_studies': int(len(labels))}
  for i, name in enumerate(constants.TARGETS):
    out[f'auc_{name}'] = roc_auc(labels[:, i], probs[:, i])
  aucs = [out[f'auc_{n}'] for n in constants.TARGETS if np.isfinite(out[f'auc_{n}'])]
  out['auc_mean'] = float(np.mean(aucs)) if aucs else float('nan')
  sens, spec = sensitivity_specificity(labels[:, 0], probs[:, 0], threshold)
  out.update(threshold=threshold, patient_sensitivity=sens, patient_specificity=spec)
  # The constant-prevalence baseline on the same studies, for honest comparison.
  prevalence = np.broadcast_to(labels.mean(0, keepdims=True), labels.shape)
  out['constant_prevalence_score'] = rsna_score(labels, prevalence)
  return out


# ---------------------------------------------------------------------------------------------
# Kaggle files.
# ---------------------------------------------------------------------------------------------


def read_solution(path: str) -> dict[str, np.ndarray]:
  """train.csv layout (StudyInstanceUID, patient_overall, C1..C7) -> {uid: (8,) labels}."""
  out = {}
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = [t for t in ('StudyInstanceUID',) + constants.TARGETS
               if t not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f'{path}: missing columns {missing}')
    for row in reader:
      out[row['StudyInstanceUID']] = np.array([float(row[t]) for t in constants.TARGETS])
  return out


def read_submission(path: str) -> dict[str, np.ndarray]:
  """Kaggle submission (row_id = <UID>_<target>, fractured) -> {uid: (8,) probabilities}."""
  values: dict[str, dict[str, float]] = {}
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    if set(reader.fieldnames or []) < {'row_id', 'fractured'}:
      raise ValueError(f'{path}: needs columns row_id,fractured')
    for line, row in enumerate(reader, start=2):
      uid, _, target = row['row_id'].rpartition('_')
      if target not in constants.TARGETS:
        # patient_overall itself contains an underscore.
        uid, _, rest = row['row_id'].partition('_')
        target = rest
      if target not in constants.TARGETS or not uid:
        raise ValueError(f'{path}:{line}: row_id {row["row_id"]!r} is not <UID>_<target>')
      p = float(row['fractured'])
      if not 0 <= p <= 1:
        raise ValueError(f'{path}:{line}: fractured={p} is not a probability')
      values.setdefault(uid, {})[target] = p
  out = {}
  for uid, d in values.items():
    missing = [t for t in constants.TARGETS if t not in d]
    if missing:
      raise ValueError(f'{path}: study {uid} has no row for {missing}')
    out[uid] = np.array([d[t] for t in constants.TARGETS])
  return out


def write_submission(path: str, uids, probs: np.ndarray) -> None:
  """Writes row_id,fractured for every study and target (atomically)."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['row_id', 'fractured'])
    for uid, p in zip(uids, np.asarray(probs)):
      for name, value in zip(constants.TARGETS, p):
        w.writerow([f'{uid}_{name}', f'{float(value):.6f}'])
  os.replace(tmp, path)


def score_files(solution: str, submission: str, threshold: float = 0.5) -> dict:
  """The report of a submission file against a train.csv-style solution file."""
  truth, preds = read_solution(solution), read_submission(submission)
  missing = sorted(set(truth) - set(preds))
  if missing:
    raise ValueError(f'{submission}: no predictions for {len(missing)} studies of the solution, '
                     f'e.g. {missing[0]}')
  uids = sorted(truth)
  return report(np.stack([truth[u] for u in uids]), np.stack([preds[u] for u in uids]),
                threshold)


def main(argv=None) -> None:
  flags.DEFINE_string('solution', None, 'train.csv-style labels.')
  flags.DEFINE_string('submission', None, 'Kaggle submission: row_id,fractured.')
  flags.DEFINE_float('threshold', 0.5, 'Threshold for patient sensitivity/specificity.')

  def run(_):
    fl = flags.FLAGS
    if not fl.solution or not fl.submission:
      raise app.UsageError('--solution and --submission are required')
    try:
      r = score_files(fl.solution, fl.submission, fl.threshold)
    except (OSError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    for k, v in r.items():
      print(f'{k}: {v:.6f}' if isinstance(v, float) else f'{k}: {v}')
    print(f'{r["rsna_score"]:.6f}')

  app.run(run, argv=argv)


if __name__ == '__main__':
  main()
