"""Derived levels: each volume box-filtered and resampled once onto isotropic 1 and 2 mm grids.

(And the true mask, nearest neighbour, on the 2 mm grid: the localizer's labels.)

A training crop rarely wants the scanner's resolution: `configs/vit_b2.py` samples 128^3 voxels
of (1.25, 1, 1) mm, which at 0.7 x 0.35 x 0.35 mm spans ~30 M source voxels (60 MB of int16) to
read, decompress and anti-alias for 2 M outputs. The converter therefore writes, beside every
volume, the same scan on coarser grids (``store.VOLUME_LEVELS``); a crop reads the coarsest level
that is at most ``SLACK`` times coarser than its finest output spacing (``choose``; the crop
itself: transforms.sample_image), ~10x fewer voxels, and the full-resolution volume stays the
reference (DESIGN.md section 1).

Grid of a level of L mm: the volume's origin and direction, spacing L on every axis, level
voxel j at volume index i = j * L / s (s the volume's spacing), ``level_shape`` voxels: the last
one at or before the volume's last voxel centre. Values: the volume averaged over cells of
floor(L / s) voxels per axis (cells anchored at index 0; the last, partial cell averages what it
has), then linearly interpolated at the level's voxel centres (clamped at the edges), rounded to
int16 HU. The 2 mm level is computed the same way from the 1 mm one.

``LevelBuilder`` takes the volume a slab of z at a time, in order, as the converter decodes it
(numpy only: converter workers import no SciPy or TensorStore), keeps only the few pooled planes
its next level slices need, and is deterministic: the converter's output stays byte-identical,
and ``data_tools.levels`` computes the same bytes from a volume on disk.
"""
from __future__ import annotations

import math

import numpy as np

from cspine_jax.data import store

# A level is used for a crop whose finest output spacing is at least L / SLACK: a crop zoomed to
# 0.9 mm (augment.scale 0.1 of vit_b2's 1 mm) reads the 1 mm level, not 30 M voxels at 0.35 mm.
SLACK = 1.25
# ... and only where it holds at most 1 / MIN_GAIN of the volume's voxels: a level exists to read
# less; one about as fine as the volume (small or coarse scans, e.g. the demo's 64x64 studies at
# ~2.4 mm) would only interpolate the crop twice.
MIN_GAIN = 2.0
SLAB = 64  # volume slices handed to a LevelBuilder at once when reading from disk

# Upgrading a dataset converted before levels existed (named in every message about it).
UPGRADE_COMMAND = 'python -m data_tools.levels --data={root}'


def level_shape(shape, spacing_mm, level_mm: float) -> tuple[int, int, int]:
  """Voxels of the level grid: j * L <= (n - 1) * s on every axis."""
  return tuple(int(math.floor((n - 1) * s / level_mm + 1e-6)) + 1
               for n, s in zip(shape, spacing_mm))


def index_scale(spacing_mm, level_mm: float) -> np.ndarray:
  """Per axis, level index per volume index (j = i * s / L)."""
  return np.asarray(spacing_mm, float) / float(level_mm)


def choose(study, cmap, kinds=None) -> str | None:
  """The coarsest level of ``study`` (among ``kinds``: name -> mm, default the volume levels) to
  read the crop ``cmap`` (a geometry.CropMap) from, or None (the full-resolution array).

  ``cmap.step`` (input voxels per output voxel along each input axis) times the volume's spacing
  is the crop's output spacing in mm there; a level qualifies when L <= SLACK * its minimum,
  when it is not much finer than the volume's coarsest axis (L >= max(s) / SLACK): thick slices
  interpolated onto a finer level and interpolated again by the crop would blur more than the
  crop's own filter, and when it has at most 1 / MIN_GAIN of the volume's voxels; otherwise the
  volume (or a coarser level) is read.
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
    fits = (spacing.max() / SLACK <= level_mm <= SLACK * finest_mm
            and np.prod(level_mm / spacing) >= MIN_GAIN)
    if fits and (best is None or level_mm > kinds[best]):
      best = kind
  return best


# ---------------------------------------------------------------------------------------------
# Building the levels (the converter, and data_tools.levels for older datasets).
# ---------------------------------------------------------------------------------------------


def _linear(n_out: int, zoom: float, shift: float, n_in: int):
  """(lower index, upper index, upper weight) of linear interpolation at c = j * zoom + shift,
  j < n_out, on n_in samples, clamped at both ends."""
  c = np.arange(n_out) * zoom + shift
  lo = np.floor(c)
  w = (c - lo).astype(np.float32)
  lo = lo.astype(int)
  return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), w


def _interp(a: np.ndarray, axis: int, lo, hi, w) -> np.ndarray:
  shape = [1] * a.ndim
  shape[axis] = -1
  w = w.reshape(shape)
  out = np.take(a, lo, axis=axis)
  out *= 1.0 - w
  out += np.take(a, hi, axis=axis) * w
  return out


def _cell_means(block: np.ndarray, axis: int, p: int) -> np.ndarray:
  """Float32 means over cells of ``p`` voxels along ``axis`` anchored at index 0 (the last cell
  may be partial: the mean of the voxels it has)."""
  n = block.shape[axis]
  cells = -(-n // p)
  shape = list(block.shape)
  shape[axis] = cells
  acc = np.zeros(shape, np.float32)
  count = np.zeros(cells, np.float32)
  for j in range(p):
    src = [slice(None)] * block.ndim
    src[axis] = slice(j, n, p)
    view = block[tuple(src)]
    k = view.shape[axis]
    dst = [slice(None)] * block.ndim
    dst[axis] = slice(0, k)
    acc[tuple(dst)] += view
    count[:k] += 1
  acc /= count.reshape([-1 if d == axis else 1 for d in range(block.ndim)])
  return acc


class LevelBuilder:
  """One level of a volume, fed slab by slab in z order (``add``), complete after ``finish``.

  Per z cell (floor(L / s_z) slices), the in-plane cell means are taken and interpolated onto the
  level's (y, x) grid at once: only that plane is kept; level slice j interpolates the two planes
  around it, and planes no later slice needs are dropped. Memory: the level plus a few planes.
  """

  def __init__(self, shape, spacing_mm, level_mm: float):
    s = np.asarray(spacing_mm, float)
    self.shape = level_shape(shape, s, level_mm)
    self._volume_shape = tuple(int(n) for n in shape)
    step = level_mm / s  # volume voxels per level voxel
    self._pool = tuple(int(max(1, math.floor(v + 1e-6))) for v in step)
    p = np.asarray(self._pool, float)
    # Pooled cell q is centred at volume index q * p + (p - 1) / 2, so level voxel j (volume
    # index j * step) sits at pooled coordinate j * step / p - (p - 1) / (2 p).
    zoom, shift = step / p, -(p - 1.0) / (2.0 * p)
    cells = [-(-n // int(q)) for n, q in zip(shape, self._pool)]
    self._z = _linear(self.shape[0], zoom[0], shift[0], cells[0])
    self._y = _linear(self.shape[1], zoom[1], shift[1], cells[1])
    self._x = _linear(self.shape[2], zoom[2], shift[2], cells[2])
    self._out = np.empty(self.shape, np.int16)
    self._planes: dict[int, np.ndarray] = {}  # z cell -> its (y, x) plane on the level grid
    self._pending = []  # slices of the z cell being filled
    self._next_cell = 0
    self._next_slice = 0  # level slices written so far
    self._seen = 0

  def _plane(self, cell: np.ndarray) -> np.ndarray:
    """(pz, y, x) slices -> their mean on the level's (y, x) grid, float32."""
    plane = cell.astype(np.float32).mean(axis=0) if len(cell) > 1 else cell[0].astype(np.float32)
    for axis, (p, lin) in enumerate(((self._pool[1], self._y), (self._pool[2], self._x))):
      if p > 1:
        plane = _cell_means(plane, axis, p)
      plane = _interp(plane, axis, *lin)
    return plane

  def _emit(self, final: bool) -> None:
    lo, hi, w = self._z
    while self._next_slice < self.shape[0]:
      j = self._next_slice
      if not final and hi[j] >= self._next_cell:
        return  # its upper plane is not complete yet
      a, b = self._planes[lo[j]], self._planes[hi[j]]
      value = a * (1.0 - w[j]) + b * w[j]
      np.rint(value, out=value)
      self._out[j] = np.clip(value, -32768, 32767).astype(np.int16)
      self._next_slice += 1
      keep = lo[self._next_slice] if self._next_slice < self.shape[0] else self._next_cell
      for q in [q for q in self._planes if q < keep]:
        del self._planes[q]

  def add(self, slab: np.ndarray) -> None:
    """The next ``len(slab)`` slices of the volume (z order)."""
    pz = self._pool[0]
    for k in range(len(slab)):
      self._pending.append(slab[k])
      if len(self._pending) == pz:
        self._planes[self._next_cell] = self._plane(np.stack(self._pending))
        self._pending = []
        self._next_cell += 1
    self._seen += len(slab)
    self._emit(final=False)

  def finish(self) -> np.ndarray:
    """The int16 level, once every slice was added."""
    if self._seen != self._volume_shape[0]:
      raise ValueError(f'LevelBuilder got {self._seen} of {self._volume_shape[0]} slices')
    if self._pending:  # the last, partial z cell
      self._planes[self._next_cell] = self._plane(np.stack(self._pending))
      self._pending = []
      self._next_cell += 1
    self._emit(final=True)
    return self._out


class VolumeLevels:
  """Every level of ``store.VOLUME_LEVELS`` from one pass over the volume (slabs in z order):
  the finest from the volume, each coarser one from the finest level when it is done."""

  def __init__(self, shape, spacing_mm):
    ordered = sorted(store.VOLUME_LEVELS.items(), key=lambda kv: kv[1])
    self._spacing = tuple(float(v) for v in spacing_mm)
    self._first = ordered[0]
    self._rest = ordered[1:]
    self._builder = LevelBuilder(shape, spacing_mm, self._first[1])

  def add(self, slab: np.ndarray) -> None:
    self._builder.add(slab)

  def finish(self) -> dict[str, np.ndarray]:
    out = {self._first[0]: self._builder.finish()}
    source, source_mm = out[self._first[0]], self._first[1]
    for kind, level_mm in self._rest:
      out[kind] = downsample(source, (source_mm,) * 3, level_mm)
      source, source_mm = out[kind], level_mm
    return out


def downsample(volume, spacing_mm, level_mm: float) -> np.ndarray:
  """The int16 level of ``volume``: an array, or anything with ``shape`` whose ``[z0:z1]`` gives
  those slices as numpy (``SlabReader``), read ``SLAB`` slices at a time."""
  builder = LevelBuilder(volume.shape, spacing_mm, level_mm)
  for z in range(0, volume.shape[0], SLAB):
    builder.add(np.asarray(volume[z:z + SLAB]))
  return builder.finish()


class SlabReader:
  """z-slabs of a zarr3 volume on disk, read as numpy (for ``downsample``)."""

  def __init__(self, path: str):
    self._array = store.open_array(path)
    self.shape = tuple(int(n) for n in self._array.shape)

  def __getitem__(self, z: slice) -> np.ndarray:
    z0, z1, _ = z.indices(self.shape[0])  # TensorStore refuses a slice past the end
    return self._array[z0:z1].read().result()


def build(volume, spacing_mm) -> dict[str, np.ndarray]:
  """Every level of ``store.VOLUME_LEVELS`` of ``volume`` (an array or a ``SlabReader``)."""
  levels = VolumeLevels(volume.shape, spacing_mm)
  for z in range(0, volume.shape[0], SLAB):
    levels.add(np.asarray(volume[z:z + SLAB]))
  return levels.finish()


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


def write_built(root: str, uid: str, built: dict[str, np.ndarray], volume_attrs: dict
                ) -> list[str]:
  """Writes levels computed by ``VolumeLevels``/``build`` (each whole or not at all)."""
  for kind, array in built.items():
    store.put_array(root, kind, uid, array, attributes(volume_attrs, store.VOLUME_LEVELS[kind]))
  return list(built)


def write(root: str, uid: str, volume, spacing_mm, volume_attrs: dict) -> list[str]:
  """Computes and writes every volume level of one study; returns their kinds."""
  return write_built(root, uid, build(volume, spacing_mm), volume_attrs)


def write_labels(root: str, uid: str, mask: np.ndarray, spacing_mm, mask_attrs: dict
                 ) -> list[str]:
  """Writes every level of the study's true mask; returns their kinds."""
  for kind, level_mm in store.LABEL_LEVELS.items():
    store.put_array(root, kind, uid, downsample_labels(mask, spacing_mm, level_mm),
                    attributes(mask_attrs, level_mm, store.SEGMENTATIONS))
  return list(store.LABEL_LEVELS)
