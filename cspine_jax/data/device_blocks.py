"""The host's half of ``data.crop_on='device'``: a fixed-shape int16 block and the crop's affine.

On an accelerator the host's cores cannot resample and augment 128^3 crops as fast as one GPU
consumes them (issue: ~0.5 CPU-s per crop at full resolution). So for region crops the host only
reads the block of the 1 mm level (cspine_jax/data/levels.py) that the crop can touch, pads it to
one shape for every study and every augmentation draw (``block_shape``: jit needs one shape),
and ships it with the map from output voxel to block voxel; the jitted step samples it
trilinearly, applies the intensity augmentation and the HU windows (cspine_jax/device_crop.py).
The crop is exactly the host path's crop from the same level (same map, same interpolation).
"""
from __future__ import annotations

import numpy as np

from cspine_jax.data import geometry
from cspine_jax.data import levels
from cspine_jax.data import store

# The level device crops read, and the most a crop may be coarser than it (levels.SLACK) or
# finer (one level voxel per output voxel: no antialiasing is done on the device).
DEVICE_LEVEL = 'volumes_1mm'
# Slices may be tilted this much from the canonical axes (data_tools/dicom.py MAX_TILT_DEG):
# their index axes are then that much rotated against the crop's.
_TILT_DEG = 2.0


def level_mm() -> float:
  return store.VOLUME_LEVELS[DEVICE_LEVEL]


def _spacing_range(cfg) -> tuple[np.ndarray, np.ndarray]:
  """(finest, coarsest) output spacing (mm) over the augmentation's zoom range."""
  s = np.asarray(cfg.spacing_mm, float)
  scale = float(cfg.augment.scale) if cfg.augment.enabled else 0.0
  return s * (1.0 - scale), s * (1.0 + scale)


def check_config(cfg) -> None:
  """ValueError naming the key when device crops cannot serve ``cfg``."""
  if cfg.crop_mode != 'region' or cfg.with_segmentation:
    raise ValueError(f"config.data.crop_on='device' serves crop_mode='region' without "
                     f'with_segmentation (got crop_mode={cfg.crop_mode!r}, with_segmentation='
                     f'{cfg.with_segmentation}); use crop_on=\'host\'')
  if cfg.augment.get('scale_z', 0.0):
    raise ValueError("config.data.crop_on='device' does not draw config.data.augment.scale_z "
                     "(a zoom along z alone); set it to 0 or use crop_on='host'")
  if cfg.augment.get('fov_cut_prob', 0.0):
    raise ValueError("config.data.crop_on='device' does not draw config.data.augment."
                     "fov_cut_prob (a shorter scan); set it to 0 or use crop_on='host'")
  if cfg.fit_to_box:
    raise ValueError("config.data.crop_on='device' needs a fixed crop spacing "
                     '(config.data.fit_to_box=False): the block has one shape for every study')
  finest, coarsest = _spacing_range(cfg)
  if finest.min() * levels.SLACK < level_mm() or coarsest.max() >= 2.0 * level_mm():
    raise ValueError(
        f'config.data.spacing_mm={tuple(cfg.spacing_mm)} (with augment.scale): '
        f"crop_on='device' samples the {level_mm():g} mm level without antialiasing, so every "
        f'output spacing must lie in [{level_mm() / levels.SLACK:g}, {2 * level_mm():g}) mm')


def block_shape(cfg) -> tuple[int, int, int]:
  """Level voxels (z, y, x) that hold every crop of ``cfg`` for any study and draw.

  The crop's half-extent in level voxels, maximised over a 9^3 grid of the rotation range
  (widened by the slices' tilt) at the largest zoom, plus a voxel each side as margin (the grid
  misses angles between its points by far less), one for the interpolation's neighbour and one
  for rounding the centre. ``region_block`` checks every crop against it.
  """
  _, coarsest = _spacing_range(cfg)
  deg = (float(cfg.augment.rotate_deg) if cfg.augment.enabled else 0.0) + _TILT_DEG
  half_out = coarsest * (np.asarray(cfg.input_shape, float) - 1.0) / 2.0  # mm, output axes
  half = np.zeros(3)
  angles = np.deg2rad(np.linspace(-deg, deg, 9))
  for az in angles:
    for ay in angles:
      for ax in angles:
        rot = np.abs(geometry.rotation((az, ay, ax)))
        half = np.maximum(half, rot @ half_out / level_mm())
  return tuple(int(v) for v in 2 * np.ceil(half + 1.0).astype(int) + 3)


def region_block(read_into, study, cmap: geometry.CropMap, shape, pad_value: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(int16 block of ``shape``, float32 (3, 4) affine: output index -> block index).

  ``cmap`` is the crop in volume index space (transforms.region_crop_map); ``read_into(lo, hi,
  out)`` reads the [lo, hi) block of the study's DEVICE_LEVEL array into ``out`` (no copy in
  between: ~1.5 of ~11 ms per crop). Outside the level the block holds ``pad_value``.
  """
  scale = levels.index_scale(study.spacing_mm, level_mm())
  lmap = geometry.rescale(cmap, scale)
  n = np.asarray(cmap.shape, float) - 1.0
  shape = np.asarray(shape)
  centre = lmap.matrix @ (n / 2.0) + lmap.offset
  lo = np.round(centre).astype(int) - (shape - 1) // 2
  corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 3, indexing='ij')).reshape(3, -1) * n[:, None]
  pts = lmap.matrix @ corners + lmap.offset[:, None]
  if np.any(np.floor(pts.min(1)) < lo) or np.any(np.ceil(pts.max(1)) > lo + shape - 1):
    raise RuntimeError(f'study {study.uid}: a device crop spans {pts.min(1)}..{pts.max(1)}, '
                       f'outside its block {lo}..{lo + shape - 1} (block_shape too small)')
  block = np.full(tuple(shape), int(round(pad_value)), np.int16)
  level_shape = np.asarray(levels.level_shape(study.shape, study.spacing_mm, level_mm()))
  lo_c, hi_c = np.clip(lo, 0, level_shape), np.clip(lo + shape, 0, level_shape)
  if np.all(hi_c > lo_c):
    dst = tuple(slice(a - b, c - b) for a, b, c in zip(lo_c, lo, hi_c))
    read_into(lo_c, hi_c, block[dst])
  affine = np.concatenate([lmap.matrix, (lmap.offset - lo)[:, None]], axis=1)
  return block, affine.astype(np.float32)
