"""Calibration of the classifier's probabilities (numpy only): per-target temperature scaling, a
``patient_overall`` consistent with the vertebrae, and the expected calibration error.

Temperature scaling (Guo et al., ICML 2017): one scalar T per target, p = sigmoid(logit / T),
T fitted by minimising the log loss on a validation fold of the training studies (never on the
set whose score is reported: `python -m cspine_jax.calibrate` fits on the workdir's
``data.fold``). A temperature changes how confident the model is, never its ranking: every AUC
stays as it was. The log loss of sigmoid(beta * z) is convex in beta = 1 / T (logistic regression
on one feature without an intercept), so a bounded 1-D search finds its global minimum.

Small validation folds (the demo's holds ~10 studies, a rare vertebra 0-1 positives):
- Platt's targets (Platt 1999, "Probabilistic outputs for support vector machines"; also
  scikit-learn's sigmoid calibration): positives count as (N+ + 1) / (N+ + 2) and negatives as
  1 / (N- + 2) instead of 1 and 0. Without them a fold the model happens to rank perfectly
  drives T to 0 (probabilities of exactly 0 and 1, an unbounded loss on the first mistake on
  new studies); with them the optimum is finite and shrinks towards the counts' evidence.
- A target whose fold has fewer than ``min_class_count`` positives or negatives has no
  temperature of its own (nothing to fit: with negatives only, "smaller is better" without end):
  a vertebra takes the temperature fitted on C1..C7 pooled, the patient (or a vertebra when even
  the pool lacks a class) keeps T = 1. ``sources`` says which, per target.

The patient probability (``consistent_patient``). patient_overall is the OR of C1..C7 (DESIGN.md
section 1), so P(patient) >= P(Ck) for every k, whatever the correlation between vertebrae.
Temperatures fitted per target can break that (a sharpened C6 above a softened patient), and the
RSNA metric weights the patient 7-14 times a vertebra. The rule here is the smallest change that
restores consistency: p_patient = max(p_patient calibrated, max_k p_Ck calibrated). Not the
noisy-OR 1 - prod(1 - p_k), which assumes independent vertebrae: fractures cluster (on the real
data 1.5 fractured vertebrae per positive patient), and the noisy-OR of the training prevalences
is 0.535 where the patient rate is 0.476, so it would push every patient probability up. The
patient's own calibrated output (fitted on the patient label itself) stays wherever it is already
consistent.

ECE (``expected_calibration_error``): equal-width bins on [0, 1] (bin k holds k/B <= p < (k+1)/B,
p = 1 in the last), sum over non-empty bins of (n_b / N) * |mean p_b - mean y_b|. ``ece`` in the
reports pools every (study, target) pair; ``ece_<target>`` is one target's.
"""
from __future__ import annotations

import json
import os

import numpy as np
from scipy import optimize

from cspine_jax import cli
from cspine_jax import constants
from cspine_jax.data import store

FILE = 'calibration.json'  # in the training workdir
T_BOUNDS = (0.05, 20.0)  # a safety net: with Platt's targets the optimum is finite anyway
MIN_CLASS_COUNT = 2
PATIENT_RULE = 'max(patient, max vertebra)'
# Probabilities are turned back into logits (eval and calibrate get the model's sigmoid output):
# float32 sigmoid saturates near |logit| 16.6, so clip inside that.
PROB_EPS = 1e-7


def logits_from_probs(probs) -> np.ndarray:
  p = np.clip(np.asarray(probs, np.float64), PROB_EPS, 1 - PROB_EPS)
  return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
  z = np.asarray(z, np.float64)
  return np.exp(-np.logaddexp(0.0, -z))


def log_loss(logits, targets) -> float:
  """Mean binary cross-entropy of sigmoid(logits) against (soft) targets, computed stably."""
  z, t = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
  return float(np.mean(np.logaddexp(0.0, z) - t * z))


def platt_targets(labels) -> np.ndarray:
  """Platt's targets: (N+ + 1) / (N+ + 2) for the positives, 1 / (N- + 2) for the negatives."""
  y = np.asarray(labels) > 0.5
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  return np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def fit_temperature(logits, targets, bounds=T_BOUNDS) -> float:
  """The T in ``bounds`` minimising log_loss(logits / T, targets) (targets may be soft)."""
  z, t = np.ravel(np.asarray(logits, np.float64)), np.ravel(np.asarray(targets, np.float64))
  if z.shape != t.shape or not z.size:
    raise ValueError(f'logits {z.shape} and targets {t.shape}: same non-empty size needed')
  lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]  # beta = 1 / T
  res = optimize.minimize_scalar(lambda b: log_loss(b * z, t), bounds=(lo, hi), method='bounded',
                                 options={'xatol': 1e-9})
  beta = float(res.x)
  # The bounded search never evaluates the ends themselves: a convex loss still falling there
  # (separable data without Platt's targets) has its minimum at the bound.
  for end in (lo, hi):
    if log_loss(end * z, t) <= log_loss(beta * z, t):
      beta = end
  return 1.0 / beta


def fit_temperatures(logits, labels, *, smooth: bool = True,
                     min_class_count: int = MIN_CLASS_COUNT, bounds=T_BOUNDS
                     ) -> tuple[np.ndarray, list[str]]:
  """Per target (columns of (N, 8) ``logits`` and 0/1 ``labels``, TARGETS order): (T (8,),
  sources (8,)), a source being 'own', 'pooled vertebrae' or 'none (T = 1)' (module docstring).

  ``smooth``: Platt's targets (per target, or per pool); False fits the 0/1 labels themselves.
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  if z.shape != y.shape or z.ndim != 2 or z.shape[1] != constants.NUM_TARGETS:
    raise ValueError(f'logits {z.shape} and labels {y.shape} must both be (N, 8)')

  def enough(col):
    pos = int((col > 0.5).sum())
    return min(pos, col.size - pos) >= min_class_count

  def fit(zc, yc):
    return fit_temperature(zc, platt_targets(yc) if smooth else yc, bounds)

  pooled = None
  if enough(y[:, 1:].ravel()):
    pooled = fit(z[:, 1:].ravel(), y[:, 1:].ravel())
  temps, sources = np.ones(constants.NUM_TARGETS), []
  for j in range(constants.NUM_TARGETS):
    if enough(y[:, j]):
      temps[j] = fit(z[:, j], y[:, j])
      sources.append('own')
    elif j > 0 and pooled is not None:
      temps[j] = pooled
      sources.append('pooled vertebrae')
    else:
      sources.append('none (T = 1)')
  return temps, sources


def consistent_patient(probs) -> np.ndarray:
  """(N, 8) probabilities with patient_overall raised to the largest vertebra's where below it
  (PATIENT_RULE; why this rule: the module docstring)."""
  p = np.array(probs, np.float64)
  p[:, 0] = np.maximum(p[:, 0], p[:, 1:].max(axis=1))
  return p


def apply_temperatures(probs, temperatures) -> np.ndarray:
  """(N, 8) model probabilities -> calibrated: each target's logit / its T, then the patient
  made consistent with the vertebrae."""
  t = np.asarray(temperatures, np.float64).reshape(1, -1)
  return consistent_patient(sigmoid(logits_from_probs(probs) / t))


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
  """ECE with ``bins`` equal-width bins over every entry of ``probs`` (any shape); nan if empty."""
  p = np.ravel(np.asarray(probs, np.float64))
  y = np.ravel(np.asarray(labels, np.float64))
  if p.shape != y.shape:
    raise ValueError(f'probs {p.shape} and labels {y.shape} differ in size')
  if not p.size:
    return float('nan')
  idx = np.minimum((p * bins).astype(np.int64), bins - 1)
  count = np.bincount(idx, minlength=bins)
  gap = np.abs(np.bincount(idx, p, bins) - np.bincount(idx, y, bins))  # n_b * |mean p - mean y|
  return float(gap[count > 0].sum() / p.size)


def ece_report(probs, labels, bins: int = 10) -> dict:
  """{'ece': pooled over every target, 'ece_<target>': each target's}."""
  probs, labels = np.asarray(probs), np.asarray(labels)
  out = {'ece': expected_calibration_error(probs, labels, bins)}
  for i, name in enumerate(constants.TARGETS):
    out[f'ece_{name}'] = expected_calibration_error(probs[:, i], labels[:, i], bins)
  return out


# ---------------------------------------------------------------------------------------------
# W/calibration.json
# ---------------------------------------------------------------------------------------------


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def save(workdir: str, record: dict) -> str:
  out = path(workdir)
  store.atomic_write(out, json.dumps(record, indent=2) + '\n')
  return out


def load(workdir: str) -> dict | None:
  """The workdir's calibration record, or None; ValueError naming the file if it is malformed."""
  p = path(workdir)
  if not os.path.isfile(p):
    return None
  try:
    with open(p) as f:
      record = json.load(f)
    temps = record['temperatures']
    values = [float(temps[name]) for name in constants.TARGETS]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{p}: not a calibration record ({type(e).__name__}: {e}); rerun python -m '
                     'cspine_jax.calibrate or delete it') from None
  if not all(np.isfinite(v) and v > 0 for v in values):
    raise ValueError(f'{p}: temperatures must be finite and > 0, got {values}')
  return record


def temperatures_of(record: dict) -> np.ndarray:
  return np.array([float(record['temperatures'][n]) for n in constants.TARGETS])


def for_step(workdir: str, step: int, enabled: bool = True) -> tuple[dict | None, str]:
  """(the workdir's calibration record if it applies to ``step``, else None; what was done)."""
  if not enabled:
    return None, 'off (--nocalibrate)'
  try:
    record = load(workdir)
  except ValueError as e:
    raise cli.Failure(str(e)) from None
  if record is None:
    return None, (f'none (no {FILE} in the workdir: python -m cspine_jax.calibrate '
                  'fits one on the validation fold)')
  fitted = record.get('checkpoint_step')
  if fitted != step:
    cli.warn(f'{path(workdir)} was fitted on checkpoint step {fitted}, this is step '
             f'{step}: not applied (rerun python -m cspine_jax.calibrate --workdir={workdir} '
             f'--checkpoint={step})')
    return None, f'not applied (fitted on step {fitted}, evaluating step {step})'
  return record, path(workdir)
