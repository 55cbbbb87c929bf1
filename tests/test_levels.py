"""Derived levels and device crops: values against independent references, the crops against the
full-resolution path, device crops against host crops, determinism, old datasets, the upgrade."""
import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from cspine_jax import device_crop
from cspine_jax.data import config as data_config
from cspine_jax.data import device_blocks
from cspine_jax.data import fixtures
from cspine_jax.data import geometry
from cspine_jax.data import levels
from cspine_jax.data import manifest
from cspine_jax.data import pipeline
from cspine_jax.data import sources
from cspine_jax.data import store
from cspine_jax.data import transforms
from data_tools import levels as levels_cmd


def _reference_level(volume, spacing, level_mm):
  """The level's definition written out plainly: float64 cell means (NaN-padded partial cells),
  then scipy's map_coordinates at every level voxel's pooled coordinate."""
  s = np.asarray(spacing, float)
  step = level_mm / s
  p = np.maximum(np.floor(step + 1e-6), 1).astype(int)
  out = volume.astype(np.float64)
  for axis in range(3):
    n = out.shape[axis]
    cells = -(-n // p[axis])
    pad = [(0, 0)] * 3
    pad[axis] = (0, cells * p[axis] - n)
    padded = np.pad(out, pad, constant_values=np.nan)
    shape = list(padded.shape)
    shape[axis] = cells
    shape.insert(axis + 1, p[axis])
    out = np.nanmean(padded.reshape(shape), axis=axis + 1)
  grid = np.meshgrid(*[np.arange(n) for n in levels.level_shape(volume.shape, s, level_mm)],
                     indexing='ij')
  coords = [(grid[a] * step[a] - (p[a] - 1) / 2) / p[a] for a in range(3)]
  return np.rint(ndi.map_coordinates(out, coords, order=1, mode='nearest')).astype(np.int16)


@pytest.mark.parametrize('shape,spacing', [((37, 50, 45), (0.7, 0.35, 0.35)),
                                           ((20, 30, 33), (1.5, 0.45, 0.5)),
                                           ((70, 20, 20), (0.5, 0.8, 0.8))])
def test_levels_equal_the_plain_reference(shape, spacing, monkeypatch):
  monkeypatch.setattr(levels, 'SLAB', 7)  # several slabs, uneven last one
  volume = np.random.default_rng(0).integers(-1000, 2000, shape).astype(np.int16)
  built = levels.build(volume, spacing)
  one_mm = built['volumes_1mm']
  # float32 filtering against float64: a value at exactly .5 may round the other way.
  assert np.abs(one_mm.astype(int) - _reference_level(volume, spacing, 1.0)).max() <= 1
  assert np.abs(built['volumes_2mm'].astype(int) -
                _reference_level(one_mm, (1.0,) * 3, 2.0)).max() <= 1
  assert one_mm.shape == levels.level_shape(shape, spacing, 1.0)


def test_label_level_is_the_nearest_voxel_label():
  mask = np.random.default_rng(0).integers(0, 8, (23, 40, 37)).astype(np.uint8)
  spacing = (0.7, 0.35, 0.45)
  level = levels.downsample_labels(mask, spacing, 2.0)
  assert level.shape == levels.level_shape(mask.shape, spacing, 2.0)
  for j in [(0, 0, 0), (5, 3, 7), tuple(n - 1 for n in level.shape)]:
    # level voxel j is at volume index j * 2 / s: its nearest voxel's label, rounded half up.
    i = tuple(int(np.floor(a * 2.0 / s + 0.5)) for a, s in zip(j, spacing))
    assert level[j] == mask[i]


@pytest.fixture(scope='module')
def ct(tmp_path_factory):
  """Two CT-like studies at 0.7 x 0.35 x 0.35 mm (noisy phantom), with levels."""
  root = str(tmp_path_factory.mktemp('ct'))
  rng = np.random.default_rng(0)
  records = []
  for i in range(2):
    vol, seg = fixtures.synthetic_spine((60, 110, 110), rng)
    records.append(fixtures.write_study(root, f'1.2.{i}', vol, spacing_mm=(0.7, 0.35, 0.35),
                                        segmentation=seg, labels=[1, 1, 0, 0, 0, 0, 0, 0]))
  fixtures.write_manifest(root, records)
  return root


def _cfg(root, **changes):
  cfg = data_config.get_config()
  cfg.root = root
  cfg.input_shape = (24, 24, 24)
  cfg.spacing_mm = (1.25, 1.0, 1.0)
  cfg.windows = ((400.0, 1800.0), (50.0, 400.0))
  cfg.batch_size = 2
  cfg.fold = -1
  cfg.num_threads = 1
  cfg.update(changes)
  return cfg


def test_level_crops_are_closer_to_full_resolution_than_a_quarter_voxel_shift(ct):
  """The tolerance: reading a crop from the 1 mm level changes it less than moving the
  full-resolution crop by a quarter of an output voxel does."""
  study = manifest.load_manifest(ct)[0]
  cfg = _cfg(ct)
  reader = sources.VolumeReader(ct)
  read_for = lambda kind: reader.reader_for(kind, study.uid)
  for seed in range(3):
    aug = transforms._augment(cfg, np.random.default_rng(seed))
    cmap, _ = transforms.region_crop_map(study, cfg, aug)
    assert levels.choose(study, cmap) == 'volumes_1mm'
    full = geometry.resample(read_for(store.VOLUMES), study.shape, cmap, cfg.pad_hu)
    level = transforms.sample_image(read_for, study, cmap, cfg.pad_hu)
    moved = geometry.resample(read_for(store.VOLUMES), study.shape, geometry.CropMap(
        cmap.matrix, cmap.offset + cmap.matrix @ np.full(3, 0.25), cmap.shape, cmap.pool,
        cmap.step), cfg.pad_hu)
    assert np.abs(level - full).mean() < np.abs(moved - full).mean()
    assert np.corrcoef(level.ravel(), full.ravel())[0, 1] > 0.97


def test_level_choice_follows_the_crop_spacing(ct):
  study = manifest.load_manifest(ct)[0]
  a_mm = geometry.mm_to_index(study.spacing_mm, study.direction)
  centre = (np.asarray(study.shape) - 1) / 2

  def kind(spacing):
    return levels.choose(study, geometry.crop_map(centre, a_mm, (8, 8, 8), spacing))

  assert kind((0.5, 0.5, 0.5)) is None  # finer than any level: the volume
  assert kind((1.25, 1.0, 0.85)) == 'volumes_1mm'
  assert kind((2.0, 1.7, 1.7)) == 'volumes_2mm'
  assert levels.choose(study, geometry.crop_map(centre, a_mm, (8, 8, 8), (2.0,) * 3,
                                                antialias=False)) is None
  # A coarse scan (the demo's 64x64 studies): the 2 mm level is about as fine as the volume,
  # so reading it saves nothing and would interpolate twice.
  coarse = manifest.Study(**{**study.__dict__, 'spacing_mm': (2.4, 2.45, 2.45)})
  assert levels.choose(coarse, geometry.crop_map(centre, geometry.mm_to_index(
      coarse.spacing_mm, coarse.direction), (8, 8, 8), (3.0, 3.0, 3.0))) is None
  # Thick slices: the 1 mm level would interpolate them twice.
  thick = manifest.Study(**{**study.__dict__, 'spacing_mm': (2.5, 0.5, 0.5)})
  assert levels.choose(thick, geometry.crop_map(centre, geometry.mm_to_index(
      thick.spacing_mm, thick.direction), (8, 8, 8), (1.25, 1.0, 1.0))) is None


def test_localizer_labels_from_the_label_level_match_the_full_mask(ct):
  study = manifest.load_manifest(ct)[0]
  cfg = _cfg(ct, crop_mode='volume', input_shape=(16, 16, 16))
  reader = sources.VolumeReader(ct)
  read_for = lambda kind: reader.reader_for(kind, study.uid)
  cmap = transforms.volume_crop_map(study.shape, study.spacing_mm, study.direction, cfg)
  assert levels.choose(study, cmap, store.LABEL_LEVELS) == 'segmentations_2mm'
  level = transforms.sample_labels(read_for, study, store.SEGMENTATIONS, cmap)
  full = transforms.sample_labels(read_for, study, store.SEGMENTATIONS, cmap, use_levels=False)
  assert (full > 0).sum() > 100
  # Labels move by at most 1 mm (half a level voxel): they differ only along label borders.
  borders = ndi.binary_dilation(ndi.morphological_gradient(full, size=3) > 0)
  assert np.all(level[~borders] == full[~borders])
  assert (level == full).mean() > 0.9


def _elements(cfg, process_index=0, process_count=1, n=4):
  ds, _ = pipeline.train_elements(cfg, process_index, process_count)
  return [ds[i] for i in range(n)]


def test_device_crops_equal_host_crops_of_the_same_draws(ct):
  """Rotation, zoom, flip, jitter, intensity scale and shift all on (noise off: the two draw
  it from different generators): the step's image equals the host pipeline's."""
  changes = dict(augment=dict(data_config.get_config().augment, noise_hu=0.0))
  host = _elements(_cfg(ct, **changes))
  cfg = _cfg(ct, crop_on='device', **changes)
  device = _elements(cfg)
  make = device_crop.for_config(cfg)
  for h, d in zip(host, device):
    assert d['block'].dtype == np.int16 and d['block'].shape == device_blocks.block_shape(cfg)
    batch = {k: np.asarray(d[k])[None] for k in ('block', 'affine', 'intensity', 'noise_seed',
                                                 'mask')}
    image = np.asarray(make(batch)['image'][0])
    assert image.shape == h['image'].shape
    np.testing.assert_allclose(image, h['image'], atol=2e-5)
    assert not np.allclose(d['intensity'], [1, 0, 0])  # the augmentation was really on


def test_device_noise_depends_on_the_example_only(ct):
  cfg = _cfg(ct, crop_on='device')
  els = _elements(cfg, n=2)
  make = device_crop.for_config(cfg)
  keys = ('block', 'affine', 'intensity', 'noise_seed', 'mask')
  both = make({k: np.stack([np.asarray(e[k]) for e in els]) for k in keys})['image']
  second = make({k: np.asarray(els[1][k])[None] for k in keys})['image']
  np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(second[0]))
  assert els[0]['noise_seed'] != els[1]['noise_seed']


def test_device_blocks_split_over_processes_exactly(ct):
  cfg = _cfg(ct, crop_on='device', batch_size=4)
  whole = _elements(cfg, n=8)
  halves = [_elements(cfg, p, 2, n=4) for p in range(2)]
  # Global batch s = rows of process 0 then process 1 (local batch 2).
  merged = [e for s in range(2) for p in range(2) for e in halves[p][2 * s:2 * s + 2]]
  for a, b in zip(whole, merged):
    for key in ('block', 'affine', 'intensity', 'noise_seed'):
      np.testing.assert_array_equal(a[key], b[key])


def test_block_shape_holds_the_most_extreme_draws(ct):
  study = manifest.load_manifest(ct)[0]
  cfg = _cfg(ct, crop_on='device')
  shape = device_blocks.block_shape(cfg)
  reader = sources.VolumeReader(ct)
  read = reader.reader_into(device_blocks.DEVICE_LEVEL, study.uid)
  deg = cfg.augment.rotate_deg
  for angles in [(deg, deg, deg), (-deg, deg, -deg), (deg, -deg, deg)]:
    aug = geometry.Augment(angles_rad=tuple(np.deg2rad(angles)), zoom=1 + cfg.augment.scale)
    cmap, _ = transforms.region_crop_map(study, cfg, aug)
    block, affine = device_blocks.region_block(read, study, cmap, shape, cfg.pad_hu)
    # The crop's corners in block voxels: inside, and a block of their span would not do.
    n = np.asarray(cmap.shape) - 1.0
    corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 3, indexing='ij')).reshape(3, -1)
    pts = affine[:, :3] @ (corners * n[:, None]) + affine[:, 3:]
    assert np.all(pts.min(1) >= 0) and np.all(pts.max(1) <= np.asarray(shape) - 1)
    span = pts.max(1) - pts.min(1)
    assert np.all(np.asarray(shape) < span + 16)  # not wastefully large either
    with pytest.raises(RuntimeError, match='block_shape too small'):
      device_blocks.region_block(read, study, cmap, tuple(int(v) for v in np.floor(span)),
                                 cfg.pad_hu)


def test_device_crops_refuse_what_they_cannot_serve(ct):
  with pytest.raises(ValueError, match="crop_mode='region'"):
    device_blocks.check_config(_cfg(ct, crop_on='device', crop_mode='vertebrae'))
  with pytest.raises(ValueError, match='spacing_mm'):
    device_blocks.check_config(_cfg(ct, crop_on='device', spacing_mm=(4.0, 4.0, 4.0)))
  with pytest.raises(ValueError, match="crop_on='gpu'"):
    transforms.RandomCrop(sources.VolumeReader(ct), _cfg(ct, crop_on='gpu'))


@pytest.fixture()
def old_dataset(tmp_path):
  """Converted before levels existed: no level arrays, no 'levels' in the manifest."""
  root = str(tmp_path / 'old')
  rng = np.random.default_rng(1)
  records = []
  for i in range(2):
    vol, seg = fixtures.synthetic_spine((30, 60, 60), rng)
    records.append(fixtures.write_study(root, f'1.3.{i}', vol, spacing_mm=(0.7, 0.35, 0.35),
                                        segmentation=seg, labels=[0] * 8, with_levels=False))
  fixtures.write_manifest(root, records)
  return root


def test_an_old_dataset_trains_on_the_volumes_and_names_the_upgrade(old_dataset, capsys):
  cfg = _cfg(old_dataset)
  pipeline._WARNED_LEVELS.discard(old_dataset)
  el = _elements(cfg, n=1)[0]
  assert el['image'].shape == (24, 24, 24, 2)
  assert f'python -m data_tools.levels --data={old_dataset}' in capsys.readouterr().err
  with pytest.raises(ValueError, match=f'python -m data_tools.levels --data={old_dataset}'):
    _elements(_cfg(old_dataset, crop_on='device'), n=1)


def test_upgrade_writes_what_the_converter_would(old_dataset):
  assert levels_cmd.upgrade(old_dataset, workers=2) == (2, 2)
  for study in manifest.load_manifest(old_dataset):
    assert study.levels == tuple(store.LEVELS)  # every study has a mask here
    volume = store.read_array(store.array_path(old_dataset, store.VOLUMES, study.uid))
    mask = store.read_array(store.array_path(old_dataset, store.SEGMENTATIONS, study.uid))
    expected = {**levels.build(volume, study.spacing_mm),
                'segmentations_2mm': levels.downsample_labels(mask, study.spacing_mm, 2.0)}
    for kind, array in expected.items():
      np.testing.assert_array_equal(
          store.read_array(store.array_path(old_dataset, kind, study.uid)), array)
  assert levels_cmd.upgrade(old_dataset, workers=1) == (0, 2)  # a rerun has nothing to do
  _elements(_cfg(old_dataset, crop_on='device'), n=1)  # device crops now work


def test_device_prefetch_state_resumes_at_the_first_batch_not_taken(ct):
  import jax  # pylint: disable=import-outside-toplevel
  from cspine_jax import parallel  # pylint: disable=import-outside-toplevel
  cfg = _cfg(ct, crop_on='device', num_threads=1)
  sharding = parallel.batch_sharding(parallel.make_mesh())
  it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  fed = pipeline.DevicePrefetch(it, sharding, size=2)
  for _ in range(2):
    next(fed)
  state = fed.get_state()  # two batches taken, two more already on the devices
  expected = next(fed)
  fed.close()
  it2, _ = pipeline.make_train_iterator(cfg, 0, 1)
  fresh = pipeline.DevicePrefetch(it2, sharding, size=2)
  fresh.set_state(state)
  got = next(fresh)
  fresh.close()
  assert json.loads(state)  # the JSON file Grain's handler writes
  for key in ('block', 'affine', 'noise_seed'):
    np.testing.assert_array_equal(np.asarray(jax.device_get(got[key])),
                                  np.asarray(jax.device_get(expected[key])))
