"""Puts a NIfTI vertebra mask on a DICOM volume's grid, through both affines (never a fixed flip).

NIfTI voxel -> RAS millimetres is the image affine (sform, else qform); the DICOM volume's voxel
-> LPS millimetres comes from ImagePositionPatient/ImageOrientationPatient/spacing. RAS and LPS
differ by the sign of the first two axes. For each voxel of the DICOM grid we find the NIfTI voxel
at the same patient position (nearest neighbour). When the two grids are axis-aligned (the usual
case, whatever the permutation and flips of the NIfTI's voxel order) this is a gather along each
axis; otherwise it is done slice by slice.
"""
from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(integer label array, voxel->RAS affine) of a NIfTI file (.nii or .nii.gz)."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  img = nib.load(path)
  data = np.asanyarray(img.dataobj)
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ValueError(f'expected a 3-D mask, got shape {data.shape}')
  if not np.issubdtype(data.dtype, np.integer):
    data = np.rint(data)
  return data.astype(np.int32), np.asarray(img.affine, float)


def to_grid(data: np.ndarray, affine_ras: np.ndarray, voxel_to_lps: np.ndarray,
            shape: tuple[int, int, int]) -> tuple[np.ndarray, float]:
  """Resamples ``data`` onto the DICOM grid; returns (mask, fraction of the grid it covers)."""
  # target (z, y, x, 1) -> NIfTI continuous voxel index.
  m = np.linalg.inv(affine_ras) @ LPS_TO_RAS @ voxel_to_lps
  lin = m[:3, :3]
  src_axis = np.argmax(np.abs(lin), axis=0)  # source axis that each target axis moves along
  axis_aligned = (len(set(src_axis.tolist())) == 3 and
                  np.allclose(lin[np.arange(3)[:, None] != src_axis[None, :]], 0, atol=1e-6))
  out = np.zeros(shape, np.int32)
  if axis_aligned:
    # Each source index depends on one target axis only: gather axis by axis.
    idx, valid = [], []
    for t in range(3):
      s = src_axis[t]
      i = np.rint(lin[s, t] * np.arange(shape[t]) + m[s, 3]).astype(np.int64)
      ok = (i >= 0) & (i < data.shape[s])
      idx.append(np.where(ok, i, 0))
      valid.append(ok)
    src = np.transpose(data, src_axis)
    out = src[np.ix_(*idx)]
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    out = np.where(inside, out, 0)
    coverage = float(np.prod([v.mean() for v in valid]))
  else:
    yy, xx = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing='ij')
    covered = 0
    for z in range(shape[0]):
      pts = np.stack([np.full(yy.size, z), yy.ravel(), xx.ravel(), np.ones(yy.size)])
      ijk = np.rint(m[:3] @ pts).astype(np.int64)
      ok = np.all((ijk >= 0) & (ijk < np.array(data.shape)[:, None]), axis=0)
      vals = np.zeros(yy.size, np.int32)
      vals[ok] = data[ijk[0, ok], ijk[1, ok], ijk[2, ok]]
      out[z] = vals.reshape(yy.shape)
      covered += int(ok.sum())
    coverage = covered / float(np.prod(shape))
  return out, coverage


def cervical_labels(mask: np.ndarray) -> np.ndarray:
  """The contract's labels: 1-7 = C1-C7, everything else (thoracic 8-19, unknown) -> 0."""
  return np.where((mask >= 1) & (mask <= 7), mask, 0).astype(np.uint8)
