"""The RSNA metric against hand-computed values and an independent per-element implementation;
AUC and ROC against scikit-learn; the CLI on files."""
import math
import subprocess
import sys

import numpy as np
import pytest

from cspine_jax import constants
from cspine_jax import metrics


def _independent_rsna(labels, probs):
  """Direct transcription of DESIGN.md section 1, one element at a time."""
  total = 0.0
  for y_row, p_row in zip(labels, probs):
    num = den = 0.0
    for j, (y, p) in enumerate(zip(y_row, p_row)):
      p = min(max(p, 1e-15), 1 - 1e-15)
      w = (14.0 if j == 0 else 2.0) if y == 1 else (7.0 if j == 0 else 1.0)
      num += w * -(y * math.log(p) + (1 - y) * math.log(1 - p))
      den += w
    total += num / den
  return total / len(labels)


def test_hand_computed_values():
  # All negative, every p = 0.5: every bce is ln 2, so the score is ln 2.
  assert metrics.rsna_score(np.zeros((1, 8)), np.full((1, 8), 0.5)) == pytest.approx(math.log(2))
  # One study: patient and C1 positive with p = 0.9, others negative with p = 0.1.
  y = np.array([[1, 1, 0, 0, 0, 0, 0, 0]])
  p = np.array([[0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
  # every bce = -ln 0.9; weights 14 + 2 + 6*1 = 22 -> loss = -ln 0.9.
  assert metrics.rsna_score(y, p) == pytest.approx(-math.log(0.9))
  # Same labels, the positive patient predicted at 0.2: (14*-ln .2 + 2*-ln .9 + 6*-ln .9) / 22.
  p2 = p.copy()
  p2[0, 0] = 0.2
  expected = (14 * -math.log(0.2) + 8 * -math.log(0.9)) / 22
  assert metrics.rsna_score(y, p2) == pytest.approx(expected)
  # Certain and wrong is clipped to 1e-15, not infinite.
  assert metrics.rsna_score(np.ones((1, 8)), np.zeros((1, 8))) == pytest.approx(-math.log(1e-15))


def test_against_independent_implementation_on_random_submissions():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = rng.integers(1, 30)
    labels = (rng.random((n, 8)) < rng.random(8)).astype(int)
    labels[:, 0] = labels[:, 1:].max(1)
    probs = rng.random((n, 8)) ** rng.uniform(0.2, 5)
    probs[rng.random((n, 8)) < 0.05] = 0.0  # exercise clipping
    assert metrics.rsna_score(labels, probs) == pytest.approx(
        _independent_rsna(labels, probs), rel=1e-12)


def test_constant_prediction_reference_point():
  """DESIGN.md: a constant prediction scores ~0.56 on labels with the real data's rates."""
  rng = np.random.default_rng(1)
  rates = np.array(constants.POSITIVE_RATES[1:])
  labels = np.zeros((20000, 8))
  labels[:, 1:] = rng.random((20000, 7)) < rates
  labels[:, 0] = labels[:, 1:].max(1)
  score = metrics.rsna_score(labels, np.broadcast_to(labels.mean(0), labels.shape))
  assert 0.45 < score < 0.65


def test_auc_and_roc_against_sklearn():
  sk = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(2)
  for _ in range(10):
    y = rng.random(50) < 0.3
    s = np.round(rng.random(50) + 0.5 * y, 1)  # rounding makes ties
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr = metrics.roc_curve(y, s)
    fpr_ref, tpr_ref, _ = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_ref)
    np.testing.assert_allclose(tpr, tpr_ref)
  assert math.isnan(metrics.roc_auc(np.zeros(5), np.arange(5)))


def test_sensitivity_specificity():
  y = np.array([1, 1, 1, 0, 0])
  s = np.array([0.9, 0.4, 0.6, 0.7, 0.1])
  assert metrics.sensitivity_specificity(y, s, 0.5) == (pytest.approx(2 / 3), 0.5)


def _write_files(tmp_path, labels, probs, uids):
  sol = tmp_path / 'train.csv'
  with open(sol, 'w') as f:
    f.write('StudyInstanceUID,' + ','.join(constants.TARGETS) + '\n')
    for u, row in zip(uids, labels):
      f.write(u + ',' + ','.join(str(int(v)) for v in row) + '\n')
  sub = tmp_path / 'submission.csv'
  metrics.write_submission(str(sub), uids, probs)
  return sol, sub


def test_cli_prints_score_last(tmp_path):
  rng = np.random.default_rng(3)
  uids = [f'1.2.826.0.1.3680043.{i}' for i in range(12)]
  labels = (rng.random((12, 8)) < 0.3).astype(int)
  probs = rng.random((12, 8))
  sol, sub = _write_files(tmp_path, labels, np.round(probs, 6), uids)
  out = subprocess.run([sys.executable, '-m', 'cspine_jax.metrics', f'--solution={sol}',
                        f'--submission={sub}'], capture_output=True, text=True, check=True)
  last = out.stdout.strip().splitlines()[-1]
  assert float(last) == pytest.approx(_independent_rsna(labels, np.round(probs, 6)), abs=1e-6)


def test_submission_errors_name_the_problem(tmp_path):
  uids = ['1.2.3', '1.2.4']
  sol, sub = _write_files(tmp_path, np.zeros((2, 8)), np.full((2, 8), 0.5), uids)
  lines = open(sub).read().splitlines()
  with open(sub, 'w') as f:
    f.write('\n'.join(l for l in lines if l != '1.2.4_C3,0.500000') + '\n')
  with pytest.raises(ValueError, match=r"1\.2\.4 has no row for \['C3'\]"):
    metrics.score_files(str(sol), str(sub))
  out = _cli(sol, sub)
  # A malformed file is a failure (1); 2 is kept for usage errors (cspine_jax/cli.py).
  assert out.returncode == 1 and 'C3' in out.stderr


def _cli(sol, sub):
  return subprocess.run([sys.executable, '-m', 'cspine_jax.metrics', f'--solution={sol}',
                         f'--submission={sub}'], capture_output=True, text=True)


def _edit_line(path, line_no, new):
  """Replaces line ``line_no`` (1-based) of ``path``."""
  lines = open(path).read().splitlines()
  lines[line_no - 1] = new
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _append(path, text):
  with open(path, 'a') as f:
    f.write(text + '\n')


# (which file, edit, message expected): each once accepted silently or failed with a bare
# KeyError/ValueError/TypeError that named neither the file nor the line.
BAD_FILES = {
    'submission_header': ('sub', lambda p: _edit_line(p, 1, 'id,fractured'),
                          r"{path}: missing columns \['row_id'\]"),
    'submission_duplicate_row_id': ('sub', lambda p: _append(p, '1.2.3_C1,0.900000'),
                                    r'{path}:18: row_id 1\.2\.3_C1 is already on line 3'),
    'submission_not_a_number': ('sub', lambda p: _edit_line(p, 4, '1.2.3_C2,abc'),
                                r"{path}:4: fractured 'abc' is not a number"),
    'submission_empty_probability': ('sub', lambda p: _edit_line(p, 4, '1.2.3_C2,'),
                                     r'{path}:4: fractured empty is not a number'),
    'submission_short_row': ('sub', lambda p: _edit_line(p, 4, '1.2.3_C2'),
                             r'{path}:4: fractured missing'),
    'submission_nan': ('sub', lambda p: _edit_line(p, 4, '1.2.3_C2,nan'),
                       r'{path}:4: fractured=nan is not a probability in \[0, 1\]'),
    'submission_above_one': ('sub', lambda p: _edit_line(p, 4, '1.2.3_C2,1.5'),
                             r'{path}:4: fractured=1.5 is not a probability in \[0, 1\]'),
    'solution_header': ('sol', lambda p: _edit_line(p, 1, 'uid,' + ','.join(constants.TARGETS)),
                        r"{path}: missing columns \['StudyInstanceUID'\]"),
    'solution_duplicate_study': ('sol', lambda p: _append(p, '1.2.4,' + ','.join('1' * 8)),
                                 r'{path}:4: StudyInstanceUID 1\.2\.4 is already on line 3'),
    'solution_label_two': ('sol', lambda p: _edit_line(p, 2, '1.2.3,2,1,0,0,0,0,0,0'),
                           r'{path}:2: column patient_overall: .2. is not 0 or 1'),
    'solution_label_yes': ('sol', lambda p: _edit_line(p, 3, '1.2.4,0,0,0,yes,0,0,0,0'),
                           r"{path}:3: column C3: 'yes' is not 0 or 1"),
    'solution_label_empty': ('sol', lambda p: _edit_line(p, 3, '1.2.4,0,0,0,0,,0,0,0'),
                             r'{path}:3: column C4: empty is not 0 or 1'),
}


@pytest.mark.parametrize('case', sorted(BAD_FILES))
def test_malformed_files_are_named_with_their_line(tmp_path, case):
  which, edit, message = BAD_FILES[case]
  sol, sub = _write_files(tmp_path, np.zeros((2, 8)), np.full((2, 8), 0.5), ['1.2.3', '1.2.4'])
  path = sol if which == 'sol' else sub
  edit(str(path))
  with pytest.raises(ValueError, match=message.format(path=str(path).replace('.', r'\.'))):
    metrics.score_files(str(sol), str(sub))


def test_cli_exit_codes_and_one_line(tmp_path):
  """A malformed file: exit 1; a file that is not there or a missing flag: exit 2 (usage). Each
  ends with one line on stderr and no traceback; before, a bad header gave a KeyError traceback."""
  sol, sub = _write_files(tmp_path, np.zeros((2, 8)), np.full((2, 8), 0.5), ['1.2.3', '1.2.4'])
  _edit_line(str(sub), 1, 'id,fractured')
  nope = tmp_path / 'nope.csv'
  for out, code, text in [
      (_cli(sol, sub), 1, f'error: {sub}: missing columns'),
      (_cli(sol, nope), 2, f'error: --submission={nope}: no such file'),
      (subprocess.run([sys.executable, '-m', 'cspine_jax.metrics', f'--solution={sol}'],
                      capture_output=True, text=True), 2, 'error: --solution and --submission')]:
    assert out.returncode == code, out.stderr
    assert 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith(text), out.stderr
    assert out.stdout == ''
