"""Two-stage flow: Dice, the volume/segmentation element, a tiny localizer trained end to end
through data_tools.localize (files, manifest, same grid, resumability) and cspine_jax.predict on
a raw DICOM folder (JSON keys, PNG, no patient tag in any output; every vertebra found, some,
none: not assessable), and a bad folder failing cleanly."""
import io
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pydicom
import pytest

from configs import demo
from configs import localizer
from configs import localizer_coarse
from cspine_jax import calibration
from cspine_jax import constants
from cspine_jax import localize_lib
from cspine_jax import losses
from cspine_jax import predict_lib
from cspine_jax import seg_metrics
from cspine_jax import train_loop
from cspine_jax.data import geometry
from cspine_jax.data import manifest
from cspine_jax.data import pipeline
from cspine_jax.data import sources
from cspine_jax.data import store
from cspine_jax.data import transforms
from cspine_jax.models import factory
from cspine_jax.models import segmenter
from data_tools import dicom
from tests.conftest import repo_root


def test_dice_hand_values():
  true = np.array([0, 1, 1, 2, 2, 2, 0, 0])
  pred = np.array([0, 1, 0, 2, 2, 0, 2, 3])
  d = seg_metrics.dice_per_class(pred, true, num_classes=4)
  # C1: 2*1/(1+2); C2: 2*2/(3+3); C3: absent from the truth, predicted once -> 0.
  np.testing.assert_allclose(d, [2 / 3, 2 / 3, 0.0])
  d8 = seg_metrics.dice_per_class(pred, true)
  assert np.isnan(d8[3:]).all()  # C4..C7 absent from both: not scored
  s = seg_metrics.summarize(np.stack([d8, d8]))
  assert s['dice_C1'] == pytest.approx(2 / 3) and s['dice_mean'] == pytest.approx(4 / 9)
  assert np.isnan(s['dice_C5'])


def test_segmentation_loss_prefers_the_truth():
  labels = np.zeros((1, 4, 4, 4), np.int32)
  labels[0, 1:3, 1:3, 1:3] = 2
  good = jnp.asarray(np.eye(8)[labels] * 20.0)
  bad = jnp.asarray(np.eye(8)[np.zeros_like(labels)] * 20.0)
  g, parts = losses.segmentation_loss(good, labels)
  b, _ = losses.segmentation_loss(bad, labels)
  assert float(g) < 1e-3 and float(parts['dice']) == pytest.approx(1.0, abs=1e-3)
  assert float(b) > 0.1
  # A masked-out example does not count.
  both = jnp.concatenate([good, bad])
  m, _ = losses.segmentation_loss(both, np.concatenate([labels, labels]), np.array([1, 0]))
  assert float(m) == pytest.approx(float(g), abs=1e-6)


def test_token_label_loss_targets_are_patch_histograms():
  labels = np.zeros((1, 4, 2, 2), np.int32)  # two 2x2x2 patches along z
  labels[0, 0, :, :] = 3  # patch 0: half C3 (4 voxels), half background
  labels[0, 2:, :, :] = 5  # patch 1: all C5
  target = np.zeros((1, 2, 8))
  target[0, 0, [0, 3]] = 0.5
  target[0, 1, 5] = 1.0
  perfect = jnp.log(jnp.asarray(np.clip(target, 1e-9, None)))
  ce = float(losses.token_label_loss(perfect, labels, (2, 2, 2)))
  # Soft cross-entropy at the target itself = the targets' mean entropy: (ln 2 + 0) / 2.
  assert ce == pytest.approx(np.log(2) / 2, abs=1e-6)
  uniform = jnp.zeros((1, 2, 8))
  assert float(losses.token_label_loss(uniform, labels, (2, 2, 2))) == pytest.approx(np.log(8))


def test_decoder_neighbourhood_is_the_3x3x3_window():
  x = np.arange(2 * 3 * 4 * 5 * 2, dtype=np.float32).reshape(2, 3, 4, 5, 2)
  n = np.asarray(segmenter.neighbourhood(x, 1))
  assert n.shape == (2, 3, 4, 5, 54)
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)), mode='edge')
  # Voxel (1, 2, 3) of example 1: its window, in (dz, dy, dx, channel) order.
  want = p[1, 1:4, 2:5, 3:6].reshape(-1)
  np.testing.assert_array_equal(n[1, 1, 2, 3], want)
  np.testing.assert_array_equal(segmenter.neighbourhood(x, 0), x)


def test_component_filter_keeps_a_split_vertebra_and_drops_far_strays():
  labels = np.zeros((20, 8, 8), np.uint8)
  labels[2:5, 2:6, 2:6] = 3  # C3, upper half
  labels[6:8, 2:6, 2:6] = 3  # C3, lower half, beyond a 1-voxel fracture gap
  labels[16, 3, 3] = 3  # a stray C3 voxel far down (a look-alike level)
  labels[10:13, 2:6, 2:6] = 4
  out = localize_lib.largest_components(labels, 8)
  assert (out[2:8] == labels[2:8]).all()  # both halves kept: the box spans the fracture
  assert out[16, 3, 3] == 0 and (out[10:13, 2:6, 2:6] == 4).all()
  assert store.vertebra_boxes(out)['C3'] == [2, 2, 2, 8, 6, 6]
  # reach=0 is the plain largest component (the lower half goes).
  assert (localize_lib.largest_components(labels, 8, reach=0)[6:8] == 0).all()


def test_foreground_boxes_equal_the_full_scan():
  """localize's boxes scan only the labelled part of the mask: the same boxes as
  store.vertebra_boxes on random masks (empty ones, one voxel, labels at the edges)."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    shape = tuple(int(n) for n in rng.integers(1, 12, 3))
    mask = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(0, 4))):
      lo = [int(rng.integers(0, n)) for n in shape]
      hi = [int(rng.integers(a, n)) + 1 for a, n in zip(lo, shape)]
      mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.integers(1, 8)
    assert localize_lib.foreground_boxes(mask) == store.vertebra_boxes(mask), shape


def test_probability_upsampling_places_the_boundary_between_voxel_centres():
  # Low-res C1 probability rising linearly along z: p(o) = o / 3 for low-res slices o = 0..3.
  p1 = np.broadcast_to((np.arange(4) / 3.0)[:, None, None], (4, 4, 4))
  probs = np.zeros((4, 4, 4, 8), np.float32)
  probs[..., 1], probs[..., 0] = p1, 1.0 - p1
  labels = np.argmax(probs, -1).astype(np.uint8)  # C1 at o = 2, 3
  cmap = geometry.CropMap(matrix=np.diag([2.0, 1.0, 1.0]), offset=np.zeros(3), shape=(4, 4, 4),
                          pool=(1, 1, 1))
  full = localize_lib.upsample_probs(probs, labels, cmap, (7, 4, 4))
  # Full slice i reads o = i / 2, p = i / 6 > 0.5 from i = 4 on; nearest labels take i = 3
  # too (rint(1.5) = 2): the boundary moves by half a low-res voxel.
  np.testing.assert_array_equal(full[:, 0, 0], [0, 0, 0, 0, 1, 1, 1])
  near = localize_lib.upsample_labels(labels, cmap, (7, 4, 4))
  np.testing.assert_array_equal(near[:, 0, 0], [0, 0, 0, 1, 1, 1, 1])
  # A piece that largest_components removed is not brought back by the interpolation.
  kept = labels.copy()
  kept[3] = 0
  full = localize_lib.upsample_probs(probs, kept, cmap, (7, 4, 4))
  np.testing.assert_array_equal(full[:, 0, 0], [0, 0, 0, 0, 1, 0, 0])
  # Not axis-aligned: the caller falls back to nearest labels.
  rot = geometry.CropMap(matrix=np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),
                         offset=np.zeros(3), shape=(4, 4, 4), pool=(1, 1, 1))
  assert localize_lib.upsample_probs(probs, labels, rot, (4, 4, 4)) is None


def _tiny(c, root):
  c.data.root = root
  c.data.fold = -1  # train on every segmented study (the fixture has 6)
  c.batch_size = 2
  c.total_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2
  m = c.model
  m.width, m.depth, m.num_heads, m.mlp_dim = 32, 1, 2, 64
  return c


def _localizer_config(root):
  """A tiny coarse localizer (configs/localizer_coarse.py): a one-pass localizer on its own."""
  c = _tiny(localizer_coarse.get_config(), root)
  c.data.input_shape = (16, 16, 16)
  c.data.volume_spacing_mm = (12.0, 12.0, 12.0)  # 192 mm: the fixture's scans
  return c


def _fine_config(root, coarse_dir):
  """A tiny fine localizer (configs/localizer.py) placed by the coarse one in ``coarse_dir``."""
  c = _tiny(localizer.get_config(), root)
  c.data.input_shape = (32, 24, 24)
  c.data.spacing_mm = (5.0, 5.0, 5.0)  # 160 x 120 x 120 mm
  c.localizer.coarse_workdir = coarse_dir
  return c


def test_volume_mode_gives_whole_volume_and_true_mask(synthetic_converted):
  c = _localizer_config(synthetic_converted[1])
  c.data.eval_batch_size = 6
  it, n = pipeline.make_eval_iterator(c, 'train', process_index=0, process_count=1)
  b = next(it)
  assert n == 6 and b['image'].shape == (6, 16, 16, 16, 2)
  assert b['has_segmentation'].all() and b['segmentation'].dtype == np.uint8
  for seg, img in zip(b['segmentation'], b['image']):
    assert set(np.unique(seg)) - {0} <= set(range(1, 8)) and seg.max() > 0
    assert img[..., 0][seg > 0].mean() > img[..., 0][seg == 0].mean()  # labels sit on bone


@pytest.fixture(scope='module')
def two_stage(synthetic_converted, tmp_path_factory):
  """A tiny localizer and per-vertebra classifier (2 steps each) and a localized copy."""
  raw, converted = synthetic_converted
  base = tmp_path_factory.mktemp('two_stage')
  data = str(base / 'converted')
  shutil.copytree(converted, data)  # localize writes into the dataset: keep the fixture intact
  coarse_dir, loc_dir = str(base / 'localizer_coarse'), str(base / 'localizer')
  train_loop.train_and_evaluate(_localizer_config(data), coarse_dir, progress=False)
  train_loop.train_and_evaluate(_fine_config(data, coarse_dir), loc_dir, progress=False)
  records = localize_lib.run(loc_dir, data)
  c = demo.get_config()
  c.data.root = data
  c.batch_size = 2
  c.total_steps = 1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.optimizer.warmup_steps = 0
  cls_dir = str(base / 'classifier')
  train_loop.train_and_evaluate(c, cls_dir, progress=False)
  return {'raw': raw, 'data': data, 'localizer': loc_dir, 'coarse': coarse_dir,
          'classifier': cls_dir, 'records': records}


def test_localize_writes_masks_boxes_and_resumes(two_stage):
  data = two_stage['data']
  records = [json.loads(l) for l in open(os.path.join(data, 'manifest.jsonl'))]
  assert records == two_stage['records'] and len(records) == 11
  for r in records:
    path = os.path.join(data, 'predicted_segmentations', r['uid'])
    mask = store.read_array(path)
    assert mask.shape == tuple(r['shape']) and mask.dtype == np.uint8  # the volume's grid
    assert mask.max() <= 7
    assert r['localizer']['step'] == 2
    boxes = r['predicted_vertebra_boxes']
    assert set(boxes) <= set(constants.VERTEBRAE)
    for name, box in boxes.items():
      z0, y0, x0, z1, y1, x1 = box
      assert (mask[z0:z1, y0:y1, x0:x1] == constants.VERTEBRAE.index(name) + 1).any()
  # Studies with a true mask are scored on the full grid; the summary is the mean of those.
  rows = []
  for r in records:
    state = json.load(open(os.path.join(data, '.localize', r['uid'] + '.json')))
    assert ('dice' in state) == bool(r['has_segmentation'])
    if r['has_segmentation']:
      true = store.read_array(os.path.join(data, 'segmentations', r['uid']))
      pred = store.read_array(os.path.join(data, 'predicted_segmentations', r['uid']))
      want = seg_metrics.dice_per_class(pred, true)
      np.testing.assert_allclose([np.nan if d is None else d for d in state['dice']], want,
                                 atol=1e-5)
      rows.append(want)
  summary = localize_lib.full_grid_dice(data)
  assert summary['studies'] == len(rows) > 0
  assert summary['dice_mean'] == pytest.approx(float(np.nanmean(rows)), abs=1e-5)
  # Crops prefer true boxes; studies without masks use the predicted ones.
  for s in manifest.load_manifest(data):
    assert s.boxes == (s.vertebra_boxes or s.predicted_vertebra_boxes)
  # A rerun skips every study (nothing rewritten) and gives the same manifest.
  stamp = {r['uid']: os.stat(os.path.join(data, 'predicted_segmentations', r['uid'],
                                          'zarr.json')).st_mtime_ns for r in records}
  again = localize_lib.run(two_stage['localizer'], data)
  assert again == records
  assert stamp == {u: os.stat(os.path.join(data, 'predicted_segmentations', u,
                                           'zarr.json')).st_mtime_ns for u in stamp}
  assert not [n for n in os.listdir(os.path.join(data, 'predicted_segmentations'))
              if n.startswith('.tmp-')]


# Tags that identify the patient, the institution or the study; none may reach any output.
PHI_TAGS = ('PatientName', 'PatientID', 'PatientBirthDate', 'InstitutionName',
            'ReferringPhysicianName', 'AccessionNumber', 'StudyInstanceUID', 'SeriesInstanceUID',
            'SOPInstanceUID', 'FrameOfReferenceUID')


def _phi_values(folder) -> set[str]:
  """Every non-empty value of PHI_TAGS in the folder's slices (PatientName also by component).

  Values shorter than 5 characters are left out: 'M' or 'Doe' turn up in any PNG by chance.
  """
  values, seen = set(), set()
  for name in os.listdir(folder):
    ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
    for tag in PHI_TAGS:
      value = str(ds.get(tag, '') or '')
      if value:
        seen.add(tag)
        values.add(value)
        values.update(part for part in value.split('^') if len(part) >= 5)
  assert seen == set(PHI_TAGS), f'the source lacks {set(PHI_TAGS) - seen}: nothing to look for'
  return {v for v in values if len(v) >= 5}


def _assert_no_phi(folder, *outputs):
  values = _phi_values(folder)
  assert len(values) >= len(PHI_TAGS)
  for out in outputs:
    data = out if isinstance(out, bytes) else out.encode()
    leaked = sorted(v for v in values if v.encode() in data)
    assert not leaked, leaked


def _segmented_study(two_stage):
  """(raw DICOM folder, true C1-C7 mask) of a training study with a mask (all seven present)."""
  uid = next(s.uid for s in manifest.load_manifest(two_stage['data']) if s.has_segmentation)
  mask = store.read_array(os.path.join(two_stage['data'], 'segmentations', uid))
  assert sorted(store.vertebra_boxes(mask)) == list(constants.VERTEBRAE)
  return os.path.join(two_stage['raw'], 'train_images', uid), mask


def _oracle_localizer(monkeypatch, mask):
  """The localizer runs, then its answer is replaced by ``mask`` (the fixture's 2-step
  localizer finds no vertebra in any study, so the found path needs an oracle)."""
  real = localize_lib.localize

  def localize(model, reader, study, keep_largest=True):
    loc = real(model, reader, study, keep_largest)
    assert mask.shape == tuple(study.shape)
    return localize_lib.Localization(mask=mask, boxes=store.vertebra_boxes(mask),
                                     lowres=loc.lowres, timings=loc.timings)

  monkeypatch.setattr(localize_lib, 'localize', localize)


@pytest.fixture(scope='module')
def oracle_predictions(two_stage):
  """predict on a segmented training study with its true mask as the localizer's answer: all
  seven vertebrae ('full'), and C6 and C7 left out ('part'); each (result, png)."""
  study, mask = _segmented_study(two_stage)
  part_mask = np.where(mask >= 6, 0, mask).astype(mask.dtype)
  runs = {'study': study, 'mask': mask}
  for key, m in (('full', mask), ('part', part_mask)):
    with pytest.MonkeyPatch.context() as mp:
      _oracle_localizer(mp, m)
      runs[key] = predict_lib.predict(two_stage['classifier'], two_stage['localizer'], study)
  return runs


def test_predict_on_a_dicom_folder(oracle_predictions, tmp_path):
  study, mask = oracle_predictions['study'], oracle_predictions['mask']
  result, png = oracle_predictions['full']
  out = str(tmp_path / 'out')
  predict_lib.write_outputs(out, result, png)
  assert sorted(os.listdir(out)) == ['overlay.png', 'prediction.json']
  saved = json.load(open(os.path.join(out, 'prediction.json')))
  assert saved['assessable'] is True and saved['not_assessable_reason'] is None
  assert saved['not_assessed'] == {}
  assert list(saved['probabilities']) == list(constants.TARGETS)
  assert all(0.0 <= p <= 1.0 for p in saved['probabilities'].values())
  assert saved['checkpoints'] == {'classifier': 1, 'localizer': 2}
  assert {'read_dicom', 'load_models', 'localize', 'classify', 'overlay', 'total'} <= set(
      saved['timings_s'])
  assert list(saved['vertebrae']) == list(constants.VERTEBRAE)
  for name, v in saved['vertebrae'].items():
    assert v['box_voxel'] == store.vertebra_boxes(mask)[name]
    assert len(v['box_lps_mm']) == 2 and len(v['center_lps_mm']) == 3
    assert v['probability'] == saved['probabilities'][name]
  img = Image.open(os.path.join(out, 'overlay.png'))
  assert img.format == 'PNG' and img.width > 100
  p = saved['probabilities']['patient_overall']
  assert img.text['Description'] == f'patient fracture probability {p:.2f}'
  assert predict_lib.summary(saved).startswith(f'patient_overall {p:.3f}; C1 ')
  # Nothing from patient, institution or study tags, in either file.
  _assert_no_phi(study, open(os.path.join(out, 'prediction.json')).read(),
                 open(os.path.join(out, 'overlay.png'), 'rb').read())


def test_predict_some_vertebrae_not_found(oracle_predictions):
  """Found vertebrae keep their probabilities; the others are null with a reason; the patient
  probability stays, flagged as resting on the found ones."""
  full, _ = oracle_predictions['full']
  part, png = oracle_predictions['part']
  p, q = part['probabilities'], full['probabilities']
  assert part['assessable'] is True and part['not_assessable_reason'] is None
  assert p['C6'] is None and p['C7'] is None
  assert part['not_assessed'] == {'C6': 'the localizer found no C6',
                                  'C7': 'the localizer found no C7'}
  assert list(part['vertebrae']) == ['C1', 'C2', 'C3', 'C4', 'C5']
  for name in ('C1', 'C2', 'C3', 'C4', 'C5'):  # each crop is classified on its own
    assert p[name] == pytest.approx(q[name], abs=1e-6)
  assert 0.0 <= p['patient_overall'] <= 1.0
  assert 'patient_overall rests on C1-C5 only (the classifier saw no image of C6, C7)' in (
      part['warnings'])
  assert any(w.startswith('the localizer found no C6, C7: not assessed') for w in part['warnings'])
  line = predict_lib.summary(part)
  assert line.startswith(f'patient_overall {p["patient_overall"]:.3f} (from C1-C5 only); C1 ')
  assert line.endswith('C5 %.3f, C6 not found, C7 not found' % p['C5'])
  text = Image.open(io.BytesIO(png)).text['Description']
  assert text == (f'patient fracture probability {p["patient_overall"]:.2f}\n'
                  'not found, no probability: C6, C7')
  json.dumps(part, allow_nan=False)  # nulls, not NaN


def _air_series(src, dst):
  """A copy of the series ``src`` with every voxel at -1000 HU (air); tags kept as they are."""
  os.makedirs(dst)
  for name in os.listdir(src):
    ds = pydicom.dcmread(os.path.join(src, name))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
      ds.decompress()  # JPEG Lossless: the new pixels are written uncompressed
    slope, intercept = float(ds.get('RescaleSlope', 1)), float(ds.get('RescaleIntercept', 0))
    stored = ds.pixel_array
    ds.PixelData = np.full_like(stored, round((-1000 - intercept) / slope)).tobytes()
    ds.save_as(os.path.join(dst, name))


def test_predict_not_assessable_when_no_vertebra_is_found(two_stage, tmp_path):
  folder = os.path.join(two_stage['raw'], 'test_images')
  air = str(tmp_path / 'air')
  _air_series(os.path.join(folder, sorted(os.listdir(folder))[0]), air)
  # The input really holds nothing, and the real localizer really finds nothing in it.
  series = dicom.read_series(air)
  assert (series.hu == -1000).all()
  reader = localize_lib.ArrayReader({store.VOLUMES: {'s': series.hu}})
  study = localize_lib.study_from_geometry('s', series.hu.shape, series.spacing,
                                           series.direction, series.origin)
  loc = localize_lib.localize(localize_lib.load(two_stage['localizer']), reader, study)
  assert loc.boxes == {} and not loc.mask.any()
  out = str(tmp_path / 'out')
  env = dict(os.environ, PYTHONPATH=repo_root())
  proc = subprocess.run([sys.executable, '-m', 'cspine_jax.predict',
                         f'--classifier={two_stage["classifier"]}',
                         f'--localizer={two_stage["localizer"]}', f'--dicom={air}',
                         f'--output={out}', '--dicom_outputs'], capture_output=True, text=True,
                        env=env, cwd=repo_root(), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]  # a result, not a failure
  # --dicom_outputs: the SR (which says "not assessable"), no SEG (no vertebra to segment).
  assert sorted(os.listdir(out)) == ['overlay.png', 'prediction.json', 'sr.dcm']
  assert proc.stdout.rstrip().endswith(f'-> {out}/prediction.json, {out}/overlay.png, '
                                       f'{out}/sr.dcm'), proc.stdout
  assert proc.stdout.startswith(f'not assessable: {predict_lib.NONE_FOUND}\n'), proc.stdout
  saved = json.load(open(os.path.join(out, 'prediction.json')))
  assert saved['assessable'] is False and saved['not_assessable_reason'] == predict_lib.NONE_FOUND
  assert saved['probabilities'] == dict.fromkeys(constants.TARGETS)
  assert list(saved['not_assessed']) == list(constants.TARGETS)
  assert saved['not_assessed']['patient_overall'] == predict_lib.NONE_FOUND
  assert saved['not_assessed']['C3'] == 'the localizer found no C3'
  assert saved['vertebrae'] == {}
  assert 'classify' not in saved['timings_s']  # nothing to classify: the classifier is not run
  assert saved['checkpoints'] == {'classifier': 1, 'localizer': 2}
  png = open(os.path.join(out, 'overlay.png'), 'rb').read()
  img = Image.open(io.BytesIO(png))
  assert img.text['Description'] == ('NOT ASSESSABLE: no fracture probability for this study\n'
                                     'the localizer found no vertebra C1-C7')
  assert img.width > 100
  _assert_no_phi(air, proc.stdout, proc.stderr, open(os.path.join(out, 'prediction.json')).read(),
                 png)


def test_predict_missing_dicom_folder_is_a_usage_error(two_stage, tmp_path):
  out = str(tmp_path / 'out')
  env = dict(os.environ, PYTHONPATH=repo_root())
  proc = subprocess.run([sys.executable, '-m', 'cspine_jax.predict',
                         f'--classifier={two_stage["classifier"]}',
                         f'--localizer={two_stage["localizer"]}',
                         f'--dicom={tmp_path / "nothing"}', f'--output={out}'],
                        capture_output=True, text=True, env=env, cwd=repo_root(), timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: --dicom={tmp_path / "nothing"} is not a folder')
  assert not os.path.exists(out)


def test_predict_bad_folder_fails_clearly_and_writes_nothing(two_stage, tmp_path):
  folder = os.path.join(two_stage['raw'], 'test_images')
  src = os.path.join(folder, sorted(os.listdir(folder))[0])
  bad = str(tmp_path / 'mr')
  shutil.copytree(src, bad)
  for name in os.listdir(bad):
    ds = pydicom.dcmread(os.path.join(bad, name))
    ds.Modality = 'MR'
    ds.save_as(os.path.join(bad, name))
  out = str(tmp_path / 'out')
  env = dict(os.environ, PYTHONPATH=repo_root())
  proc = subprocess.run([sys.executable, '-m', 'cspine_jax.predict',
                         f'--classifier={two_stage["classifier"]}',
                         f'--localizer={two_stage["localizer"]}', f'--dicom={bad}',
                         f'--output={out}'], capture_output=True, text=True, env=env,
                        cwd=repo_root(), timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {bad}: ') and 'modality MR, expected CT' in last, last
  assert not os.path.exists(out)


def test_old_layout_workdirs_predict_and_eval_as_before(two_stage, oracle_predictions, tmp_path,
                                                        monkeypatch):
  """Workdirs whose checkpoints hold one `state` item (the layout before the model/train split)
  give the new eval and predict exactly what the same weights give in the new layout."""
  from cspine_jax import eval as eval_lib
  from tests.test_restore import write_legacy_copy
  old_cls, old_loc = str(tmp_path / 'classifier'), str(tmp_path / 'localizer')
  write_legacy_copy(two_stage['classifier'], old_cls)
  write_legacy_copy(two_stage['localizer'], old_loc)
  assert os.listdir(os.path.join(old_cls, 'checkpoints', '1')).count('state') == 1
  study, mask = oracle_predictions['study'], oracle_predictions['mask']
  # The localizers' own outputs: their class probabilities (the 2-step localizer's labels are
  # all background, so its boxes would compare nothing)...
  series = dicom.read_series(study)
  reader = localize_lib.ArrayReader({store.VOLUMES: {'s': series.hu}})
  geo = localize_lib.study_from_geometry('s', series.hu.shape, series.spacing, series.direction,
                                         series.origin)
  whole = [0, 0, 0, *series.hu.shape]
  seg = []
  for m in (localize_lib.load(two_stage['localizer']).model, localize_lib.load(old_loc).model):
    cmap = localize_lib.spine_crop_map(m, geo, whole)
    seg.append(m.segment_probs(localize_lib._sample(m, reader, geo, cmap)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(seg[0], seg[1])
  # ... and, with every vertebra found, the classifiers' probabilities (not nulls).
  _oracle_localizer(monkeypatch, mask)
  new = oracle_predictions['full'][0]
  old, _ = predict_lib.predict(old_cls, old_loc, study)
  assert None not in new['probabilities'].values()
  assert old['probabilities'] == new['probabilities'] and old['vertebrae'] == new['vertebrae']
  assert old['checkpoints'] == new['checkpoints'] == {'classifier': 1, 'localizer': 2}
  a = eval_lib.run(two_stage['classifier'], two_stage['data'], 'latest',
                   str(tmp_path / 'new.csv'), split='labelled')
  b = eval_lib.run(old_cls, two_stage['data'], 'latest', str(tmp_path / 'old.csv'),
                   split='labelled')
  assert open(tmp_path / 'new.csv').read() == open(tmp_path / 'old.csv').read()
  assert a['rsna_score'] == b['rsna_score'] and a['predicted_studies'] == 10


# ---------------------------------------------------------------------------------------------
# Batches: a folder of study folders, a converted dataset; resumable, bad studies recorded.
# ---------------------------------------------------------------------------------------------

PATIENT_FOLDER = 'Smith John'  # a study folder named like a patient: must never be echoed


def _slab_localizer(monkeypatch):
  """The localizer runs, then its answer is replaced by seven slabs of the volume's centre (the
  fixture's 2-step localizer finds nothing; this oracle fits any volume, so the classifier runs
  on real crops of every study)."""
  real = localize_lib.localize

  def localize(model, reader, study, keep_largest=True):
    loc = real(model, reader, study, keep_largest)
    z, y, x = study.shape
    mask = np.zeros(study.shape, np.uint8)
    edges = np.linspace(z // 8, z - z // 8, 8).astype(int)
    for v in range(7):
      mask[edges[v]:edges[v + 1], y // 4:3 * y // 4, x // 4:3 * x // 4] = v + 1
    return localize_lib.Localization(mask=mask, boxes=store.vertebra_boxes(mask),
                                     lowres=loc.lowres, timings=loc.timings)

  monkeypatch.setattr(localize_lib, 'localize', localize)


@pytest.fixture(scope='module')
def studies_folder(two_stage, tmp_path_factory):
  """A Kaggle-style folder of 4 study folders, copied from the fixture's raw studies: good A, a
  broken one (one slice's pixel data truncated), good C, and a good study under a patient-like
  name. {'root', 'good': [A, C], 'broken', 'broken_file'}."""
  root = str(tmp_path_factory.mktemp('studies') / 'test_images')
  src = os.path.join(two_stage['raw'], 'train_images')
  a, b, c = sorted(os.listdir(src))[:3]  # name order: the broken one in the middle
  for uid in (a, b, c):
    shutil.copytree(os.path.join(src, uid), os.path.join(root, uid))
  shutil.copytree(os.path.join(src, a), os.path.join(root, PATIENT_FOLDER))
  name = sorted(os.listdir(os.path.join(root, b)))[10]
  path = os.path.join(root, b, name)
  os.truncate(path, os.path.getsize(path) // 2)
  return {'root': root, 'good': [a, c], 'broken': b, 'broken_file': name}


@pytest.fixture(scope='module')
def predictor(two_stage):
  return predict_lib.Predictor(two_stage['classifier'], two_stage['localizer'])


def _no_name_anywhere(out, *texts):
  """The patient-like folder name in no file name, file or text."""
  for text in texts:
    assert PATIENT_FOLDER not in text and 'Smith' not in text
  for folder, dirs, files in os.walk(out):
    for n in dirs + files:
      assert 'Smith' not in n
    for n in files:
      assert b'Smith' not in open(os.path.join(folder, n), 'rb').read(), n


def _same_prediction(a, b, tol=1e-6):
  """Two prediction.json dicts alike but for timings (probabilities within ``tol``)."""
  for k in ('assessable', 'not_assessable_reason', 'not_assessed', 'checkpoints'):
    assert a[k] == b[k], k
  for k in constants.TARGETS:
    pa, pb = a['probabilities'][k], b['probabilities'][k]
    assert (pa is None) == (pb is None) and (pa is None or abs(pa - pb) <= tol), (k, pa, pb)
  assert list(a['vertebrae']) == list(b['vertebrae'])
  for name in a['vertebrae']:
    assert a['vertebrae'][name]['box_voxel'] == b['vertebrae'][name]['box_voxel']
  assert a['volume']['shape'] == b['volume']['shape']
  np.testing.assert_allclose(a['volume']['spacing_mm'], b['volume']['spacing_mm'], atol=1e-5)


def _read_submission(path):
  lines = open(path).read().splitlines()
  assert lines[0] == 'row_id,fractured'
  return {row.split(',')[0]: float(row.split(',')[1]) for row in lines[1:]}, len(lines) - 1


def test_predict_batch_command_records_failures_resumes_and_hides_names(
    two_stage, studies_folder, predictor, tmp_path):
  """The command over a folder of studies: exit 1 after doing the good ones, a bad study and a
  patient-named folder in failures.jsonl (the latter by position only), outputs equal to one-
  study predict, the Kaggle submission keyed by folder names; a rerun skips finished studies
  and retries the failed ones."""
  root = str(tmp_path / 'test_images')
  shutil.copytree(studies_folder['root'], root)
  a, c = studies_folder['good']
  broken = studies_folder['broken']
  out = str(tmp_path / 'out')
  env = dict(os.environ, PYTHONPATH=repo_root())
  proc = subprocess.run([sys.executable, '-m', 'cspine_jax.predict',
                         f'--classifier={two_stage["classifier"]}',
                         f'--localizer={two_stage["localizer"]}', f'--dicom={root}',
                         f'--output={out}'], capture_output=True, text=True, env=env,
                        cwd=repo_root(), timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: 2 of 4 studies failed (see {out}/failures.jsonl)')
  assert proc.stdout.startswith('4 studies: 2 predicted, 0 already done, 2 failed; '), proc.stdout
  assert 'studies/min' in proc.stdout
  assert 'predict: 100%' in proc.stderr  # the progress bar (ETA on the way)
  # Each good study's folder, complete; none for the failed ones, and no temporary left.
  assert sorted(os.listdir(out)) == sorted(['.predict', a, c, 'failures.jsonl', 'submission.csv'])
  for uid in (a, c):
    assert sorted(os.listdir(os.path.join(out, uid))) == ['overlay.png', 'prediction.json']
  failures = [json.loads(l) for l in open(os.path.join(out, 'failures.jsonl'))]
  assert [f['study'] for f in failures] == [broken, 'invalid-folder-test-4']
  assert failures[0]['error'].startswith(f'{studies_folder["broken_file"]}: pixel data cannot '
                                         'be decoded, truncated or corrupt'), failures[0]
  assert failures[1]['error'].startswith('study folder #4 of --dicom (folders in name order) '
                                         'is not named by a valid DICOM StudyInstanceUID')
  _no_name_anywhere(out, proc.stdout, proc.stderr)
  # The same as one-study predict on the same folder (models loaded for it alone).
  saved = {u: json.load(open(os.path.join(out, u, 'prediction.json'))) for u in (a, c)}
  for uid in (a, c):
    single, _ = predict_lib.predict(two_stage['classifier'], two_stage['localizer'],
                                os.path.join(root, uid))
    _same_prediction(saved[uid], single)
    assert 'load_models' not in saved[uid]['timings_s']  # once per batch, not per study
    assert {'read_dicom', 'localize', 'overlay', 'total'} <= set(saved[uid]['timings_s'])
  # Kaggle's format: every target of every good study, by folder name; the nulls of these
  # not-assessable studies (the 2-step localizer finds nothing) as the training prevalence.
  rows, n = _read_submission(os.path.join(out, 'submission.csv'))
  assert n == 16 and set(rows) == {f'{u}_{t}' for u in (a, c) for t in constants.TARGETS}
  for uid in (a, c):
    for t in constants.TARGETS:
      p = saved[uid]['probabilities'][t]
      want = predict_lib.SUBMISSION_FALLBACK[t] if p is None else p
      assert rows[f'{uid}_{t}'] == pytest.approx(want, abs=1e-6)

  # A rerun (in-process: same models and options) skips the finished studies, retries the
  # failed ones and writes the same files.
  stamps = {u: os.stat(os.path.join(out, u, 'prediction.json')).st_mtime_ns for u in (a, c)}
  before = {n: open(os.path.join(out, n)).read() for n in ('submission.csv', 'failures.jsonl')}
  s = predict_lib.run_batch(predictor, predict_lib.dicom_jobs(root), out, 'dicom')
  assert s.predicted == [] and s.skipped == [a, c] and list(s.failures) == [
      broken, 'invalid-folder-test-4']
  assert stamps == {u: os.stat(os.path.join(out, u, 'prediction.json')).st_mtime_ns
                    for u in (a, c)}
  assert before == {n: open(os.path.join(out, n)).read() for n in before}
  # The broken study repaired: the next rerun predicts it (and only it).
  shutil.rmtree(os.path.join(root, broken))
  shutil.copytree(os.path.join(two_stage['raw'], 'train_images', broken),
                  os.path.join(root, broken))
  s = predict_lib.run_batch(predictor, predict_lib.dicom_jobs(root), out, 'dicom')
  assert s.predicted == [broken] and list(s.failures) == ['invalid-folder-test-4']
  rows, n = _read_submission(os.path.join(out, 'submission.csv'))
  assert n == 24 and f'{broken}_C7' in rows
  assert [json.loads(l)['study'] for l in open(os.path.join(out, 'failures.jsonl'))] == [
      'invalid-folder-test-4']
  _no_name_anywhere(out)


def test_predict_batch_probabilities_match_one_study_and_converted(
    two_stage, studies_folder, predictor, tmp_path, monkeypatch):
  """With every vertebra found (an oracle), batch outputs equal one-study predict's numbers
  (both good studies are compared with it, not assessable, in the test above), the submission
  holds them, and --data (the converted volumes) gives the same."""
  _slab_localizer(monkeypatch)
  a, c = studies_folder['good']
  root = studies_folder['root']
  out = str(tmp_path / 'out')
  s = predict_lib.run_batch(predictor, predict_lib.dicom_jobs(root), out, 'dicom')
  assert s.predicted == [a, c] and len(s.failures) == 2 and s.filled == 0
  rows, n = _read_submission(os.path.join(out, 'submission.csv'))
  assert n == 16
  from_data = str(tmp_path / 'from_data')
  jobs = [j for j in predict_lib.converted_jobs(two_stage['data']) if j['study'] in (a, c)]
  d = predict_lib.run_batch(predictor, jobs, from_data, 'data', data=two_stage['data'])
  assert d.predicted == [a, c] and not d.failures
  for uid in (a, c):
    saved = json.load(open(os.path.join(out, uid, 'prediction.json')))
    assert None not in saved['probabilities'].values() and saved['assessable']
    if uid == a:  # one is enough here: predict() compiles the classifier again (~10 s)
      single, _ = predict_lib.predict(two_stage['classifier'], two_stage['localizer'],
                                  os.path.join(root, uid))
      _same_prediction(saved, single)
    for t in constants.TARGETS:
      assert rows[f'{uid}_{t}'] == pytest.approx(saved['probabilities'][t], abs=1e-6)
    # The converted volume is the DICOM read, voxel for voxel; its geometry is the manifest's
    # (rounded to 1e-6 mm), hence the tolerance.
    hu = store.read_array(os.path.join(two_stage['data'], 'volumes', uid))
    np.testing.assert_array_equal(hu, dicom.read_series(os.path.join(root, uid)).hu)
    converted = json.load(open(os.path.join(from_data, uid, 'prediction.json')))
    _same_prediction(converted, saved, tol=1e-4)
    assert 'read_volume' in converted['timings_s'] and 'read_dicom' not in converted['timings_s']
  assert open(os.path.join(from_data, 'failures.jsonl')).read() == ''
  assert _read_submission(os.path.join(from_data, 'submission.csv'))[1] == 16


def test_predict_batch_dicom_outputs(two_stage, studies_folder, predictor, tmp_path,
                                     monkeypatch):
  """--dicom_outputs: seg.dcm and sr.dcm in the study's folder (their content is
  tests/test_dicom_outputs.py's); a rerun without the flag's files redoes the study."""
  _slab_localizer(monkeypatch)
  a = studies_folder['good'][0]
  out = str(tmp_path / 'out')
  jobs = [j for j in predict_lib.dicom_jobs(studies_folder['root']) if j['study'] == a]
  s = predict_lib.run_batch(predictor, jobs, out, 'dicom', write_dicom=True, threshold=0.3)
  assert s.predicted == [a] and not s.failures
  assert sorted(os.listdir(os.path.join(out, a))) == ['overlay.png', 'prediction.json',
                                                      'seg.dcm', 'sr.dcm']
  saved = json.load(open(os.path.join(out, a, 'prediction.json')))
  assert 'dicom_outputs' in saved['timings_s']
  assert list(saved['timings_s'])[-1] == 'total'
  # Without --dicom_outputs the finished study counts as done only if made the same way.
  s = predict_lib.run_batch(predictor, jobs, out, 'dicom')
  assert s.predicted == [a]
  assert sorted(os.listdir(os.path.join(out, a))) == ['overlay.png', 'prediction.json']
  # Not assessable (the real 2-step localizer): the SR alone, and done as such on a rerun.
  monkeypatch.undo()
  for _ in range(2):
    s = predict_lib.run_batch(predictor, jobs, out, 'dicom', write_dicom=True, threshold=0.3)
    assert sorted(os.listdir(os.path.join(out, a))) == ['overlay.png', 'prediction.json',
                                                        'sr.dcm']
  assert s.predicted == [] and s.skipped == [a]


@pytest.mark.parametrize('args, message', [
    (['--threshold=1'], 'error: --threshold=1.0: must be between 0 and 1 (exclusive)'),
    (['--data={data}', '--dicom_outputs'], 'error: --dicom_outputs needs --dicom: the SEG and '
     "SR reference the source series' files, which a converted dataset does not keep"),
])
def test_predict_flag_errors_are_usage_errors(two_stage, studies_folder, tmp_path, args,
                                              message):
  out = str(tmp_path / 'out')
  env = dict(os.environ, PYTHONPATH=repo_root())
  source = [] if any(a.startswith('--data') for a in args) else [
      f'--dicom={studies_folder["root"]}']
  proc = subprocess.run([sys.executable, '-m', 'cspine_jax.predict',
                         f'--classifier={two_stage["classifier"]}',
                         f'--localizer={two_stage["localizer"]}', f'--output={out}', *source,
                         *[a.format(data=two_stage['data']) for a in args]],
                        capture_output=True, text=True, env=env, cwd=repo_root(), timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == message
  assert not os.path.exists(out)


def test_volume_crop_map_fixed_spacing_keeps_one_physical_scale():
  """volume_spacing_mm: the same mm per output voxel, centred on the volume, whatever the field
  of view; without it the whole volume is stretched onto the grid (the scale follows the FOV)."""
  c = localizer_coarse.get_config().data
  c.input_shape = (10, 8, 8)
  axial = ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))  # a head-first axial scan
  for shape, spacing in (((60, 64, 64), (3.0, 2.5, 2.5)), ((30, 64, 64), (6.0, 3.5, 3.5))):
    c.volume_spacing_mm = (6.0, 6.0, 6.0)
    m = transforms.volume_crop_map(shape, spacing, axial, c)
    np.testing.assert_allclose(np.abs(np.diag(m.matrix)) * spacing, [6.0, 6.0, 6.0])
    centre = m.matrix @ ((np.array(c.input_shape) - 1) / 2) + m.offset
    np.testing.assert_allclose(centre, (np.array(shape) - 1) / 2)
    c.volume_spacing_mm = ()
    m = transforms.volume_crop_map(shape, spacing, axial, c)
    np.testing.assert_allclose(np.abs(np.diag(m.matrix)) * spacing,
                               np.array(shape) * spacing / np.array(c.input_shape))


def test_foreground_box_maps_the_labelled_corners_to_volume_indices():
  labels = np.zeros((6, 5, 5), np.uint8)
  labels[1:4, 2, 1:3] = 3
  cmap = geometry.CropMap(matrix=np.diag([2.0, 1.0, 0.5]), offset=np.array([10.0, 0.0, 4.0]),
                          shape=(6, 5, 5), pool=(1, 1, 1))
  # z: 2*1+10 .. 2*3+10 -> [12, 17); y: 2 -> [2, 3); x: 0.5*1+4 .. 0.5*2+4 -> [4, 6).
  assert localize_lib.foreground_box(labels, cmap, (40, 5, 8)) == [12, 2, 4, 17, 3, 6]
  assert localize_lib.foreground_box(np.zeros_like(labels), cmap, (40, 5, 8)) is None


def test_coarse_to_fine_recentres_on_its_own_labels(two_stage, monkeypatch):
  """Both passes answer with the true mask through their own grids (oracles), the coarse one
  3 voxels (36 mm) too low: its crop cuts the top of the column; the fine pass's recentred crop
  holds all of it, and the boxes written are the true ones to within a fine voxel."""
  data = two_stage['data']
  study = next(s for s in manifest.load_manifest(data) if s.has_segmentation)
  true = store.read_array(os.path.join(data, 'segmentations', study.uid))
  reader = sources.VolumeReader(data)
  loc = localize_lib.load(two_stage['localizer'])
  assert loc.coarse is not None and loc.tag()['coarse']['step'] == 2
  real_sample, seen = localize_lib._sample, []  # pylint: disable=protected-access

  def sample(model, reader_, study_, cmap):
    seen.append((model, cmap))
    return real_sample(model, reader_, study_, cmap)

  def labels(model, image, keep_largest):
    owner, cmap = seen[-1]
    assert owner is model and image.shape[1:4] == cmap.shape
    lab = transforms.sample_labels(lambda k: reader.reader_for(k, study.uid), study,
                                   store.SEGMENTATIONS, cmap)
    if model is loc.coarse:
      lab = np.concatenate([np.zeros_like(lab[:3]), lab[:-3]])
    return np.eye(8, dtype=np.float32)[lab], lab

  monkeypatch.setattr(localize_lib, '_sample', sample)
  monkeypatch.setattr(localize_lib, '_labels', labels)
  out = localize_lib.localize(loc, reader, study)
  assert [m is loc.coarse for m, _ in seen] == [True, False, False]
  zs = np.flatnonzero(true.any(axis=(1, 2)))

  def z_range(cmap):
    ends = cmap.matrix[0, 0] * np.array([0, cmap.shape[0] - 1]) + cmap.offset[0]
    return ends.min(), ends.max()

  first, second = z_range(seen[1][1]), z_range(seen[2][1])
  assert first[0] > zs[0] and first[1] >= zs[-1]  # the first fine crop misses the column's top
  assert second[0] <= zs[0] and second[1] >= zs[-1]  # the recentred one holds all of it
  voxel = 5.0 / study.spacing_mm[0]  # a fine voxel, in slices
  want = store.vertebra_boxes(true)
  assert set(out.boxes) == set(want)
  for name, box in want.items():
    assert abs(out.boxes[name][0] - box[0]) <= voxel + 1
    assert abs(out.boxes[name][3] - box[3]) <= voxel + 1
  assert seg_metrics.dice_per_class(out.mask, true)[0] > 0.6  # C1 itself, at 5 mm


def test_training_a_fine_localizer_needs_its_coarse_pass(two_stage, tmp_path):
  c = _fine_config(two_stage['data'], '')
  task = factory.task_of(c)
  with pytest.raises(factory.ConfigError, match='coarse_workdir is empty'):
    train_loop.check_coarse_localizer(c, task)
  c.localizer.coarse_workdir = str(tmp_path)
  with pytest.raises(factory.ConfigError, match='not a training workdir'):
    train_loop.check_coarse_localizer(c, task)
  c.localizer.coarse_workdir = two_stage['localizer']  # a fine one, not a coarse one
  with pytest.raises(factory.ConfigError, match="crop_mode='region'"):
    train_loop.check_coarse_localizer(c, task)
  c.localizer.coarse_workdir = os.path.relpath(two_stage['coarse'])
  train_loop.check_coarse_localizer(c, task)
  assert c.localizer.coarse_workdir == two_stage['coarse']  # kept absolute in config.json


def test_predict_applies_the_classifiers_calibration(two_stage, tmp_path, monkeypatch):
  """CLASSIFIER/calibration.json fitted on its checkpoint: predict reports the calibrated
  probabilities (each target's logit / T, patient_overall at least the largest vertebra), as
  eval scores them; a record of another step is not applied."""
  study, mask = _segmented_study(two_stage)
  _oracle_localizer(monkeypatch, mask)
  cls = str(tmp_path / 'classifier')
  shutil.copytree(two_stage['classifier'], cls)
  raw, _ = predict_lib.predict(cls, two_stage['localizer'], study)
  step = raw['checkpoints']['classifier']
  temps = dict(zip(constants.TARGETS, (2.0, 0.5, 1.0, 3.0, 1.0, 1.0, 1.0, 0.25)))
  calibration.save(cls, {'temperatures': temps, 'checkpoint_step': step})
  cal, _ = predict_lib.predict(cls, two_stage['localizer'], study)
  assert (raw['calibration'], cal['calibration']) == ('none', 'applied')
  logit = lambda p: np.log(p) - np.log1p(-p)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  want = {t: sig(logit(raw['probabilities'][t]) / temps[t]) for t in constants.TARGETS}
  want['patient_overall'] = max(want['patient_overall'],
                                *(want[v] for v in constants.VERTEBRAE))
  for t in constants.TARGETS:
    assert cal['probabilities'][t] == pytest.approx(want[t], rel=1e-5, abs=1e-7), t
  calibration.save(cls, {'temperatures': temps, 'checkpoint_step': step + 1})
  other, _ = predict_lib.predict(cls, two_stage['localizer'], study)
  assert other['calibration'] == 'none' and other['probabilities'] == raw['probabilities']
