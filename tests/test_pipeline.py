"""Grain pipeline: manifest, folds, determinism across threads/processes, eval coverage."""
import collections
import dataclasses
import importlib

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from cspine_jax import constants
from cspine_jax.data import config as data_config
from cspine_jax.data import fixtures
from cspine_jax.data import manifest
from cspine_jax.data import pipeline

NUM_LABELLED, NUM_TEST = 10, 2


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('converted'))
  records = fixtures.write_synthetic_dataset(root, NUM_LABELLED, num_test=NUM_TEST,
                                             segmented_fraction=0.7, seed=3)
  records.append(fixtures.write_study(root, 'broken', np.zeros((1, 1, 1)), status='bad dicom'))
  fixtures.write_manifest(root, records)
  return root


def _cfg(root, **kw):
  c = data_config.get_config()
  c.root = root
  c.input_shape = (8, 12, 12)
  c.spacing_mm = (4.0, 4.0, 4.0)
  c.num_folds = 5
  c.fold = 0
  c.batch_size = 4
  c.eval_batch_size = 4
  c.num_threads = 2
  c.cache_mb = 16
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _take(it, n):
  out = [next(it) for _ in range(n)]
  return out


def test_manifest_skips_non_ok_and_sorts(root, caplog):
  studies = manifest.load_manifest(root)
  assert len(studies) == NUM_LABELLED + NUM_TEST
  assert 'broken' not in {s.uid for s in studies}
  assert [s.uid for s in studies] == sorted(s.uid for s in studies)
  test = manifest.select(studies, 'test', fold=0, num_folds=5)
  assert len(test) == NUM_TEST and all(s.labels is None for s in test)
  seg = manifest.select(studies, 'labelled', fold=0, num_folds=5, require_segmentation=True)
  assert 0 < len(seg) < NUM_LABELLED and all(s.has_segmentation for s in seg)


def test_pseudo_labels_add_localized_studies_to_training_only(root):
  """data.pseudo_labels: the labelled studies without a mask that the localizer segmented join
  'train'; the folds and 'eval' stay those of the true masks (no score against a prediction)."""
  studies = manifest.load_manifest(root)
  box = {'C3': [1, 1, 1, 4, 4, 4]}
  localized = [dataclasses.replace(s, predicted_vertebra_boxes=box)
               if not s.has_segmentation else s for s in studies]
  kw = dict(fold=0, num_folds=5, require_segmentation=True)
  pseudo = [s for s in localized if not s.has_segmentation and s.labels is not None]
  assert pseudo
  for which in ('train', 'eval'):
    plain = manifest.select(localized, which, **kw)
    got = manifest.select(localized, which, pseudo_labels=True, **kw)
    assert all(s.has_segmentation for s in plain)
    if which == 'eval':
      assert got == plain
    else:
      assert got == plain + pseudo
  # Without a localizer run there is nothing to add.
  assert (manifest.select(studies, 'train', pseudo_labels=True, **kw)
          == manifest.select(studies, 'train', **kw))


def test_stratified_folds_disjoint_covering_balanced():
  rng = np.random.default_rng(0)
  n, k = 203, 5
  labels = np.array([fixtures.random_labels(rng) for _ in range(n)])
  uids = [f'u{i}' for i in range(n)]
  folds = manifest.stratified_folds(uids, labels, k, seed=0)
  assert folds.shape == (n,) and set(folds.tolist()) == set(range(k))  # every study one fold
  sizes = np.bincount(folds, minlength=k)
  assert sizes.max() - sizes.min() <= 1
  for t in range(constants.NUM_TARGETS):
    pos = np.bincount(folds[labels[:, t] == 1], minlength=k)
    assert pos.max() - pos.min() <= 2, (constants.TARGETS[t], pos)
  # A function of (uid, labels) only: the input order does not matter.
  perm = rng.permutation(n)
  folds_p = manifest.stratified_folds([uids[i] for i in perm], labels[perm], k, seed=0)
  np.testing.assert_array_equal(folds_p, folds[perm])


def test_train_eval_split_is_a_partition(root):
  cfg = _cfg(root)
  studies = manifest.load_manifest(root)
  seen = collections.Counter()
  for fold in range(cfg.num_folds):
    tr = {s.uid for s in manifest.select(studies, 'train', fold=fold, num_folds=5)}
    ev = {s.uid for s in manifest.select(studies, 'eval', fold=fold, num_folds=5)}
    assert not tr & ev and len(tr | ev) == NUM_LABELLED
    seen.update(ev)
  assert len(seen) == NUM_LABELLED and set(seen.values()) == {1}


def test_batches_shapes_and_values(root):
  cfg = _cfg(root)
  it, num_train = pipeline.make_train_iterator(cfg, 0, 1)
  assert num_train == 8
  b = next(it)
  assert b['image'].shape == (4, 8, 12, 12, 2) and b['image'].dtype == np.float32
  assert b['labels'].shape == (4, 8) and b['labels'].dtype == np.float32
  assert 0.0 <= b['image'].min() and b['image'].max() <= 1.0 and b['image'].max() > 0.5
  truth = {s.uid: s.labels for s in manifest.load_manifest(root)}
  for uid, lab in zip(b['uid'], b['labels']):
    np.testing.assert_array_equal(lab, truth[uid])


def test_same_batches_for_any_thread_count_and_epochs_reshuffle(root):
  ref = _take(pipeline.make_train_iterator(_cfg(root, num_threads=0), 0, 1)[0], 4)
  for threads, prefetch in ((1, 1), (3, 2)):
    got = _take(pipeline.make_train_iterator(
        _cfg(root, num_threads=threads, prefetch=prefetch), 0, 1)[0], 4)
    for a, b in zip(ref, got):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['uid'], b['uid'])
  # 16 elements = two epochs of the 8 training studies, each a permutation, in different orders.
  uids = np.concatenate([b['uid'] for b in ref])
  e0, e1 = uids[:8], uids[8:]
  assert sorted(e0) == sorted(e1) and len(set(e0)) == 8 and list(e0) != list(e1)
  # Augmentation differs between the two epochs' crops of the same study.
  imgs = np.concatenate([b['image'] for b in ref])
  j = int(np.flatnonzero(e1 == e0[0])[0])
  assert not np.array_equal(imgs[0], imgs[8 + j])


@pytest.mark.parametrize('mode', ['region', 'vertebrae'])
def test_global_batch_independent_of_process_count(root, mode):
  kw = dict(crop_mode=mode, vertebra_shape=(4, 8, 8), num_threads=1)
  one = _take(pipeline.make_train_iterator(_cfg(root, **kw), 0, 1)[0], 3)
  for count in (2, 4):
    parts = [_take(pipeline.make_train_iterator(_cfg(root, **kw), p, count)[0], 3)
             for p in range(count)]
    for step in range(3):
      for key in one[step]:
        cat = np.concatenate([parts[p][step][key] for p in range(count)])
        np.testing.assert_array_equal(cat, one[step][key], err_msg=f'{key} step {step}')
      assert parts[0][step]['image'].shape[0] == 4 // count


def test_start_step_equals_skipping(root):
  cfg = _cfg(root, num_threads=1)
  full = _take(pipeline.make_train_iterator(cfg, 1, 2)[0], 5)
  late = _take(pipeline.make_train_iterator(cfg, 1, 2, start_step=3)[0], 2)
  for a, b in zip(full[3:], late):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_eval_covers_every_study_once_with_mask(root):
  for count in (1, 2):
    cfg = _cfg(root, eval_batch_size=4)
    uids, masked = [], 0
    for p in range(count):
      it, n = pipeline.make_eval_iterator(cfg, 'labelled', process_index=p, process_count=count)
      for b in it:
        assert b['image'].shape[0] == 4 // count
        uids += [u for u, m in zip(b['uid'], b['mask']) if m]
        masked += int((~b['mask']).sum())
        assert np.all(b['image'][~b['mask']] == 0)
    assert n == NUM_LABELLED and sorted(uids) == sorted(set(uids)) and len(uids) == n
    assert masked == 2  # 10 studies in batches of 4 -> 12 rows
  # Deterministic: identical crops in two passes, and the held-out fold matches select().
  it, n = pipeline.make_eval_iterator(_cfg(root), 'eval', process_index=0, process_count=1)
  a = list(it)
  b = list(pipeline.make_eval_iterator(_cfg(root), 'eval', process_index=0, process_count=1)[0])
  np.testing.assert_array_equal(np.concatenate([x['image'] for x in a]),
                                np.concatenate([x['image'] for x in b]))
  want = {s.uid for s in manifest.select(manifest.load_manifest(root), 'eval', fold=0,
                                         num_folds=5)}
  assert {u for x in a for u, m in zip(x['uid'], x['mask']) if m} == want
  # Test split: unlabelled studies come with labelled=False.
  it, n = pipeline.make_eval_iterator(_cfg(root), 'test', process_index=0, process_count=1)
  b = next(it)
  assert n == NUM_TEST and not b['labelled'].any() and b['mask'].sum() == NUM_TEST


def test_to_global_places_rows_on_the_mesh(root):
  it, _ = pipeline.make_train_iterator(_cfg(root, num_threads=0), 0, 1)
  batch = next(it)
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  out = pipeline.to_global(batch, NamedSharding(mesh, P('data')))
  assert isinstance(out['image'], jax.Array) and out['image'].shape == batch['image'].shape
  np.testing.assert_array_equal(np.asarray(out['labels']), batch['labels'])
  assert isinstance(out['uid'], np.ndarray)


def test_fallback_crop_for_studies_without_boxes(root):
  studies = manifest.load_manifest(root)
  nobox = [s for s in studies if s.box_source == 'none' and s.labels is not None]
  assert nobox
  it, _ = pipeline.make_eval_iterator(_cfg(root), uids=[nobox[0].uid], process_index=0,
                                      process_count=1)
  b = next(it)
  assert b['mask'][0] and b['image'][0].max() > 0.5  # centre crop still shows the spine


def test_resolve_fills_defaults_and_aliases():
  full = ml_collections.ConfigDict({'seed': 7, 'batch_size': 6, 'data': {
      'root': '/r', 'channels': [(-500.0, 1300.0)], 'input_shape': (32, 32, 32),
      'augment': {'rotate_deg': 3.0}}})
  c = data_config.resolve(full)
  assert c.root == '/r' and c.seed == 7 and c.batch_size == 6 and c.eval_batch_size == 6
  assert tuple(map(tuple, c.windows)) == ((400.0, 1800.0),)
  assert c.augment.rotate_deg == 3.0 and c.augment.scale == 0.1  # merged, not replaced
  assert tuple(c.input_shape) == (32, 32, 32) and c.num_threads == 4
  assert data_config.resolve(c).to_dict() == c.to_dict()  # idempotent


def test_segmentation_field_in_batches(root):
  cfg = _cfg(root, with_segmentation=True, eval_batch_size=4)
  truth = {s.uid: s.has_segmentation for s in manifest.load_manifest(root)}
  it, _ = pipeline.make_eval_iterator(cfg, 'labelled', process_index=0, process_count=1)
  for b in it:
    assert b['segmentation'].shape == (4, 8, 12, 12) and b['segmentation'].dtype == np.uint8
    for uid, m, has, seg in zip(b['uid'], b['mask'], b['has_segmentation'], b['segmentation']):
      assert has == (m and truth[uid])
      assert (seg.max() > 0) == has


@pytest.mark.parametrize('name', ['smoke', 'localizer', 'demo', 'vertebra', 'vit_b2'])
def test_project_configs_feed_top_level_batch_size_and_seed_to_the_pipeline(name):
  # A regression: the data block used to carry the pipeline's own defaults (batch 8, seed 0),
  # which won over config.batch_size / config.seed without a word.
  config = importlib.import_module(f'configs.{name}').get_config()
  config.batch_size = 6
  config.seed = 11
  c = data_config.resolve(config)
  assert (c.batch_size, c.eval_batch_size, c.seed) == (6, 6, 11)
