"""Derived levels: each volume box-filtered and resampled once onto isotropic 1 and 2 mm grids.

(And the true mask, nearest neighbour, on the 2 mm grid: the localizer's labels.)

A training crop rarely wants the scanner's resolution: `configs/vit_b2.py` samples 128^3 voxels
of (1.25, 1, 1) mm, which at 0.7 x 0.35 x 0.35 mm spans ~30 M source voxels (60 MB of int16) to
read, decompress and anti-alias for 2 M outputs. The converter therefore writes, beside every
volume, the same scan on coarser grids (``store.VOLUME_LEVELS``); a crop reads the coarsest level
that is at most ``SLACK`` times coarser than its finest output spacing (``choose``), ~10x fewer
voxels, and the full-resolution volume stays the reference (DESIGN.md section 1).

Grid of a level of L mm: the volume's origin and direction, spacing L on every axis, level
voxel j at volume index i = j * L / s (s the volume's spacing), ``level_shape`` voxels: the last
one at or before the volume's last voxel centre. Values: the volume averaged over cells of
floor(L / s) voxels per axis (cells anchored at index 0; the last, partial cell averages what it
has), then linearly interpolated at the level's voxel centres, rounded to int16 HU. The 2 mm
level is computed the same way from the 1 mm one. Done in slabs of z, so memory stays ~ the
volume plus a few dozen slices, and deterministic: the converter's output stays byte-identical.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.ndimage as ndi

from cspine_jax.data import geometry
from cspine_jax.data import store

# A level is used for a crop whose finest output spacing is at least L / SLACK: a crop zoomed to
# 0.9 mm (augment.scale 0.1 of vit_b2's 1 mm) reads the 1 mm level, not 30 M voxels at 0.35 mm.
SLACK = 1.25
SLAB = 32  # level slices computed at once (memory: ~SLAB * L / s_z source slices in float32)

# Upgrading a dataset converted before levels existed (named in every message about it).
UPGRADE_COMMAND = 'python -m data_tools.levels --data={root}'


def level_shape(shape, spacing_mm, level_mm: float) -> tuple[int, int, int]:
  """Voxels of the level grid: j * L <= (n - 1) * s on every axis."""
  return tuple(int(math.floor((n - 1) * s / level_mm + 1e-6)) + 1
               for n, s in zip(shape, spacing_mm))


def index_scale(spacing_mm, level_mm: float) -> np.ndarray:
  """Per axis, level index per volume index (j = i * s / L)."""
  return np.asarray(spacing_mm, float) / float(level_mm)


def choose(study, cmap: geometry.CropMap, kinds=None) -> str | None:
  """The coarsest level of ``study`` (among ``kinds``: name -> mm, default the volume levels) to
  read ``cmap`` from, or None (the full-resolution array).

  ``cmap.step`` (input voxels per output voxel along each input axis) times the volume's spacing
  is the crop's output spacing in mm there; a level qualifies when L <= SLACK * its minimum, and
  when it is not much finer than the volume's coarsest axis (L >= max(s) / SLACK): thick slices
  interpolated onto a finer level and interpolated again by the crop would blur more than the
  crop's own filter, so such studies read the volume (or a coarser level).
  """
  kinds = store.VOLUME_LEVELS if kinds is None else kinds
  if cmap.step is None or not study.levels:
    return None
  spacing = np.asarray(study.spacing_mm, float)
  finest_mm = float(np.min(np.asarray(cmap.step) * spacing))
  best = None
  for kind in study.levels:
    level_mm = kinds.get(kind)
    if level_mm is None:
      continue
    fits = spacing.max() / SLACK <= level_mm <= SLACK * finest_mm
    if fits and (best is None or level_mm > kinds[best]):
      best = kind
  return best


def sample(read_for: Callable[[str], Callable], study, cmap: geometry.CropMap, pad_value: float,
           use_levels: bool = True) -> np.ndarray:
  """``geometry.resample`` of ``cmap`` from the best level (``choose``), else the full volume.

  ``read_for(kind)`` gives the ``read(lo, hi)`` of that array of the study.
  """
  kind = choose(study, cmap) if use_levels else None
  if kind is None:
    return geometry.resample(read_for(store.VOLUMES), study.shape, cmap, pad_value)
  level_mm = store.VOLUME_LEVELS[kind]
  return geometry.resample(read_for(kind), level_shape(study.shape, study.spacing_mm, level_mm),
                           geometry.rescale(cmap, index_scale(study.spacing_mm, level_mm)),
                           pad_value)


def sample_labels(read_for: Callable[[str], Callable], study, kind: str,
                  cmap: geometry.CropMap, use_levels: bool = True) -> np.ndarray:
  """Nearest-neighbour labels of ``cmap`` from mask ``kind``: the true mask's 2 mm level where
  the crop is coarse enough for it (its labels then sit up to 1 mm from where the full mask
  has them), else the full-resolution mask."""
  level = (choose(study, cmap, store.LABEL_LEVELS)
           if use_levels and kind == store.SEGMENTATIONS else None)
  if level is None:
    return geometry.resample(read_for(kind), study.shape, cmap, 0, order=0)
  level_mm = store.LABEL_LEVELS[level]
  return geometry.resample(read_for(level), level_shape(study.shape, study.spacing_mm, level_mm),
                           geometry.rescale(cmap, index_scale(study.spacing_mm, level_mm)), 0,
                           order=0)


# ---------------------------------------------------------------------------------------------
# Building the levels (the converter, and data_tools.levels for older datasets).
# ---------------------------------------------------------------------------------------------


def _cell_means(block: np.ndarray, pool) -> np.ndarray:
  """Float32 means over cells of ``pool`` voxels anchored at the block's index 0 (the last cell
  of an axis may be partial: the mean of the voxels it has)."""
  out = block
  for axis, p in enumerate(pool):
    if p <= 1:
      continue
    n = out.shape[axis]
    cells = -(-n // p)
    shape = list(out.shape)
    shape[axis] = cells
    acc = np.zeros(shape, np.float32)
    count = np.zeros(cells, np.float32)
    for j in range(p):
      src = [slice(None)] * 3
      src[axis] = slice(j, n, p)
      view = out[tuple(src)]
      k = view.shape[axis]
      dst = [slice(None)] * 3
      dst[axis] = slice(0, k)
      acc[tuple(dst)] += view
      count[:k] += 1
    acc /= count.reshape([-1 if d == axis else 1 for d in range(3)])
    out = acc
  return out.astype(np.float32, copy=False)


def downsample(volume, spacing_mm, level_mm: float) -> np.ndarray:
  """The int16 level of ``volume`` (module docstring), computed in slabs of z.

  ``volume``: an array, or anything with ``shape`` whose ``[z0:z1]`` gives those slices as numpy
  (``SlabReader``: a volume on disk is never read whole).
  """
  s = np.asarray(spacing_mm, float)
  shape = level_shape(volume.shape, s, level_mm)
  step = level_mm / s  # volume voxels per level voxel
  pool = tuple(int(max(1, math.floor(v + 1e-6))) for v in step)
  # Pooled cell q is centred at volume index q * p + (p - 1) / 2, so level voxel j (volume
  # index j * step) sits at pooled coordinate (j * step - (p - 1) / 2) / p.
  p = np.asarray(pool, float)
  zoom = step / p
  shift = -(p - 1.0) / 2.0 / p
  out = np.empty(shape, np.int16)
  for j0 in range(0, shape[0], SLAB):
    j1 = min(shape[0], j0 + SLAB)
    # Pooled z cells this slab interpolates between, and the volume slices they average.
    q_lo = max(0, int(math.floor(j0 * zoom[0] + shift[0])))
    q_hi = min(-(-volume.shape[0] // pool[0]), int(math.floor((j1 - 1) * zoom[0] + shift[0])) + 2)
    pooled = _cell_means(np.asarray(volume[q_lo * pool[0]:q_hi * pool[0]]), pool)
    offset = np.array([j0 * zoom[0] + shift[0] - q_lo, shift[1], shift[2]])
    slab = ndi.affine_transform(pooled, zoom, offset=offset, output_shape=(j1 - j0,) + shape[1:],
                                order=1, mode='nearest', prefilter=False, output=np.float32)
    np.rint(slab, out=slab)
    out[j0:j1] = np.clip(slab, -32768, 32767).astype(np.int16)
  return out


class SlabReader:
  """z-slabs of a zarr3 volume on disk, read as numpy (for ``downsample``)."""

  def __init__(self, path: str):
    self._array = store.open_array(path)
    self.shape = tuple(int(n) for n in self._array.shape)

  def __getitem__(self, z: slice) -> np.ndarray:
    return self._array[z].read().result()


def build(volume, spacing_mm) -> dict[str, np.ndarray]:
  """Every level of ``store.VOLUME_LEVELS`` (finest first, each from the one before)."""
  out = {}
  source, source_spacing = volume, tuple(float(v) for v in spacing_mm)
  for kind, level_mm in sorted(store.VOLUME_LEVELS.items(), key=lambda kv: kv[1]):
    out[kind] = downsample(source, source_spacing, level_mm)
    source, source_spacing = out[kind], (level_mm,) * 3
  return out


def downsample_labels(mask: np.ndarray, spacing_mm, level_mm: float) -> np.ndarray:
  """The mask's level: at each level voxel the label of the nearest volume voxel (j * L / s
  rounded half up), so no label is ever invented."""
  shape = level_shape(mask.shape, spacing_mm, level_mm)
  index = [np.minimum(np.floor(np.arange(m) * level_mm / s + 0.5).astype(int), n - 1)
           for m, s, n in zip(shape, spacing_mm, mask.shape)]
  return np.ascontiguousarray(mask[np.ix_(*index)])


def attributes(source_attrs: dict, level_mm: float, level_of: str = store.VOLUMES) -> dict:
  """A level's zarr attributes: its source's with the level's spacing."""
  return {**source_attrs, 'spacing_mm': [float(level_mm)] * 3, 'level_of': level_of,
          'level_mm': float(level_mm)}


def write(root: str, uid: str, volume, spacing_mm, volume_attrs: dict) -> list[str]:
  """Writes every volume level of one study (each whole or not at all); returns their kinds."""
  kinds = []
  for kind, array in build(volume, spacing_mm).items():
    store.put_array(root, kind, uid, array, attributes(volume_attrs, store.VOLUME_LEVELS[kind]))
    kinds.append(kind)
  return kinds


def write_labels(root: str, uid: str, mask: np.ndarray, spacing_mm, mask_attrs: dict
                 ) -> list[str]:
  """Writes every level of the study's true mask; returns their kinds."""
  for kind, level_mm in store.LABEL_LEVELS.items():
    store.put_array(root, kind, uid, downsample_labels(mask, spacing_mm, level_mm),
                    attributes(mask_attrs, level_mm, store.SEGMENTATIONS))
  return list(store.LABEL_LEVELS)
