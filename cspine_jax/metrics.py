r"""The RSNA 2022 metric and the clinical figures, in numpy, and a scorer for Kaggle submissions.

  python -m cspine_jax.metrics --solution=train.csv --submission=submission.csv

prints per-target figures and, as its last line, the RSNA score (lower is better). Exit 2 when a
flag is missing or a file is not there, 1 when a file is malformed (the message names the file,
the line and what is wrong: a bad header, a repeated study or row_id, a label that is not 0/1, a
probability that is not a number in [0, 1]).

RSNA 2022 weighted multi-label log loss (DESIGN.md section 1): per study, over the 8 targets
(patient_overall, C1..C7), weights 7,1,...,1 where the label is negative and 14,2,...,2 where it is
positive; the study's loss is sum(w * bce) / sum(w); the score is the mean over studies;
probabilities are clipped to [1e-15, 1 - 1e-15].
"""
from __future__ import annotations

import csv
import io
import os

from absl import flags
import numpy as np

from cspine_jax import calibration
from cspine_jax import cli
from cspine_jax import constants
from cspine_jax.data import kaggle
from cspine_jax.data import store

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
  """Everything eval prints: RSNA score, per-target AUC, patient sensitivity/specificity, the
  expected calibration error (10 equal-width bins: ``ece`` pooled over the 8 targets,
  ``ece_<target>`` each; `calibration.ece_report`)."""
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
  out.update(calibration.ece_report(probs, labels))
  return out


# ---------------------------------------------------------------------------------------------
# Kaggle files.
# ---------------------------------------------------------------------------------------------


def read_solution(path: str) -> dict[str, np.ndarray]:
  """train.csv layout (StudyInstanceUID, patient_overall, C1..C7) -> {uid: (8,) labels}.

  ValueError naming the file and line (`kaggle.read_labels`: a missing column, an empty or
  repeated StudyInstanceUID, a label that is not 0 or 1), or no study at all.
  """
  out = {uid: np.array(labels, float) for _, uid, labels in kaggle.read_labels(path)}
  if not out:
    raise ValueError(f'{path}: no study (only a header)')
  return out


def read_submission(path: str) -> dict[str, np.ndarray]:
  """Kaggle submission (row_id = <UID>_<target>, fractured) -> {uid: (8,) probabilities}.

  ValueError naming the file and line: a missing column, a row_id that is not <UID>_<target> or
  repeats an earlier one (Kaggle would not say which counts), a probability that is not a number
  in [0, 1] (NaN included), a study without all 8 rows.
  """
  values: dict[str, dict[str, float]] = {}
  lines: dict[str, int] = {}
  for line, row in kaggle.csv_rows(path, ('row_id', 'fractured')):
    row_id = (row['row_id'] or '').strip()
    uid, _, target = row_id.rpartition('_')
    if target not in constants.TARGETS:
      # patient_overall itself contains an underscore.
      uid, _, rest = row_id.partition('_')
      target = rest
    if target not in constants.TARGETS or not uid:
      raise ValueError(f'{path}:{line}: row_id {kaggle.cell(row["row_id"])} is not <UID>_<target> '
                       f'(target one of {",".join(constants.TARGETS)})')
    if row_id in lines:
      raise ValueError(f'{path}:{line}: row_id {row_id} is already on line {lines[row_id]}')
    lines[row_id] = line
    try:
      p = float(row['fractured'])
    except (TypeError, ValueError):
      raise ValueError(f'{path}:{line}: fractured {kaggle.cell(row["fractured"])} is not a '
                       'number') from None
    if not 0 <= p <= 1:  # NaN too: every comparison with it is false
      raise ValueError(f'{path}:{line}: fractured={p} is not a probability in [0, 1]')
    values.setdefault(uid, {})[target] = p
  if not values:
    raise ValueError(f'{path}: no prediction (only a header)')
  out = {}
  for uid, d in values.items():
    missing = [t for t in constants.TARGETS if t not in d]
    if missing:
      raise ValueError(f'{path}: study {uid} has no row for {missing}')
    out[uid] = np.array([d[t] for t in constants.TARGETS])
  return out


def write_submission(path: str, uids, probs: np.ndarray) -> None:
  """Writes row_id,fractured for every study and target (atomically, a unique temporary: two
  writers never share one, and a killed run leaves no half file under ``path``)."""
  f = io.StringIO(newline='')
  w = csv.writer(f)
  w.writerow(['row_id', 'fractured'])
  for uid, p in zip(uids, np.asarray(probs)):
    for name, value in zip(constants.TARGETS, p):
      w.writerow([f'{uid}_{name}', f'{float(value):.6f}'])
  store.atomic_write(path, f.getvalue())


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

  def run(args):
    fl = flags.FLAGS
    if len(args) > 1:
      raise cli.UsageError(f'unexpected arguments {args[1:]} (flags are --name=value)')
    if not fl.solution or not fl.submission:
      raise cli.UsageError('--solution and --submission are required')
    for name in ('solution', 'submission'):
      if not os.path.isfile(fl[name].value):
        raise cli.UsageError(f'--{name}={fl[name].value}: no such file')
    # A malformed file raises ValueError naming it: cli.run ends with that line and exit 1.
    r = score_files(fl.solution, fl.submission, fl.threshold)
    for k, v in r.items():
      print(f'{k}: {v:.6f}' if isinstance(v, float) else f'{k}: {v}')
    print(f'{r["rsna_score"]:.6f}')

  cli.run(run, argv=argv)


if __name__ == '__main__':
  main()
