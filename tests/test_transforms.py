"""Crop geometry, resampling, windows and augmentation of cspine_jax.data (no Grain pipeline)."""
import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from cspine_jax.data import config as data_config
from cspine_jax.data import fixtures
from cspine_jax.data import geometry
from cspine_jax.data import manifest
from cspine_jax.data import sources
from cspine_jax.data import store
from cspine_jax.data import transforms


def _cfg(**kw):
  c = data_config.get_config()
  c.augment.enabled = False
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _study(shape, spacing, boxes=None, direction=fixtures.STANDARD_DIRECTION, uid='s'):
  return manifest.Study(uid=uid, split='train', shape=tuple(shape), spacing_mm=tuple(spacing),
                        origin=(0.0, 0.0, 0.0), direction=direction, has_segmentation=True,
                        labels=(1, 0, 1, 0, 0, 0, 0, 0), vertebra_boxes=boxes or {},
                        predicted_vertebra_boxes={})


def _numpy_read(volume, calls=None):
  def read(lo, hi):
    if calls is not None:
      calls.append((tuple(lo), tuple(hi)))
    return volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
  return read


def test_windows_hand_values():
  hu = np.array([-1000.0, -400.0, -150.0, 50.0, 500.0, 1400.0, 3000.0], np.float32)
  out = transforms.apply_windows(hu, ((500.0, 1800.0), (50.0, 400.0)))
  assert out.shape == (7, 2) and out.dtype == np.float32
  # bone: (hu + 400) / 1800; soft tissue: (hu + 150) / 400; clipped to [0, 1].
  np.testing.assert_allclose(out[:, 0], [0, 0, 250 / 1800, 450 / 1800, 0.5, 1, 1], atol=1e-6)
  np.testing.assert_allclose(out[:, 1], [0, 0, 0, 0.5, 1, 1, 1], atol=1e-6)


def test_downsample_by_two_matches_zoom_and_block_mean():
  rng = np.random.default_rng(0)
  vol = rng.normal(0, 100, size=(40, 48, 48)).astype(np.float32)
  a_mm = geometry.mm_to_index((1.0, 1.0, 1.0), fixtures.STANDARD_DIRECTION)
  center = geometry.box_center((0, 0, 0, 40, 48, 48))
  # No antialias: plain linear sampling at input coordinates 2 * o + 0.5, which is exactly
  # scipy.ndimage.zoom's grid_mode=True convention for a factor of 0.5.
  cmap = geometry.crop_map(center, a_mm, (20, 24, 24), (2.0, 2.0, 2.0), antialias=False)
  out = geometry.resample(_numpy_read(vol), vol.shape, cmap, pad_value=-1024)
  ref = ndi.zoom(vol, 0.5, order=1, grid_mode=True, mode='nearest')
  np.testing.assert_allclose(out, ref, atol=1e-3)
  # Antialias: the samples fall on 2x2x2 cell centres, so the crop is the block mean.
  cmap = geometry.crop_map(center, a_mm, (20, 24, 24), (2.0, 2.0, 2.0), antialias=True)
  assert cmap.pool == (2, 2, 2)
  out = geometry.resample(_numpy_read(vol), vol.shape, cmap, pad_value=-1024)
  np.testing.assert_allclose(out, vol.reshape(20, 2, 24, 2, 24, 2).mean((1, 3, 5)), atol=1e-3)


def test_bright_cube_lands_in_expected_voxels_and_read_is_a_subblock():
  # Anisotropic volume: 2 mm slices, 0.5 mm pixels; a 1000 HU cube z[10:20] y[16:32] x[20:28].
  vol = np.zeros((40, 64, 64), np.int16)
  vol[10:20, 16:32, 20:28] = 1000
  box = (10, 16, 20, 20, 32, 28)
  study = _study(vol.shape, (2.0, 0.5, 0.5), {'C3': box})
  cfg = _cfg(input_shape=(16, 16, 16), spacing_mm=(2.0, 1.0, 1.0))
  cmap, source = transforms.region_crop_map(study, cfg)
  assert source == 'true' and cmap.pool == (1, 2, 2)
  calls = []
  out = geometry.resample(_numpy_read(vol, calls), vol.shape, cmap, pad_value=-1024)
  # Centre (14.5, 23.5, 23.5); output o maps to z = 14.5 + (o - 7.5), y/x = 23.5 + 2 (o - 7.5).
  # The cube's edges (15.5 .. 31.5 in y, 19.5 .. 27.5 in x, 9.5 .. 19.5 in z) fall on output
  # 3.5 .. 11.5 (y), 5.5 .. 9.5 (x), 2.5 .. 12.5 (z): voxels 4..11, 6..9, 3..12 are cube.
  expected = np.zeros((16, 16, 16), np.float32)
  expected[3:13, 4:12, 6:10] = 1000.0
  np.testing.assert_allclose(out, expected, atol=1e-3)
  # Only the block around the crop was read, not the whole volume.
  (lo, hi), = calls
  assert np.all(np.subtract(hi, lo) < np.array(vol.shape)) and lo[1] >= 4 and hi[1] <= 44


def test_crop_outside_volume_pads_with_air():
  vol = np.full((10, 10, 10), 100, np.int16)
  study = _study(vol.shape, (1.0, 1.0, 1.0), {'C1': (0, 0, 0, 2, 2, 2)})  # box in a corner
  cfg = _cfg(input_shape=(8, 8, 8), spacing_mm=(1.0, 1.0, 1.0))
  cmap, _ = transforms.region_crop_map(study, cfg)
  out = geometry.resample(_numpy_read(vol), vol.shape, cmap, pad_value=-1024)
  # Centre (0.5, 0.5, 0.5): output o samples o - 3; o <= 2 is outside on every axis.
  assert np.all(out[:3] == -1024) and np.all(out[:, :3] == -1024)
  np.testing.assert_allclose(out[3:, 3:, 3:], 100.0)


def test_direction_canonicalises_left_right():
  # Same anatomy stored with the x axis running patient right (direction row (-1, 0, 0)):
  # after canonical resampling both copies must come out identical.
  rng = np.random.default_rng(1)
  vol = rng.normal(0, 100, size=(12, 16, 16)).astype(np.float32)
  flipped_dir = ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0))
  box = (0, 0, 0, 12, 16, 16)
  cfg = _cfg(input_shape=(12, 16, 16), spacing_mm=(1.0, 1.0, 1.0))
  a, _ = transforms.region_crop_map(_study(vol.shape, (1, 1, 1), {'C1': box}), cfg)
  b, _ = transforms.region_crop_map(_study(vol.shape, (1, 1, 1), {'C1': box}, flipped_dir), cfg)
  out_a = geometry.resample(_numpy_read(vol), vol.shape, a, 0.0)
  out_b = geometry.resample(_numpy_read(vol[:, :, ::-1].copy()), vol.shape, b, 0.0)
  np.testing.assert_allclose(out_a, vol, atol=1e-4)
  np.testing.assert_allclose(out_b, out_a, atol=1e-4)


def test_rotation_matches_map_coordinates_reference():
  rng = np.random.default_rng(2)
  vol = ndi.gaussian_filter(rng.normal(0, 300, size=(30, 40, 40)), 2).astype(np.float32)
  a_mm = geometry.mm_to_index((1.5, 1.0, 1.0), fixtures.STANDARD_DIRECTION)
  aug = geometry.Augment(jitter_mm=(1.0, -2.0, 0.5), angles_rad=(0.2, -0.1, 0.15), zoom=1.1,
                         flip_x=True)
  center = np.array([14.0, 20.0, 19.0])
  shape, spacing = (10, 12, 12), (1.5, 1.0, 1.0)
  cmap = geometry.crop_map(center, a_mm, shape, spacing, aug, antialias=False)
  out = geometry.resample(_numpy_read(vol), vol.shape, cmap, pad_value=-1024)
  # Independent construction of the sample points, then map_coordinates over the whole volume.
  o = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1).reshape(-1, 3)
  d = (o - (np.array(shape) - 1) / 2) * np.array(spacing) * 1.1
  d[:, 2] *= -1  # flip_x
  d = d @ geometry.rotation(aug.angles_rad).T + np.array(aug.jitter_mm)
  pts = center + d / np.array([1.5, 1.0, 1.0])
  ref = ndi.map_coordinates(vol, pts.T, order=1, mode='constant', cval=-1024).reshape(shape)
  inside = np.all((pts >= 0) & (pts <= np.array(vol.shape) - 1), 1).reshape(shape)
  assert inside.mean() > 0.9
  np.testing.assert_allclose(out[inside], ref[inside], atol=1e-2)


def test_flip_x_mirrors_the_crop_exactly():
  rng = np.random.default_rng(3)
  vol = rng.normal(0, 100, size=(20, 20, 20)).astype(np.float32)
  a_mm = geometry.mm_to_index((1.0, 1.0, 1.0), fixtures.STANDARD_DIRECTION)
  c = geometry.box_center((2, 3, 4, 18, 17, 16))
  plain = geometry.resample(_numpy_read(vol), vol.shape,
                            geometry.crop_map(c, a_mm, (8, 8, 8), (1, 1, 1)), 0.0)
  flip = geometry.resample(_numpy_read(vol), vol.shape, geometry.crop_map(
      c, a_mm, (8, 8, 8), (1, 1, 1), geometry.Augment(flip_x=True)), 0.0)
  np.testing.assert_allclose(flip, plain[:, :, ::-1], atol=1e-5)


def test_fit_to_box_stretches_box_plus_margin():
  study = _study((100, 200, 200), (1.0, 0.5, 0.5), {'C1': (10, 40, 60, 30, 140, 100)})
  cfg = _cfg(input_shape=(20, 40, 40), fit_to_box=True, margin_mm=5.0)
  cmap, _ = transforms.region_crop_map(study, cfg)
  # Extents: z 20 mm, y 50 mm, x 20 mm; + 2 * 5 mm margin; / shape -> spacing (1.5, 1.5, 0.75)
  # mm, i.e. (1.5, 3, 1.5) input voxels per output voxel; centre (19.5, 89.5, 79.5) minus
  # 9.5 / 19.5 / 19.5 output steps gives output voxel 0.
  np.testing.assert_allclose(np.diagonal(cmap.matrix), [1.5, 3.0, 1.5])
  np.testing.assert_allclose(cmap.matrix @ np.zeros(3) + cmap.offset, [5.25, 31.0, 50.25])


@pytest.fixture(scope='module')
def spine(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('spine'))
  rng = np.random.default_rng(0)
  vol, seg = fixtures.synthetic_spine((70, 48, 48), rng, noise_hu=0.0)
  rec = fixtures.write_study(root, 'u1', vol, spacing_mm=(2.0, 1.0, 1.0), segmentation=seg,
                             labels=[1, 0, 0, 0, 1, 0, 0, 0])
  fixtures.write_manifest(root, [rec])
  return root


def test_vertebra_crops_centre_on_each_vertebra(spine):
  study, = manifest.load_manifest(spine)
  del study.vertebra_boxes['C4']  # an absent vertebra
  cfg = _cfg(root=spine, vertebra_shape=(8, 16, 16), vertebra_spacing_mm=(1.0, 1.0, 1.0))
  reader = sources.VolumeReader(spine, cache_bytes=8 << 20)
  crops, present = transforms.make_vertebra_crops(reader, study, cfg)
  assert crops.shape == (7, 8, 16, 16)
  np.testing.assert_array_equal(present, [1, 1, 1, 0, 1, 1, 1])
  assert np.all(crops[3] == 0)
  # Each present crop is centred in its bone block (700 HU), with soft tissue around in y/x.
  seg = reader.read(store.SEGMENTATIONS, 'u1', (0, 0, 0), study.shape)
  for v in np.flatnonzero(present):
    np.testing.assert_allclose(crops[v, 3:5, 7:9, 7:9], 700.0, atol=1e-3)
    z0, y0, x0, z1, y1, x1 = study.vertebra_boxes[f'C{v + 1}']
    assert np.all(seg[z0:z1, y0:y1, x0:x1] == v + 1)
  # Training mode: same rng -> same crops; different rng -> different.
  cfg.augment.enabled = True
  a, _ = transforms.make_vertebra_crops(reader, study, cfg, np.random.default_rng(5))
  b, _ = transforms.make_vertebra_crops(reader, study, cfg, np.random.default_rng(5))
  c, _ = transforms.make_vertebra_crops(reader, study, cfg, np.random.default_rng(6))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a[present], c[present])


def test_training_crops_at_predicted_boxes_at_the_given_rate(spine):
  """vertebra_predicted_box_prob: per vertebra, the localizer's box instead of the mask's."""
  study, = manifest.load_manifest(spine)
  # "Predicted" boxes: the true ones moved 2 voxels in y (x for C3), none for C5.
  pred = {}
  for name, (z0, y0, x0, z1, y1, x1) in study.vertebra_boxes.items():
    if name != 'C5':
      dy, dx = (0, 2) if name == 'C3' else (2, 0)
      pred[name] = (z0, y0 + dy, x0 + dx, z1, y1 + dy, x1 + dx)
  study = dataclasses.replace(study, predicted_vertebra_boxes=pred)
  cfg = _cfg(root=spine, vertebra_shape=(8, 16, 16), vertebra_spacing_mm=(1.0, 1.0, 1.0))
  reader = sources.VolumeReader(spine, cache_bytes=8 << 20)
  at_true, _ = transforms.make_vertebra_crops(reader, study, cfg)
  as_predicted = dataclasses.replace(study, vertebra_boxes={**study.vertebra_boxes, **pred})
  at_pred, _ = transforms.make_vertebra_crops(reader, as_predicted, cfg)
  moved = [v for v in range(7) if not np.allclose(at_true[v], at_pred[v])]
  assert moved == [0, 1, 2, 3, 5, 6]  # every vertebra with a predicted box, not C5
  # Evaluation (no rng) and probability 0 keep the mask's boxes.
  cfg.vertebra_predicted_box_prob = 1.0
  np.testing.assert_array_equal(transforms.make_vertebra_crops(reader, study, cfg)[0], at_true)
  cfg.vertebra_predicted_box_prob = 0.0
  got, _ = transforms.make_vertebra_crops(reader, study, cfg, np.random.default_rng(0))
  np.testing.assert_array_equal(got, at_true)
  cfg.vertebra_predicted_box_prob = 1.0
  got, _ = transforms.make_vertebra_crops(reader, study, cfg, np.random.default_rng(0))
  np.testing.assert_array_equal(got, at_pred)
  # At 0.5 each vertebra draws on its own: both kinds occur, at about half the crops.
  cfg.vertebra_predicted_box_prob = 0.5
  from_pred = []
  for seed in range(40):
    got, _ = transforms.make_vertebra_crops(reader, study, cfg, np.random.default_rng(seed))
    for v in moved:
      is_pred = np.array_equal(got[v], at_pred[v])
      assert is_pred or np.array_equal(got[v], at_true[v])
      from_pred.append(is_pred)
  assert 0.35 < np.mean(from_pred) < 0.65, np.mean(from_pred)


def test_box_jitter_moves_each_face_on_its_own_within_the_bound(spine):
  """vertebra_box_jitter_mm: every face of every box moves by at most j mm (to the voxel),
  independently (the box's size changes, not only its place); off without an rng or at 0."""
  study, = manifest.load_manifest(spine)
  cfg = _cfg(root=spine, vertebra_box_jitter_mm=6.0)
  assert transforms._training_boxes(study, cfg, None) is None  # pylint: disable=protected-access
  bound = 6.0 / np.tile(study.spacing_mm, 2) + 0.5
  moves = []
  for seed in range(30):
    got = transforms._training_boxes(study, cfg, np.random.default_rng(seed))  # pylint: disable=protected-access
    assert set(got) == set(study.vertebra_boxes)
    for name, box in study.vertebra_boxes.items():
      d = np.asarray(got[name]) - np.asarray(box)
      assert (np.abs(d) <= bound).all(), (name, d)
      moves.append(d)
  moves = np.array(moves)
  assert (moves > 0).any(axis=0).all() and (moves < 0).any(axis=0).all()  # both ways, each face
  size_change = moves[:, 3:] - moves[:, :3]
  assert (size_change != 0).mean() > 0.5  # not a rigid shift of the box
  cfg.vertebra_box_jitter_mm = 0.0
  assert transforms._training_boxes(study, cfg, np.random.default_rng(0)) is None  # pylint: disable=protected-access


def test_intensity_jitter_bounds_and_padding():
  cfg = data_config.get_config()
  cfg.augment.noise_hu = 0.0
  t = transforms.RandomIntensity(cfg)
  img = np.full((4, 4, 4), 100.0, np.float32)
  out = t.random_map({'image': img.copy(), 'mask': True}, np.random.default_rng(0))['image']
  v = float(out[0, 0, 0])
  assert np.all(out == v) and v != 100.0
  assert 100 * 0.95 - 20 <= v <= 100 * 1.05 + 20
  pad = t.random_map({'image': img.copy(), 'mask': False}, np.random.default_rng(0))['image']
  np.testing.assert_array_equal(pad, img)


@pytest.mark.parametrize('order', [0, 1])
def test_clipped_pooled_crop_equals_crop_of_explicitly_padded_volume(order):
  # The crop runs off three faces of the volume: pooled cells straddling the edge must average
  # in pad_value exactly as if the volume had been padded with it beforehand.
  rng = np.random.default_rng(4)
  vol = rng.integers(-1000, 1500, size=(30, 41, 37)).astype(np.int16)
  a_mm = geometry.mm_to_index((1.0, 0.5, 0.4), fixtures.STANDARD_DIRECTION)
  aug = geometry.Augment(angles_rad=(0.1, 0.0, -0.05))
  cmap = geometry.crop_map((3.0, 35.0, 2.5), a_mm, (12, 14, 10), (2.0, 1.5, 1.3), aug)
  assert cmap.pool == (2, 3, 3)
  if order == 0:
    cmap = geometry.CropMap(cmap.matrix, cmap.offset, cmap.shape, (1, 1, 1))
  out = geometry.resample(_numpy_read(vol), vol.shape, cmap, pad_value=-1024, order=order)
  m = 25
  padded = np.pad(vol, m, constant_values=-1024)
  shifted = geometry.CropMap(cmap.matrix, cmap.offset + m, cmap.shape, cmap.pool)
  ref = geometry.resample(_numpy_read(padded), padded.shape, shifted, pad_value=-1024,
                          order=order)
  assert (out == -1024).mean() > 0.2 and (out != -1024).mean() > 0.2  # really clipped
  np.testing.assert_allclose(out, ref, atol=1e-2)


def test_segmentation_crop_follows_the_image_crop(spine):
  study, = manifest.load_manifest(spine)
  cfg = _cfg(root=spine, input_shape=(24, 32, 32), spacing_mm=(3.0, 1.5, 1.5))
  cfg.augment.enabled = True
  reader = sources.VolumeReader(spine, cache_bytes=8 << 20)
  image, seg = transforms.make_region_crop(reader, study, cfg, np.random.default_rng(1),
                                           with_segmentation=True)
  assert seg.dtype == np.uint8 and set(np.unique(seg)) <= set(range(8)) and seg.max() == 7
  # Noise-free phantom: bone (700 HU) exactly where the mask is, up to interpolation at the
  # edges of each vertebra (discs between them are thinner than an output voxel).
  inner = np.any([ndi.binary_erosion(seg == v) for v in range(1, 8)], axis=0)
  outer = ~ndi.binary_dilation(seg > 0, iterations=1)
  assert inner.sum() > 50 and np.all(np.abs(image[inner] - 700) < 1)
  assert np.all(image[outer] < 250)  # soft tissue or air, a little partial volume at most


def test_z_zoom_stretches_only_z_and_leaves_older_streams_alone():
  """augment.scale_z: one more draw, only when > 0 (configs without it crop what they always
  did); the map's z spacing alone changes."""
  kw = dict(jitter_mm=(3.0, 2.0, 1.0), rotate_deg=5.0, scale=0.1, flip_x_prob=0.5)
  rng = np.random.default_rng(7)
  u, flip = rng.uniform(-1.0, 1.0, size=7), rng.uniform() < 0.5
  a = geometry.sample_augment(np.random.default_rng(7), **kw)
  assert a.zoom == pytest.approx(1.0 + 0.1 * u[6]) and a.flip_x == flip and a.zoom_z == 1.0
  np.testing.assert_allclose(a.jitter_mm, u[:3] * [3.0, 2.0, 1.0])
  b = geometry.sample_augment(np.random.default_rng(7), scale_z=0.2, **kw)
  assert (b.jitter_mm, b.zoom, b.flip_x) == (a.jitter_mm, a.zoom, a.flip_x)
  assert 0.8 <= b.zoom_z <= 1.2 and b.zoom_z != 1.0
  eye = np.eye(3)
  plain = geometry.crop_map((10, 10, 10), eye, (8, 8, 8), (2.0, 1.0, 1.0))
  tall = geometry.crop_map((10, 10, 10), eye, (8, 8, 8), (2.0, 1.0, 1.0),
                           geometry.Augment(zoom_z=1.25))
  np.testing.assert_allclose(np.diag(tall.matrix), np.diag(plain.matrix) * [1.25, 1.0, 1.0])
  centre = lambda m: m.matrix @ np.full(3, 3.5) + m.offset
  np.testing.assert_allclose(centre(tall), centre(plain))  # about the crop's centre


def _fov_cfg(prob=1.0, mm=(10.0, 20.0)):
  cfg = _cfg(crop_mode='volume', input_shape=(16, 8, 8), volume_spacing_mm=())
  cfg.augment.enabled = True
  cfg.augment.update(jitter_mm=(0.0, 0.0, 0.0), rotate_deg=0.0, scale=0.0, flip_x_prob=0.0,
                     fov_cut_prob=prob, fov_cut_mm=mm)
  return cfg


def test_fov_cut_takes_slices_off_the_top_and_bottom_whatever_the_slice_order():
  """augment.fov_cut_prob: U[0, top] mm off the superior end and U[0, bottom] mm off the
  inferior one, on the index axis closest to head-feet, whichever way it runs."""
  u = np.random.default_rng(3).uniform(size=4)
  top, bottom = int(round(u[1] * 10 / 2)), int(round(u[3] * 20 / 2))
  assert top > 0 and bottom > 0 and top != bottom  # the seed shows which end is which
  cfg, shape, spacing = _fov_cfg(), (50, 8, 8), (2.0, 1.0, 1.0)
  head_first = fixtures.STANDARD_DIRECTION  # index 0 = the top slice
  feet_first = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
  cut = lambda d, sh=shape, sp=spacing: transforms.fov_cut(sh, sp, d, cfg,
                                                           np.random.default_rng(3))
  assert cut(head_first) == (0, top, 50 - bottom)
  assert cut(feet_first) == (0, bottom, 50 - top)
  sagittal = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))  # index 2 runs to the feet
  assert cut(sagittal, (8, 8, 50), (1.0, 1.0, 2.0)) == (2, top, 50 - bottom)
  # Off: no cut and no draw, so the streams of configs without it are unchanged.
  rng = np.random.default_rng(3)
  assert transforms.fov_cut(shape, spacing, head_first, _fov_cfg(prob=0.0), rng) is None
  assert rng.uniform() == u[0]
  assert transforms.fov_cut(shape, spacing, head_first, cfg, None) is None
  # Never more than half the scan.
  _, lo, hi = transforms.fov_cut(shape, spacing, head_first, _fov_cfg(mm=(1e3, 1e3)),
                                 np.random.default_rng(3))
  assert hi - lo >= 25 and lo > 0 and hi < 50


def test_volume_crop_of_a_cut_scan_is_the_crop_of_the_shorter_scan():
  """A 'volume' crop with the cut stretches the kept slices onto the grid exactly as it would
  a scan of those slices alone; with rotation, what the map reaches beyond them is padding."""
  vol = np.random.default_rng(0).integers(-500, 1500, (40, 12, 12)).astype(np.int16)
  cfg, spacing, d = _fov_cfg(), (2.0, 1.0, 1.0), fixtures.STANDARD_DIRECTION
  cut = (0, 5, 30)
  cmap = transforms.volume_crop_map(vol.shape, spacing, d, cfg, cut=cut)
  out = geometry.resample(_numpy_read(vol), vol.shape, cmap, -1024.0)
  assert not transforms.outside_cut(cmap, cut).any()
  short = vol[5:30]
  ref_map = transforms.volume_crop_map(short.shape, spacing, d, cfg)
  ref = geometry.resample(_numpy_read(short), short.shape, ref_map, -1024.0)
  np.testing.assert_allclose(out, ref, atol=1e-3)
  tilted = transforms.volume_crop_map(vol.shape, spacing, d, cfg,
                                      geometry.Augment(angles_rad=(0.0, 0.5, 0.0), zoom=1.2), cut)
  outside = transforms.outside_cut(tilted, cut)
  z = np.einsum('j,zyxj->zyx', tilted.matrix[0],
                np.stack(np.meshgrid(*[np.arange(n) for n in tilted.shape], indexing='ij'), -1)
                ) + tilted.offset[0]
  assert outside.any() and (~outside).any()
  np.testing.assert_array_equal(outside, (z < 4.5) | (z > 29.5))


def test_region_crop_with_a_cut_pads_image_and_labels_beyond_it(spine):
  """The fine localizer's crop: the same augmented crop, with pad_hu and label 0 beyond the
  kept slices (its draws come after the spatial ones, which stay as they were)."""
  study, = manifest.load_manifest(spine)
  reader = sources.VolumeReader(spine, cache_bytes=8 << 20)
  cfg = _cfg(root=spine, input_shape=(48, 24, 24), spacing_mm=(3.0, 2.0, 2.0), fit_to_box=False)
  cfg.augment.enabled = True
  cfg.augment.update(fov_cut_prob=1.0, fov_cut_mm=(60.0, 60.0))
  image, seg = transforms.make_region_crop(reader, study, cfg, np.random.default_rng(2),
                                           with_segmentation=True)
  rng = np.random.default_rng(2)
  aug = transforms._augment(cfg, rng)
  cut = transforms.fov_cut(study.shape, study.spacing_mm, study.direction, cfg, rng)
  cmap, _ = transforms.region_crop_map(study, cfg, aug)
  outside = transforms.outside_cut(cmap, cut)
  cfg.augment.fov_cut_prob = 0.0
  image0, seg0 = transforms.make_region_crop(reader, study, cfg, np.random.default_rng(2),
                                             with_segmentation=True)
  assert outside.any() and (seg0[outside] > 0).any()  # the cut removes labelled bone
  assert np.all(image[outside] == cfg.pad_hu) and np.all(seg[outside] == 0)
  np.testing.assert_array_equal(image[~outside], image0[~outside])
  np.testing.assert_array_equal(seg[~outside], seg0[~outside])


def test_fov_cut_is_refused_where_no_crop_applies_it():
  cfg = _fov_cfg()
  cfg.crop_mode = 'vertebrae'
  with pytest.raises(ValueError, match='config.data.augment.fov_cut_prob'):
    transforms.RandomCrop(None, cfg)
  cfg.update(crop_mode='region', crop_on='device', fit_to_box=False)
  with pytest.raises(ValueError, match='fov_cut_prob'):
    transforms.RandomCrop(None, cfg)
