"""Crop geometry: where an output voxel samples the volume, and the sampling itself.

A crop is an affine map from output voxel indices ``o`` (shape ``n``) to input voxel indices
``i = matrix @ o + offset``. Both crop modes (one region per study, one crop per vertebra) and
train/eval differ only in the parameters that build this map, so they share every line below.

The map is built in millimetres:

  i = c + A_mm @ (R @ diag(s_out * zoom) @ (o - (n - 1) / 2) + jitter_mm)

where c is the box centre (input voxels), R a small random rotation, and A_mm takes output-frame
millimetres to input voxel indices through the volume's ``direction`` (so every crop comes out in
the same patient orientation: inferior, posterior, left along z, y, x), optionally mirrored in x.

Sampling reads only the sub-block the map touches (plus one voxel for linear interpolation),
box-filters it by the integer part of the downsampling factor (antialiasing, and less work for
the interpolation), then runs ``scipy.ndimage.affine_transform`` with order=1; both release the
GIL, so reader threads run in parallel.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import scipy.ndimage as ndi

# Output axes (z, y, x) as LPS unit vectors: inferior, posterior, patient-left. This is the axis
# order of a standard head-first axial CT after the converter (DESIGN.md section 1), so for such
# studies the orientation change is the identity and the fast axis-aligned path applies.
CANONICAL_AXES = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random spatial parameters of one crop (identity by default)."""
  jitter_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # output-frame shift of the centre
  angles_rad: tuple[float, float, float] = (0.0, 0.0, 0.0)  # about the z, y, x output axes
  zoom: float = 1.0  # > 1 shows a larger field of view (coarser voxels)
  flip_x: bool = False
  zoom_z: float = 1.0  # along the output z axis only, on top of zoom (taller or shorter anatomy)


def sample_augment(rng: np.random.Generator, jitter_mm=(0.0, 0.0, 0.0), rotate_deg=0.0,
                   scale=0.0, flip_x_prob=0.0, scale_z=0.0) -> Augment:
  """Draws one ``Augment``; always consumes the same number of draws for the same arguments
  (stable streams; ``scale_z`` > 0 adds one, so configs without it draw what they always did)."""
  u = rng.uniform(-1.0, 1.0, size=7)
  flip = bool(rng.uniform() < flip_x_prob)
  zoom_z = float(1.0 + rng.uniform(-1.0, 1.0) * scale_z) if scale_z > 0 else 1.0
  return Augment(
      jitter_mm=tuple(float(v) for v in u[:3] * np.asarray(jitter_mm, float)),
      angles_rad=tuple(float(v) for v in u[3:6] * np.deg2rad(rotate_deg)),
      zoom=float(1.0 + u[6] * scale),
      flip_x=flip,
      zoom_z=zoom_z,
  )


def rotation(angles_rad) -> np.ndarray:
  """Rotation matrix from angles about the z, y and x axes (applied x, then y, then z)."""
  az, ay, ax = angles_rad
  cz, sz, cy, sy, cx, sx = np.cos(az), np.sin(az), np.cos(ay), np.sin(ay), np.cos(ax), np.sin(ax)
  # Axis order of vectors is (z, y, x); a rotation "about z" mixes y and x, etc.
  rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
  return rz @ ry @ rx


def mm_to_index(spacing_mm, direction, canonical: bool = True) -> np.ndarray:
  """A_mm: output-frame millimetres -> input voxel index displacements.

  LPS position of index i is origin + D^T diag(s) i, so i = diag(1/s) D^-T (p - origin); an
  output-frame displacement d is the LPS vector CANONICAL_AXES^T d. D need not be orthonormal
  (gantry tilt), hence the inverse rather than a transpose.
  """
  s = np.asarray(spacing_mm, float)
  if not canonical:
    return np.diag(1.0 / s)
  d = np.asarray(direction, float)
  m = np.diag(1.0 / s) @ np.linalg.inv(d.T) @ CANONICAL_AXES.T
  # Snap round-off so that axis-aligned studies keep an exactly (signed) permutation matrix.
  m[np.abs(m) < 1e-9 * np.abs(m).max()] = 0.0
  return m


def box_center(box) -> np.ndarray:
  """Centre (voxel index, continuous) of an end-exclusive [z0, y0, x0, z1, y1, x1] box."""
  b = np.asarray(box, float)
  return (b[:3] + b[3:] - 1.0) / 2.0


def box_extent_mm(box, a_mm: np.ndarray) -> np.ndarray:
  """Extent (mm) along the output axes of the axis-aligned input box."""
  b = np.asarray(box, float)
  size = b[3:] - b[:3]
  corners = np.array(np.meshgrid(*[[-0.5, 0.5]] * 3, indexing='ij')).reshape(3, -1) * size[:, None]
  out = np.linalg.solve(a_mm, corners)
  return out.max(1) - out.min(1)


@dataclasses.dataclass(frozen=True)
class CropMap:
  """i = matrix @ o + offset, for output indices o of ``shape``; ``pool`` are antialias factors.

  ``step``: input voxels per output voxel along each input axis, of the unrotated map (pool is
  its integer part); None without antialiasing. Kept so that the map can be moved onto a coarser
  grid (``rescale``) with the pool that grid needs.
  """
  matrix: np.ndarray
  offset: np.ndarray
  shape: tuple[int, int, int]
  pool: tuple[int, int, int]
  step: tuple[float, float, float] | None = None


def crop_map(center_index, a_mm: np.ndarray, shape: Sequence[int], spacing_mm,
             augment: Augment = Augment(), antialias: bool = True) -> CropMap:
  """The affine map of a crop of ``shape`` voxels of ``spacing_mm`` centred at ``center_index``."""
  n = np.asarray(shape, float)
  s_out = np.asarray(spacing_mm, float) * augment.zoom * np.array([augment.zoom_z, 1.0, 1.0])
  lin = np.diag(s_out)
  if augment.flip_x:
    lin = lin @ np.diag([1.0, 1.0, -1.0])
  if any(augment.angles_rad):
    lin = rotation(augment.angles_rad) @ lin
  matrix = a_mm @ lin
  offset = (np.asarray(center_index, float) + a_mm @ np.asarray(augment.jitter_mm, float)
            - matrix @ ((n - 1.0) / 2.0))
  pool, step = (1, 1, 1), None
  if antialias:
    # Factor per input axis from the unrotated map: small rotations barely change bandwidth.
    step = tuple(float(v) for v in np.abs(a_mm @ np.diag(s_out)).max(1))
    pool = _pool_of(step)
  return CropMap(matrix, offset, tuple(int(v) for v in shape), pool, step)


def _pool_of(step) -> tuple[int, int, int]:
  return tuple(int(v) for v in np.maximum(np.floor(np.asarray(step) + 1e-6), 1))


def rescale(cmap: CropMap, scale) -> CropMap:
  """The same crop on a grid whose index is ``scale`` (per axis) times this one's, with the pool
  that grid needs: a derived level (cspine_jax/data/levels.py), whose index 0 is this grid's."""
  f = np.asarray(scale, float)
  step = None if cmap.step is None else tuple(float(v) for v in np.asarray(cmap.step) * f)
  return CropMap(f[:, None] * cmap.matrix, f * cmap.offset, cmap.shape,
                 (1, 1, 1) if step is None else _pool_of(step), step)


def region_box(study_boxes: dict, names=None):
  """Union (voxel box) of the given vertebra boxes, or None when none is known."""
  boxes = [study_boxes[k] for k in (names or study_boxes) if k in study_boxes]
  if not boxes:
    return None
  b = np.asarray(boxes)
  return tuple(int(v) for v in np.concatenate([b[:, :3].min(0), b[:, 3:].max(0)]))


def fit_spacing(box, a_mm, shape, margin_mm) -> np.ndarray:
  """Per-axis spacing that stretches ``box`` plus ``margin_mm`` per side onto ``shape``."""
  extent = box_extent_mm(box, a_mm) + 2.0 * float(margin_mm)
  return extent / np.asarray(shape, float)


def source_block(cmap: CropMap, volume_shape):
  """(lo_clipped, hi_clipped, lo, hi): the [lo, hi) voxel block that the map samples.

  [lo, hi) is a whole number of pool cells; the clipped block (inside the volume) may be empty.
  """
  n = np.asarray(cmap.shape, float) - 1.0
  corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 3, indexing='ij')).reshape(3, -1) * n[:, None]
  pts = cmap.matrix @ corners + cmap.offset[:, None]
  pool = np.asarray(cmap.pool)
  # One more voxel each side for linear interpolation; pooling widens it by the pool factor.
  lo = np.floor(pts.min(1)).astype(int) - pool
  hi = np.ceil(pts.max(1)).astype(int) + 1 + pool
  # Align the block on the pool grid (relative to lo) so pooled voxels tile it exactly.
  hi = lo + -(-(hi - lo) // pool) * pool
  shape = np.asarray(volume_shape)
  return np.clip(lo, 0, shape), np.clip(hi, 0, shape), lo, hi


def resample(read: Callable[[np.ndarray, np.ndarray], np.ndarray], volume_shape, cmap: CropMap,
             pad_value: float, order: int = 1) -> np.ndarray:
  """Samples the crop, float32 of ``cmap.shape``; reads only the block the map touches.

  ``read(lo, hi)`` returns the volume's [lo, hi) block (hi > lo on every axis). Points outside
  the volume take ``pad_value``. order=0 (nearest, no pooling) is for label masks.
  """
  lo_c, hi_c, lo, hi = source_block(cmap, volume_shape)
  if np.any(hi_c <= lo_c):  # Entirely outside the volume.
    return np.full(cmap.shape, pad_value, np.float32 if order == 1 else np.uint8)
  block = read(lo_c, hi_c)
  pool = np.asarray(cmap.pool if order == 1 else (1, 1, 1))
  # Pooled axes keep the grid anchored at the unclipped lo (cells straddling the volume's edge
  # average in pad_value); unpooled axes need no grid and start at the clipped lo.
  origin = np.where(pool > 1, lo + (pool - 1) / 2.0, lo_c).astype(float)
  for axis in range(3):  # Outer axes first: their strided adds move whole contiguous rows.
    if pool[axis] > 1:
      block = _pool_axis(block, int(axis), int(pool[axis]), int(lo_c[axis] - lo[axis]),
                         int(hi[axis] - lo[axis]) // int(pool[axis]), pad_value)
  matrix = cmap.matrix / pool[:, None]
  offset = (cmap.offset - origin) / pool
  if np.count_nonzero(matrix - np.diag(np.diagonal(matrix))) == 0:
    matrix = np.diagonal(matrix)  # scipy's separable zoom-shift path: ~20% faster.
  # int16 input is fine: scipy interpolates in double and writes float32 directly.
  # 'grid-constant': outside the block is pad_value *with* interpolation, i.e. exactly as if
  # the volume had been padded (plain 'constant' snaps the last half voxel to pad_value).
  out = ndi.affine_transform(block, matrix, offset=offset, output_shape=cmap.shape, order=order,
                             mode='grid-constant', cval=pad_value, prefilter=False,
                             output=np.float32 if order == 1 else block.dtype)
  return out


def _pool_axis(a: np.ndarray, axis: int, p: int, before: int, n: int,
               pad_value: float) -> np.ndarray:
  """Means over cells of ``p`` voxels along ``axis``, float32 with ``n`` cells.

  ``a`` starts ``before`` voxels after the first cell's start; voxels of a cell that fall
  outside ``a`` count as ``pad_value``. Strided slice adds: numpy reductions over a short
  inner axis of a reshaped array are ~10x slower.
  """
  length = a.shape[axis]
  shape = list(a.shape)
  shape[axis] = n
  parts = []  # (cells k0:k1, strided view of a) for each offset j within a cell
  count = np.zeros(n, np.float32)  # in-volume voxels per cell
  for j in range(p):
    k0 = max(0, -(-(before - j) // p))  # first cell whose j-th voxel is inside a
    k1 = min(n, (before + length - 1 - j) // p + 1)
    if k1 <= k0:
      continue
    d0 = k0 * p + j - before
    src = [slice(None)] * a.ndim
    src[axis] = slice(d0, d0 + (k1 - k0 - 1) * p + 1, p)
    parts.append((k0, k1, a[tuple(src)]))
    count[k0:k1] += 1
  if len(parts) >= 2 and all(k0 == 0 and k1 == n for k0, k1, _ in parts):
    # Common case (block inside the volume): one fused cast-and-add pass per view.
    out = np.add(parts[0][2], parts[1][2], dtype=np.float32)
    for _, _, view in parts[2:]:
      out += view
  else:
    out = np.zeros(shape, np.float32)
    for k0, k1, view in parts:
      dst = [slice(None)] * a.ndim
      dst[axis] = slice(k0, k1)
      out[tuple(dst)] += view
  if pad_value and np.any(count < p):
    fill = np.float32(pad_value) * (p - count)
    out += fill.reshape([-1 if d == axis else 1 for d in range(a.ndim)])
  out *= np.float32(1.0 / p)
  return out
