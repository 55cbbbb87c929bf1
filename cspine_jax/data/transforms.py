"""Grain transforms: study record -> crop(s) in HU -> intensity jitter -> window channels.

Element flow (dict keys):

  source      {"study": Study | None, "mask": bool}
  VolumeCrop  (crop_mode='volume', the localizer's input) {"image": f32 (z,y,x) HU of the whole
               scanned volume stretched onto input_shape, "segmentation": u8 (z,y,x) 0..7 (the
               true mask, nearest neighbour, zeros without one), "has_segmentation": bool, ...}
  *Crop       {"image": f32 (z,y,x) HU  [vertebrae: (7,z,y,x)], "labels": f32 (8,),
               "labelled": bool, "mask": bool, "uid": str  [vertebrae: + "vertebra_mask" (7,)]
               [region with data.with_segmentation: + "segmentation" u8 (z,y,x) labels 0..7,
               "has_segmentation" bool]}
  Intensity   same, HU jittered (training only)
  HUWindows   "image" -> f32 (..., C) in [0, 1], one channel per (center, width) window

With data.crop_on='device' (region crops for accelerators) the crop transform yields instead
{"block": i16 (Bz,By,Bx) of the 1 mm level, "affine": f32 (3, 4) output index -> block index},
Intensity adds its draws as {"intensity": f32 [scale, shift, sigma], "noise_seed": u32}, and
HUWindows passes it on: the jitted step makes the image (cspine_jax/device_crop.py).

Random transforms draw everything from the ``rng`` Grain hands them, which Grain derives from
(pipeline seed, transform position, element index): an element's crop depends on nothing else.
Padding records (``study is None``) become all-zero elements without any read.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import grain

from cspine_jax import constants
from cspine_jax.data import device_blocks
from cspine_jax.data import geometry
from cspine_jax.data import levels
from cspine_jax.data import sources
from cspine_jax.data import store

NUM_VERTEBRAE = len(constants.VERTEBRAE)
# config.data.crop_mode values (_Crop): one crop of the cervical spine, seven per-vertebra crops,
# or the whole volume on a coarse grid (the localizer).
CROP_MODES = ('region', 'vertebrae', 'volume')
# config.data.crop_on values: region crops made here, or blocks that the step crops.
CROP_ON = ('host', 'device')


def _augment(cfg, rng) -> geometry.Augment:
  aug = cfg.augment
  return geometry.sample_augment(rng, jitter_mm=tuple(aug.jitter_mm), rotate_deg=aug.rotate_deg,
                                 scale=aug.scale, flip_x_prob=aug.flip_x_prob,
                                 scale_z=float(aug.get('scale_z', 0.0)))


def _augment_on(cfg, rng) -> bool:
  return rng is not None and bool(cfg.augment.enabled)


def sample_image(read_for: Callable[[str], Callable], study, cmap: geometry.CropMap,
                 pad_value: float, use_levels: bool = True) -> np.ndarray:
  """The HU crop of ``cmap``: from the coarsest derived level fine enough for it
  (``levels.choose``), else the full-resolution volume (``use_levels=False``: data.levels, or a
  dataset without levels). ``read_for(kind)`` gives the ``read(lo, hi)`` of that array."""
  kind = levels.choose(study, cmap) if use_levels else None
  if kind is None:
    return geometry.resample(read_for(store.VOLUMES), study.shape, cmap, pad_value)
  level_mm = store.VOLUME_LEVELS[kind]
  return geometry.resample(read_for(kind),
                           levels.level_shape(study.shape, study.spacing_mm, level_mm),
                           geometry.rescale(cmap, levels.index_scale(study.spacing_mm, level_mm)),
                           pad_value)


def sample_labels(read_for: Callable[[str], Callable], study, kind: str,
                  cmap: geometry.CropMap, use_levels: bool = True) -> np.ndarray:
  """Nearest-neighbour labels of ``cmap`` from mask ``kind``: the true mask's 2 mm level where
  the crop is coarse enough for it (its labels then sit up to 1 mm from where the full mask
  has them), else the full-resolution mask."""
  level = (levels.choose(study, cmap, store.LABEL_LEVELS)
           if use_levels and kind == store.SEGMENTATIONS else None)
  if level is None:
    return geometry.resample(read_for(kind), study.shape, cmap, 0, order=0)
  level_mm = store.LABEL_LEVELS[level]
  return geometry.resample(read_for(level),
                           levels.level_shape(study.shape, study.spacing_mm, level_mm),
                           geometry.rescale(cmap, levels.index_scale(study.spacing_mm, level_mm)),
                           0, order=0)


def fov_cut(shape, spacing_mm, direction, cfg, rng) -> tuple[int, int, int] | None:
  """A shorter scan (``augment.fov_cut_prob``): (axis, lo, hi), the slices [lo, hi) kept along
  the slice axis, or None (off, or no rng). Four draws whenever it is on, none when off, so
  streams of configs without it are unchanged. At most half the slices are cut; None when
  the draws cut nothing."""
  aug = cfg.augment
  prob = float(aug.get('fov_cut_prob', 0.0))
  if not _augment_on(cfg, rng) or prob <= 0.0:
    return None
  u = rng.uniform(size=4)
  top_mm, bottom_mm = (float(m) for m in aug.fov_cut_mm)
  d = np.asarray(direction, float)
  axis = int(np.argmax(np.abs(d[:, 2])))  # the index axis closest to head-feet (LPS z)
  n = int(shape[axis])
  cut = np.array([u[1] * top_mm if u[0] < prob else 0.0,
                  u[3] * bottom_mm if u[2] < prob else 0.0]) / float(spacing_mm[axis])
  if cut.sum() > n / 2:
    cut *= (n / 2) / cut.sum()
  top, bottom = (int(round(c)) for c in cut)
  if top == bottom == 0:
    return None
  if d[axis, 2] > 0:  # increasing index goes superior: the top is the high end
    return axis, bottom, n - top
  return axis, top, n - bottom


def outside_cut(cmap: geometry.CropMap, cut) -> np.ndarray:
  """Bool of ``cmap.shape``: the output voxels whose source lies outside the kept slices."""
  axis, lo, hi = cut
  m, grids = cmap.matrix[axis], [np.arange(n, dtype=float) for n in cmap.shape]
  idx = (m[0] * grids[0][:, None, None] + m[1] * grids[1][None, :, None]
         + m[2] * grids[2][None, None, :] + cmap.offset[axis])
  return (idx < lo - 0.5) | (idx > hi - 0.5)


def _sample_image(reader: sources.VolumeReader, study, cmap: geometry.CropMap, cfg) -> np.ndarray:
  return sample_image(lambda kind: reader.reader_for(kind, study.uid), study, cmap, cfg.pad_hu,
                      use_levels=bool(cfg.levels))


def _sample_labels(reader: sources.VolumeReader, study, kind: str, cmap: geometry.CropMap,
                   cfg) -> np.ndarray:
  return sample_labels(lambda k: reader.reader_for(k, study.uid), study, kind, cmap,
                       use_levels=bool(cfg.levels))


def _targets(study) -> dict:
  labelled = study is not None and study.labels is not None
  labels = np.asarray(study.labels if labelled else [0] * constants.NUM_TARGETS, np.float32)
  return {'labels': labels, 'labelled': np.bool_(labelled),
          'uid': study.uid if study is not None else ''}


def region_crop_map(study, cfg, augment: geometry.Augment = geometry.Augment()):
  """``CropMap`` of the cervical-region crop of ``study`` (boxes -> fallback), plus its source.

  Box: union of the C1..C7 boxes (true, else predicted). Fallback when a study has neither:
  the centre of the volume with a ``fallback_extent_mm`` field of view (documented in config).
  """
  a_mm = geometry.mm_to_index(study.spacing_mm, study.direction, cfg.canonical_orientation)
  shape = tuple(cfg.input_shape)
  box = geometry.region_box(study.boxes)
  if box is not None:
    center = geometry.box_center(box)
    spacing = (geometry.fit_spacing(box, a_mm, shape, cfg.margin_mm) if cfg.fit_to_box
               else np.asarray(cfg.spacing_mm, float))
    source = study.box_source
  else:
    center = (np.asarray(study.shape, float) - 1.0) / 2.0
    spacing = (np.asarray(cfg.fallback_extent_mm, float) / np.asarray(shape) if cfg.fit_to_box
               else np.asarray(cfg.spacing_mm, float))
    source = cfg.fallback
  cmap = geometry.crop_map(center, a_mm, shape, spacing, augment, cfg.antialias)
  return cmap, source


def volume_crop_map(shape, spacing_mm, direction, cfg,
                    augment: geometry.Augment = geometry.Augment(), cut=None) -> geometry.CropMap:
  """``CropMap`` of the whole scanned volume on ``cfg.input_shape`` (the coarse localizer).

  Centred on the volume's centre. With ``cfg.volume_spacing_mm`` empty, the per-axis spacing is
  the volume's extent along each output axis / input_shape: every scan is seen whole, but the
  spine looks larger in a small field of view than in a large one. With a spacing, the grid has
  that fixed physical spacing (what a localizer must see to generalize across fields of view
  and slice spacings; parts outside the scan are ``pad_hu``). Takes plain geometry (not a
  Study) so that prediction on a DICOM series in memory uses the very same map. ``cut``
  (``fov_cut``): the map covers the kept slices only, as it would a scan of those slices.
  """
  a_mm = geometry.mm_to_index(spacing_mm, direction, cfg.canonical_orientation)
  box = [0, 0, 0] + [int(n) for n in shape]
  if cut is not None:
    axis, lo, hi = cut
    box[axis], box[axis + 3] = lo, hi
  out_shape = tuple(cfg.input_shape)
  fixed = tuple(cfg.get('volume_spacing_mm') or ())
  spacing = (np.asarray(fixed, float) if fixed
             else geometry.fit_spacing(box, a_mm, out_shape, 0.0))
  return geometry.crop_map(geometry.box_center(box), a_mm, out_shape, spacing, augment,
                           cfg.antialias)


def make_volume_crop(reader: sources.VolumeReader, study, cfg, rng=None):
  """(image f32 HU, segmentation u8) of the whole volume on the localizer's grid.

  The label is the *true* mask only (a localizer never learns from its own predictions);
  zeros when the study has none (the localizer config keeps only segmented studies).
  """
  aug = _augment(cfg, rng) if _augment_on(cfg, rng) else geometry.Augment()
  cut = fov_cut(study.shape, study.spacing_mm, study.direction, cfg, rng)
  cmap = volume_crop_map(study.shape, study.spacing_mm, study.direction, cfg, aug, cut)
  image = _sample_image(reader, study, cmap, cfg)
  seg = (_sample_labels(reader, study, store.SEGMENTATIONS, cmap, cfg) if study.has_segmentation
         else np.zeros(cmap.shape, np.uint8))
  return _apply_cut(image, seg, cmap, cut, cfg)


def _apply_cut(image, seg, cmap, cut, cfg):
  """Pads what lies outside the kept slices (labels 0 there), as the shorter scan would."""
  if cut is not None:
    out = outside_cut(cmap, cut)
    image[out] = cfg.pad_hu
    if seg is not None:
      seg[out] = 0
  return image if seg is None else (image, seg)


def vertebra_crop_maps(study, cfg, augments=None, boxes=None):
  """Seven ``CropMap``s (None where the vertebra has no box), one per C1..C7.

  ``boxes``: the vertebra boxes to crop at (default ``study.boxes``: true, else predicted).
  """
  a_mm = geometry.mm_to_index(study.spacing_mm, study.direction, cfg.canonical_orientation)
  shape = tuple(cfg.vertebra_shape)
  boxes = study.boxes if boxes is None else boxes
  maps = []
  for v, name in enumerate(constants.VERTEBRAE):
    if name not in boxes:
      maps.append(None)
      continue
    box = boxes[name]
    spacing = (geometry.fit_spacing(box, a_mm, shape, cfg.vertebra_margin_mm)
               if cfg.vertebra_fit_to_box else np.asarray(cfg.vertebra_spacing_mm, float))
    aug = augments[v] if augments is not None else geometry.Augment()
    maps.append(geometry.crop_map(geometry.box_center(box), a_mm, shape, spacing, aug,
                                  cfg.antialias))
  return maps


def make_region_crop(reader: sources.VolumeReader, study, cfg, rng=None,
                     with_segmentation: bool = False):
  """One (z, y, x) float32 HU crop of the cervical region; augmented when ``rng`` is given.

  With ``with_segmentation``, returns (image, segmentation): the label mask (uint8, 0..7)
  through the same map with nearest-neighbour sampling, from the true mask where one exists,
  else the localizer's; all zeros when the study has neither.
  """
  aug = _augment(cfg, rng) if _augment_on(cfg, rng) else geometry.Augment()
  cmap, _ = region_crop_map(study, cfg, aug)
  cut = fov_cut(study.shape, study.spacing_mm, study.direction, cfg, rng)
  image = _sample_image(reader, study, cmap, cfg)
  seg = None
  if with_segmentation:
    kind = study.segmentation_kind
    seg = (np.zeros(cmap.shape, np.uint8) if kind is None
           else _sample_labels(reader, study, kind, cmap, cfg))
  return _apply_cut(image, seg, cmap, cut, cfg)


def _training_boxes(study, cfg, rng) -> dict | None:
  """Per vertebra, the predicted box instead of the true one with ``vertebra_predicted_box_prob``,
  then each face moved by up to ``vertebra_box_jitter_mm``.

  None (= ``study.boxes``) without an rng or with both at 0, so that those streams draw nothing
  extra; otherwise a fixed number of draws per key in use, whatever the study has.
  """
  prob = float(cfg.vertebra_predicted_box_prob)
  jitter = float(cfg.get('vertebra_box_jitter_mm', 0.0))
  if rng is None or (prob <= 0.0 and jitter <= 0.0):
    return None
  boxes = dict(study.boxes)
  if prob > 0.0:
    use_predicted = rng.random(NUM_VERTEBRAE) < prob
    for v, name in enumerate(constants.VERTEBRAE):
      if use_predicted[v] and name in study.predicted_vertebra_boxes:
        boxes[name] = study.predicted_vertebra_boxes[name]
  if jitter > 0.0:
    moves = rng.uniform(-1.0, 1.0, (NUM_VERTEBRAE, 6)) * jitter / np.tile(study.spacing_mm, 2)
    for v, name in enumerate(constants.VERTEBRAE):
      if name in boxes:
        b = np.asarray(boxes[name], float) + moves[v]
        lo = np.round(b[:3])
        hi = np.maximum(np.round(b[3:]), lo + 1)  # never empty
        boxes[name] = [int(x) for x in np.concatenate([lo, hi])]
  return boxes


def make_vertebra_crops(reader: sources.VolumeReader, study, cfg, rng=None):
  """Per-vertebra crops: ((7, z, y, x) float32 HU, (7,) bool present).

  Crop v is centred on vertebra C(v+1)'s box at ``vertebra_spacing_mm`` (or stretched onto
  ``vertebra_shape`` with ``vertebra_margin_mm`` context when ``vertebra_fit_to_box``); absent
  vertebrae (no true or predicted box) are zeros with present=False. With ``rng``, each crop
  gets its own spatial augmentation (seven draws, always, so streams stay aligned), and, with
  ``vertebra_predicted_box_prob``, its box from the localizer instead of the mask at that rate,
  with ``vertebra_box_jitter_mm``, its box's faces moved (`_training_boxes`).
  """
  shape = tuple(cfg.vertebra_shape)
  augments = None
  if _augment_on(cfg, rng):
    augments = [_augment(cfg, rng) for _ in range(NUM_VERTEBRAE)]
  maps = vertebra_crop_maps(study, cfg, augments, _training_boxes(study, cfg, rng))
  out = np.zeros((NUM_VERTEBRAE,) + shape, np.float32)
  present = np.zeros(NUM_VERTEBRAE, bool)
  for v, cmap in enumerate(maps):
    if cmap is not None:
      out[v] = _sample_image(reader, study, cmap, cfg)
      present[v] = True
  return out, present


class _Crop:
  """Shared body of the crop transforms (region, vertebrae or volume, random or not).

  ``cfg.crop_mode`` picks one method once, here (``CROP_MODES``); which mode a model needs is
  the task table's business (`cspine_jax/models/factory.py`), checked against the config before
  training.
  """

  def __init__(self, reader: sources.VolumeReader, cfg):
    self._reader = reader
    self._cfg = cfg
    crops = {'region': self._region, 'vertebrae': self._vertebrae, 'volume': self._volume}
    if cfg.crop_mode not in crops:
      raise ValueError(f'config.data.crop_mode={cfg.crop_mode!r}: expected one of {CROP_MODES}')
    self._crop = crops[cfg.crop_mode]
    if cfg.crop_on not in CROP_ON:
      raise ValueError(f'config.data.crop_on={cfg.crop_on!r}: expected one of {CROP_ON}')
    if cfg.crop_on == 'device':
      device_blocks.check_config(cfg)
      self._block_shape = device_blocks.block_shape(cfg)
      self._crop = self._region_block
    if cfg.augment.get('fov_cut_prob', 0.0) and cfg.crop_mode == 'vertebrae':
      raise ValueError("config.data.augment.fov_cut_prob applies to 'region' and 'volume' crops, "
                       "not crop_mode='vertebrae'; set it to 0")
    if cfg.fallback != 'center':
      raise ValueError(f'fallback={cfg.fallback!r}: only "center" exists (see data/config.py)')

  def _apply(self, element, rng):
    study = element['study']
    out = _targets(study)
    out['mask'] = np.bool_(element['mask'])
    out.update(self._crop(study, rng))
    return out

  def _region_block(self, study, rng) -> dict:
    """crop_on='device': the block and affine of the region crop (device_blocks.py)."""
    if study is None:
      return {'block': np.zeros(self._block_shape, np.int16),
              'affine': np.zeros((3, 4), np.float32)}
    aug = _augment(self._cfg, rng) if _augment_on(self._cfg, rng) else geometry.Augment()
    cmap, _ = region_crop_map(study, self._cfg, aug)
    read_into = self._reader.reader_into(device_blocks.DEVICE_LEVEL, study.uid)
    block, affine = device_blocks.region_block(read_into, study, cmap, self._block_shape,
                                               self._cfg.pad_hu)
    return {'block': block, 'affine': affine}

  def _vertebrae(self, study, rng) -> dict:
    if study is None:
      shape = (NUM_VERTEBRAE,) + tuple(self._cfg.vertebra_shape)
      return {'image': np.zeros(shape, np.float32),
              'vertebra_mask': np.zeros(NUM_VERTEBRAE, bool)}
    image, present = make_vertebra_crops(self._reader, study, self._cfg, rng)
    return {'image': image, 'vertebra_mask': present}

  def _volume(self, study, rng) -> dict:
    shape = tuple(self._cfg.input_shape)
    if study is None:
      image, seg = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    else:
      image, seg = make_volume_crop(self._reader, study, self._cfg, rng)
    return {'image': image, 'segmentation': seg,
            'has_segmentation': np.bool_(study is not None and study.has_segmentation)}

  def _region(self, study, rng) -> dict:
    shape = tuple(self._cfg.input_shape)
    if not self._cfg.with_segmentation:
      if study is None:
        return {'image': np.zeros(shape, np.float32)}
      return {'image': make_region_crop(self._reader, study, self._cfg, rng)}
    if study is None:
      image, seg = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    else:
      image, seg = make_region_crop(self._reader, study, self._cfg, rng, with_segmentation=True)
    return {'image': image, 'segmentation': seg,
            'has_segmentation': np.bool_(study is not None and
                                         study.segmentation_kind is not None)}


class RandomCrop(_Crop, grain.transforms.RandomMap):
  """Training crop: spatial augmentation from ``config.data.augment``."""

  def random_map(self, element, rng: np.random.Generator):
    return self._apply(element, rng)


class CenterCrop(_Crop, grain.transforms.Map):
  """Evaluation crop: the box-centred crop, no randomness."""

  def map(self, element):
    return self._apply(element, None)


class RandomIntensity(grain.transforms.RandomMap):
  """HU' = HU * a + b + N(0, sigma), a, b, sigma uniform per element; padding left as is."""

  def __init__(self, cfg):
    self._aug = cfg.augment

  def random_map(self, element, rng: np.random.Generator):
    aug = self._aug
    u = rng.uniform(-1.0, 1.0, size=2)
    sigma = rng.uniform(0.0, aug.noise_hu)
    if 'block' in element:  # crop_on='device': the step applies the draws (device_crop.py)
      on = bool(element['mask']) and aug.enabled
      element['intensity'] = np.array(
          [1.0 + u[0] * aug.intensity_scale, u[1] * aug.intensity_shift_hu, sigma] if on
          else [1.0, 0.0, 0.0], np.float32)
      element['noise_seed'] = np.uint32(rng.integers(0, 2**32))
      return element
    if not element['mask'] or not aug.enabled:
      return element
    image = element['image']
    image *= np.float32(1.0 + u[0] * aug.intensity_scale)
    image += np.float32(u[1] * aug.intensity_shift_hu)
    if sigma > 0:
      image += rng.standard_normal(image.shape, np.float32) * np.float32(sigma)
    return element


def apply_windows(hu: np.ndarray, windows) -> np.ndarray:
  """(...,) HU -> (..., C) float32: (HU - (center - width / 2)) / width, clipped to [0, 1]."""
  out = np.empty(hu.shape + (len(windows),), np.float32)
  for c, (center, width) in enumerate(windows):
    lo = np.float32(center - width / 2.0)
    ch = out[..., c]
    np.subtract(hu, lo, out=ch)
    ch *= np.float32(1.0 / width)
    np.clip(ch, 0.0, 1.0, out=ch)
  return out


class HUWindows(grain.transforms.Map):
  """Image HU -> one [0, 1] channel per window (channels last); padding stays all zero."""

  def __init__(self, cfg):
    self._windows = tuple(tuple(float(v) for v in w) for w in cfg.windows)

  def map(self, element):
    if 'block' in element:  # crop_on='device': windows are applied in the step
      return element
    image = element['image']
    if element['mask']:
      element['image'] = apply_windows(image, self._windows)
    else:
      element['image'] = np.zeros(image.shape + (len(self._windows),), np.float32)
    return element
