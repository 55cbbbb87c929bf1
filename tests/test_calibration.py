"""Calibration: ECE by hand, temperatures against a brute-force search, the patient rule, the
fallbacks of small validation folds, the workdir record."""
import json

import numpy as np
import pytest

from configs import demo
from cspine_jax import calibrate
from cspine_jax import calibration
from cspine_jax import cli
from cspine_jax import metrics
from cspine_jax.data import manifest


def _grid_temperature(z, t, lo=0.05, hi=20.0, n=200_001):
  """Brute force: the T of the lowest log loss on a fine grid of beta = 1 / T."""
  betas = np.linspace(1.0 / hi, 1.0 / lo, n)
  z, t = np.asarray(z, float), np.asarray(t, float)
  losses = [np.mean(np.logaddexp(0, b * z) - t * b * z) for b in betas[::100]]
  # Coarse pass, then every point around the coarse minimum.
  k = int(np.argmin(losses)) * 100
  fine = betas[max(0, k - 100):k + 101]
  losses = [np.mean(np.logaddexp(0, b * z) - t * b * z) for b in fine]
  return 1.0 / fine[int(np.argmin(losses))]


def test_ece_hand_computed():
  p = [0.05, 0.15, 0.12, 0.95, 1.0, 0.55, 0.5]
  y = [0, 1, 0, 1, 1, 0, 1]
  # 10 bins: [0.05] gap 0.05; [0.15, 0.12] |0.135 - 0.5| = 0.365; [0.55, 0.5] |0.525 - 0.5|;
  # [0.95, 1.0] |0.975 - 1| (p = 1 in the last bin, 0.5 in bin 5: left-closed bins).
  want = (1 * 0.05 + 2 * 0.365 + 2 * 0.025 + 2 * 0.025) / 7
  assert calibration.expected_calibration_error(p, y) == pytest.approx(want, abs=1e-12)
  assert want == pytest.approx(0.125714285, abs=1e-8)
  # 2 bins: [0.05, 0.15, 0.12] |0.1067 - 1/3| * 3; [0.95, 1, 0.55, 0.5] |0.75 - 0.75| = 0.
  assert calibration.expected_calibration_error(p, y, bins=2) == pytest.approx(0.68 / 7, abs=1e-12)
  # One bin: |mean p - mean y| over everything.
  assert calibration.expected_calibration_error(p, y, bins=1) == pytest.approx(
      abs(np.mean(p) - np.mean(y)), abs=1e-12)
  # Perfectly calibrated bins.
  assert calibration.expected_calibration_error([0.25] * 4 + [0.75] * 4,
                                                [1, 0, 0, 0, 1, 1, 1, 0]) == 0.0


def test_ece_report_pools_every_target():
  rng = np.random.default_rng(0)
  probs = rng.random((20, 8))
  labels = (rng.random((20, 8)) < 0.3).astype(float)
  rep = calibration.ece_report(probs, labels)
  assert rep['ece'] == pytest.approx(calibration.expected_calibration_error(probs.ravel(),
                                                                            labels.ravel()))
  assert rep['ece_C3'] == pytest.approx(calibration.expected_calibration_error(probs[:, 3],
                                                                               labels[:, 3]))
  # The metric's report carries it beside the RSNA score.
  assert metrics.report(labels, probs)['ece'] == pytest.approx(rep['ece'])


def test_temperature_matches_brute_force_and_recovers_the_truth():
  rng = np.random.default_rng(1)
  true_logits = rng.normal(0, 2.0, 4000)
  y = (rng.random(4000) < calibration.sigmoid(true_logits)).astype(float)
  model_logits = 2.5 * true_logits  # over-confident by 2.5
  t = calibration.fit_temperature(model_logits, y)
  assert t == pytest.approx(_grid_temperature(model_logits, y), rel=2e-4)
  assert 2.3 < t < 2.7
  # Soft targets (Platt's) are fitted the same way.
  soft = calibration.platt_targets(y)
  assert calibration.fit_temperature(model_logits, soft) == pytest.approx(
      _grid_temperature(model_logits, soft), rel=2e-4)
  # Scaled back, the probabilities are calibrated: far lower ECE and log loss.
  before = calibration.sigmoid(model_logits)
  after = calibration.sigmoid(model_logits / t)
  assert (calibration.expected_calibration_error(after, y)
          < 0.3 * calibration.expected_calibration_error(before, y))
  assert calibration.log_loss(model_logits / t, y) < calibration.log_loss(model_logits, y)


def test_platt_targets_keep_separable_folds_finite():
  z = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
  y = np.array([0, 0, 0, 1, 1, 1.0])
  assert calibration.fit_temperature(z, y) == pytest.approx(calibration.T_BOUNDS[0])
  soft = calibration.platt_targets(y)
  np.testing.assert_allclose(soft, [0.2, 0.2, 0.2, 0.8, 0.8, 0.8])
  t = calibration.fit_temperature(z, soft)
  assert t == pytest.approx(_grid_temperature(z, soft), rel=2e-4)
  assert 1.0 < t < 3.0  # p(3 / T) ~ 0.8-0.9: no longer certain


def test_fit_temperatures_per_target_with_fallbacks():
  rng = np.random.default_rng(2)
  n = 400
  truth = rng.normal(-1.0, 2.0, (n, 8))
  labels = (rng.random((n, 8)) < calibration.sigmoid(truth)).astype(float)
  scale = np.array([1.0, 2.0, 0.5, 1.5, 3.0, 1.0, 2.0, 1.0])
  logits = truth * scale
  labels[:, 3] = 0  # C3: no positive in the fold
  labels[:1, 5] = 1
  labels[1:, 5] = 0  # C5: a single positive
  temps, sources = calibration.fit_temperatures(logits, labels, smooth=False)
  assert sources == ['own', 'own', 'own', 'pooled vertebrae', 'own', 'pooled vertebrae', 'own',
                     'own']
  for j in (0, 1, 2, 4, 6, 7):
    assert temps[j] == pytest.approx(_grid_temperature(logits[:, j], labels[:, j]), rel=2e-4)
    assert temps[j] == pytest.approx(scale[j], rel=0.2)  # 400 studies: near the true scale
  pooled = _grid_temperature(logits[:, 1:].ravel(), labels[:, 1:].ravel())
  assert temps[3] == temps[5] == pytest.approx(pooled, rel=2e-4)
  # Per-target Platt targets by default.
  temps_s, _ = calibration.fit_temperatures(logits, labels)
  assert temps_s[1] == pytest.approx(
      _grid_temperature(logits[:, 1], calibration.platt_targets(labels[:, 1])), rel=2e-4)
  # A patient column with one class only, and no vertebra with both: T = 1.
  one_class = np.zeros((n, 8))
  temps, sources = calibration.fit_temperatures(logits, one_class)
  assert sources == ['none (T = 1)'] * 8 and (temps == 1).all()
  with pytest.raises(ValueError, match=r'\(N, 8\)'):
    calibration.fit_temperatures(logits[:, :7], labels[:, :7])


def test_patient_is_never_below_its_largest_vertebra():
  rng = np.random.default_rng(3)
  probs = rng.random((500, 8))
  temps = rng.uniform(0.3, 3.0, 8)
  out = calibration.apply_temperatures(probs, temps)
  assert (out[:, 0] >= out[:, 1:].max(1)).all()
  # Vertebrae are only rescaled; the patient moves only where it was inconsistent.
  scaled = calibration.sigmoid(calibration.logits_from_probs(probs) / temps)
  np.testing.assert_allclose(out[:, 1:], scaled[:, 1:], atol=1e-12)
  keep = scaled[:, 0] >= scaled[:, 1:].max(1)
  assert keep.any() and (~keep).any()
  np.testing.assert_allclose(out[keep, 0], scaled[keep, 0], atol=1e-12)
  np.testing.assert_allclose(out[~keep, 0], scaled[~keep, 1:].max(1), atol=1e-12)
  # T = 1 is the identity on consistent probabilities.
  consistent = calibration.consistent_patient(probs)
  np.testing.assert_allclose(calibration.apply_temperatures(consistent, np.ones(8)), consistent,
                             atol=1e-9)


def test_record_load_and_errors(tmp_path):
  w = str(tmp_path)
  assert calibration.load(w) is None
  temps = dict(zip(('patient_overall', 'C1', 'C2', 'C3', 'C4', 'C5', 'C6', 'C7'),
                   [0.5, 1, 1, 2, 1, 1, 1, 3]))
  calibration.save(w, {'temperatures': temps, 'checkpoint_step': 3})
  record = calibration.load(w)
  np.testing.assert_array_equal(calibration.temperatures_of(record), [0.5, 1, 1, 2, 1, 1, 1, 3])
  json.dump({'temperatures': {**temps, 'C4': -1}}, open(calibration.path(w), 'w'))
  with pytest.raises(ValueError, match='calibration.json: temperatures must be'):
    calibration.load(w)
  open(calibration.path(w), 'w').write('{not json')
  with pytest.raises(ValueError, match='calibration.json: not a calibration record'):
    calibration.load(w)


def _study(uid, true_boxes, predicted_boxes):
  return manifest.parse_study({'uid': uid, 'shape': [8, 8, 8], 'spacing_mm': [1, 1, 1],
                               'labels': [0] * 8, 'has_segmentation': bool(true_boxes),
                               'vertebra_boxes': true_boxes,
                               'predicted_vertebra_boxes': predicted_boxes})


def test_use_boxes_picks_the_box_source():
  t, p = {'C1': [0, 0, 0, 2, 2, 2]}, {'C1': [1, 1, 1, 3, 3, 3]}
  studies = [_study('1.1', t, p), _study('1.2', {}, p), _study('1.3', t, {}), _study('1.4', {}, {})]
  auto = manifest.use_boxes(studies, 'auto')
  assert [s.box_source for s in auto] == ['true', 'predicted', 'true', 'none']
  predicted = manifest.use_boxes(studies, 'predicted')
  assert [s.box_source for s in predicted] == ['predicted', 'predicted', 'none', 'none']
  assert predicted[0].boxes == {'C1': tuple(p['C1'])} and predicted[0].has_segmentation
  true = manifest.use_boxes(studies, 'true')
  assert [s.uid for s in true] == ['1.1', '1.3'] and all(s.boxes == {'C1': tuple(t['C1'])}
                                                         for s in true)
  with pytest.raises(ValueError, match="boxes='both'"):
    manifest.use_boxes(studies, 'both')


def test_calibrate_refuses_a_run_without_a_validation_fold(synthetic_converted, tmp_path):
  config = demo.get_config()
  config.data.root = synthetic_converted[1]
  config.data.fold = -1
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  with pytest.raises(cli.UsageError, match='no validation fold'):
    calibrate.run(str(tmp_path))
  assert calibration.load(str(tmp_path)) is None
