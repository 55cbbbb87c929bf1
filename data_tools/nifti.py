"""Puts a NIfTI vertebra mask on a DICOM volume's grid, through both affines (never a fixed flip).

NIfTI voxel -> RAS millimetres is the image affine (sform, else qform); the DICOM volume's voxel
-> LPS millimetres comes from ImagePositionPatient/ImageOrientationPatient/spacing. RAS and LPS
differ by the sign of the first two axes. For each voxel of the DICOM grid we find the NIfTI voxel
at the same patient position (nearest neighbour). When the two grids are axis-aligned (the usual
case, whatever the permutation and flips of the NIfTI's voxel order) this is a gather along each
axis; otherwise it is done slice by slice.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np

from cspine_jax.data import store

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(integer label array, voxel->RAS affine) of a NIfTI file (.nii or .nii.gz)."""
  img = nib.load(path)
  data = np.asanyarray(img.dataobj)
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ValueError(f'expected a 3-D mask, got shape {data.shape}')
  if not np.issubdtype(data.dtype, np.integer):
    data = np.rint(data).astype(np.int16)
  return data, np.asarray(img.affine, float)


def to_grid(data: np.ndarray, affine_ras: np.ndarray, voxel_to_lps: np.ndarray,
            shape: tuple[int, int, int]) -> tuple[np.ndarray, float]:
  """Resamples ``data`` onto the DICOM grid; returns (mask, fraction of the grid it covers)."""
  # target (z, y, x, 1) -> NIfTI continuous voxel index.
  m = np.linalg.inv(affine_ras) @ LPS_TO_RAS @ voxel_to_lps
  lin = m[:3, :3]
  src_axis = np.argmax(np.abs(lin), axis=0)  # source axis that each target axis moves along
  axis_aligned = (len(set(src_axis.tolist())) == 3 and
                  np.allclose(lin[np.arange(3)[:, None] != src_axis[None, :]], 0, atol=1e-6))
  if axis_aligned:
    # Each source index depends on one target axis only: i_s = a * k_t + b.
    coef = np.array([lin[src_axis[t], t] for t in range(3)])
    offset = np.array([m[src_axis[t], 3] for t in range(3)])
    coverage = float(np.prod([
        _inside(coef[t], offset[t], shape[t], data.shape[src_axis[t]]).mean() for t in range(3)]))
    # np.zeros takes zeroed pages from the kernel untouched: only the source's non-zero box is
    # copied (the neck is a small part of the scan; the rest of the mask is 0 anyway).
    out = np.zeros(shape, data.dtype)
    box = store.nonzero_box(data) if coverage else None
    if box is None:
      return out, coverage
    src = np.transpose(data[box], src_axis)  # a view: axis t of src moves with target axis t
    offset = offset - np.array([box[src_axis[t]].start for t in range(3)])
    valid = [_inside(coef[t], offset[t], shape[t], src.shape[t]) for t in range(3)]
    if not all(v.any() for v in valid):
      return out, coverage
    same_step = np.allclose(np.abs(coef), 1, atol=1e-6) and np.allclose(
        offset, np.rint(offset), atol=1e-3)
    if same_step:
      # Same voxel size: a strided copy (flips are negative steps), no gather.
      dst_sl, src_sl = [], []
      for t in range(3):
        k = np.nonzero(valid[t])[0]
        a, b = int(np.rint(coef[t])), int(np.rint(offset[t]))
        first, last = a * k[0] + b, a * k[-1] + b
        dst_sl.append(slice(k[0], k[-1] + 1))
        src_sl.append(slice(first, last + a if last + a >= 0 else None, a))
      out[tuple(dst_sl)] = src[tuple(src_sl)]
    else:
      idx = []
      for t in range(3):
        i = np.rint(coef[t] * np.arange(shape[t]) + offset[t]).astype(np.int64)
        idx.append(np.where(valid[t], i, 0))
      out = src[np.ix_(*idx)]
      out[~valid[0]] = 0
      out[:, ~valid[1]] = 0
      out[:, :, ~valid[2]] = 0
  else:
    out = np.zeros(shape, data.dtype)
    yy, xx = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing='ij')
    covered = 0
    for z in range(shape[0]):
      pts = np.stack([np.full(yy.size, z), yy.ravel(), xx.ravel(), np.ones(yy.size)])
      ijk = np.rint(m[:3] @ pts).astype(np.int64)
      ok = np.all((ijk >= 0) & (ijk < np.array(data.shape)[:, None]), axis=0)
      vals = np.zeros(yy.size, data.dtype)
      vals[ok] = data[ijk[0, ok], ijk[1, ok], ijk[2, ok]]
      out[z] = vals.reshape(yy.shape)
      covered += int(ok.sum())
    coverage = covered / float(np.prod(shape))
  return out, coverage


def _inside(coef: float, offset: float, n_target: int, n_source: int) -> np.ndarray:
  """Which of the n_target indices k land inside the source along one axis (i = coef*k+offset)."""
  i = np.rint(coef * np.arange(n_target) + offset).astype(np.int64)
  return (i >= 0) & (i < n_source)


def cervical_labels(mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """The contract's labels: 1-7 = C1-C7, everything else (thoracic 8-19, unknown) -> 0; into a
  new array, or into ``out``: ``mask`` itself when it is uint8 (in place)."""
  out = np.zeros(mask.shape, np.uint8) if out is None else out
  box = store.nonzero_box(mask)  # only there is there anything to map
  if box is None:
    return out
  part = mask[box]
  if part.dtype == np.uint8:  # the usual case: one table lookup instead of three passes
    lut = np.zeros(256, np.uint8)
    lut[1:8] = np.arange(1, 8)
    out[box] = lut[part]
  else:
    out[box] = np.where((part >= 1) & (part <= 7), part, 0)
  return out
