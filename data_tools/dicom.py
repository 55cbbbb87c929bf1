"""Reads one axial CT series from a folder of DICOM slices into Hounsfield units and geometry.

The policy for bad input (each raises ``StudyError`` naming the file, or adds a warning):

| input                                            | policy                                       |
|--------------------------------------------------|----------------------------------------------|
| file that is not DICOM, name not ending .dcm     | ignored, warning                             |
| `.dcm` file that cannot be parsed (truncated)    | study fails                                  |
| slice whose pixel data cannot be decoded         | study fails                                  |
| no CT slice at all (e.g. an MR series)           | study fails ("modality MR, expected CT")     |
| other series beside the main one (localizer,     | the largest axial CT series is kept, the     |
|   scout, non-CT, second reconstruction)          |   others ignored with a warning              |
| duplicate slice (same position, same pixels)     | duplicate dropped, warning                   |
| two different slices at one position             | study fails                                  |
| gap in z (missing slice) or spacing off by >10%  | study fails (we never invent slices)         |
| spacing jitter between 1% and 10%                | warning; the median spacing is used          |
| orientation, pixel spacing or matrix size that   | study fails                                  |
|   differ between slices; gantry tilt; non-axial  |   (tilt: slice normal or GantryDetectorTilt  |
|                                                  |   more than MAX_TILT_DEG from the S axis)    |
| HU outside int16, or non-integer rescale         | values clipped / rounded, warning            |

Nothing from patient or institution tags is ever read into the result, messages or warnings.
Pixels are decoded one slice at a time straight from each file (pydicom with its GDCM plugin;
JPEG Lossless through imagecodecs' libljpeg, ~4x faster, bit-identical, pydicom as fallback).
Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient vectors), never by file name or InstanceNumber, and the volume is
returned with z index 0 the most superior slice.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os

import imagecodecs
import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from cspine_jax import cli

# Axial means the slice normal (row x column of ImageOrientationPatient) within MAX_TILT_DEG of
# the patient's S axis, and GantryDetectorTilt (when present) within it too; beyond, the study
# fails (the README's bad-input policy: gantry tilt and non-axial series are not converted).
# 2 degrees: headers round a truly axial orientation by < 0.01 degree and scanners that do not
# tilt write 0, so anything above is a real tilt, not noise; and a tilt the geometry does not
# show (axial orientation, GantryDetectorTilt set) shifts the slices of a 250 mm series by
# 250 * tan(2 deg) = 9 mm from end to end. Synthetic studies (mirrored rows, feet-first) are
# exactly axial: only the normal's sign changes.
MAX_TILT_DEG = 2.0
NOT_AXIAL_DEG = 45.0  # beyond this the series is sagittal/coronal-ish, not a tilted axial one


class StudyError(cli.Failure):
  """A study that cannot be converted; the message names the file and what is wrong."""


@dataclasses.dataclass
class Series:
  hu: np.ndarray  # (z, y, x) int16, z = 0 the most superior slice
  spacing: tuple[float, float, float]  # (dz, dy, dx) mm
  origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
  direction: tuple  # 3 rows: LPS unit vectors of the z, y and x array axes
  slice_files: list[str]  # file name of each z slice
  transfer_syntaxes: list[str]
  warnings: list[str]
  study_uid_tag: str | None  # the StudyInstanceUID tag (a UID, not a patient identifier)

  def voxel_to_lps(self) -> np.ndarray:
    """4x4 matrix from (z, y, x, 1) voxel indices to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(self.direction, float).T * np.asarray(self.spacing)[None, :]
    m[:3, 3] = self.origin
    return m


@dataclasses.dataclass
class _Slice:
  name: str
  path: str
  ds: pydicom.Dataset
  position: np.ndarray
  orientation: np.ndarray


def _floats(value, n: int, what: str, name: str) -> np.ndarray:
  try:
    out = np.array([float(v) for v in value], float)
  except (TypeError, ValueError) as e:
    raise StudyError(f'{name}: unreadable {what}: {e}') from None
  if out.shape != (n,) or not np.all(np.isfinite(out)):
    raise StudyError(f'{name}: {what} must have {n} finite numbers')
  return out


def _read_headers(folder: str, warnings: list[str]) -> list[tuple[str, pydicom.Dataset]]:
  """Parses every file once (pixel data kept for later decoding)."""
  try:
    names = sorted(os.listdir(folder))
  except OSError as e:
    raise StudyError(f'cannot list the study folder: {e.strerror}') from None
  out = []
  for name in names:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    try:
      # Headers only: pixels are decoded one slice at a time later, so memory holds one study.
      ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
      if not name.lower().endswith('.dcm'):
        warnings.append(f'{name}: not a DICOM file, ignored')
        continue
      try:  # DICOM without the 128-byte preamble
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        if 'SOPClassUID' not in ds:
          raise InvalidDicomError('no SOPClassUID')
      except Exception:  # pylint: disable=broad-except
        raise StudyError(f'{name}: not a readable DICOM file (truncated or corrupt)') from None
    except Exception as e:  # pylint: disable=broad-except
      raise StudyError(f'{name}: unreadable DICOM file ({type(e).__name__}: {e})') from None
    if 'SOPClassUID' not in ds:
      # A file cut inside its header parses as the file meta alone: an image with no tags,
      # which would otherwise pass as "another series" and fail the study as a gap in z.
      if not name.lower().endswith('.dcm'):
        warnings.append(f'{name}: a DICOM file without an image (no SOPClassUID), ignored')
        continue
      raise StudyError(f'{name}: not a readable DICOM file (truncated or corrupt: no SOPClassUID)')
    out.append((name, ds))
  return out


def _choose_series(files, warnings) -> list[tuple[str, pydicom.Dataset]]:
  """Keeps the largest axial CT series; says what else was there."""
  if not files:
    raise StudyError('no DICOM file in the study folder')
  groups = collections.defaultdict(list)
  for name, ds in files:
    groups[str(ds.get('SeriesInstanceUID', ''))].append((name, ds))
  candidates, others = [], []
  for uid, members in groups.items():
    ds0 = members[0][1]
    modality = str(ds0.get('Modality', '')).upper()
    image_type = [str(t).upper() for t in (ds0.get('ImageType') or [])]
    reason = None
    if modality != 'CT':
      reason = f'modality {modality or "missing"}'
    elif 'LOCALIZER' in image_type or 'SCOUT' in image_type:
      reason = 'localizer/scout'
    elif 'ImageOrientationPatient' not in ds0 or 'ImagePositionPatient' not in ds0:
      reason = 'no geometry'
    else:
      reason = _tilt_problem(ds0)
    (others if reason else candidates).append((len(members), uid, members, reason))
  if not candidates:
    reasons = sorted({f'{r} ({n} file{"s" if n > 1 else ""}, e.g. {m[0][0]})'
                      for n, _, m, r in others})
    if all(r.startswith('modality') for _, _, _, r in others):
      raise StudyError('no CT series: ' + '; '.join(sorted(
          f'{r}, expected CT ({n} file{"s" if n > 1 else ""}, e.g. {m[0][0]})'
          for n, _, m, r in others)))
    raise StudyError(f'no axial CT series: {"; ".join(reasons)}')
  candidates.sort(key=lambda c: (-c[0], c[1]))
  for n, _, members, reason in others:
    warnings.append(f'ignored a second series of {n} file(s) ({reason}), e.g. {members[0][0]}')
  for n, _, members, _ in candidates[1:]:
    warnings.append(f'ignored a smaller axial CT series of {n} file(s), e.g. {members[0][0]}')
  return candidates[0][2]


def _tilt_problem(ds: pydicom.Dataset) -> str | None:
  """Why a CT slice's series is not axial (oblique, gantry-tilted, sagittal...), or None."""
  try:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient], float).reshape(2, 3)
  except (TypeError, ValueError):
    return 'unreadable ImageOrientationPatient'
  normal = np.cross(iop[0], iop[1])
  norm = float(np.linalg.norm(normal))
  if not np.isfinite(norm) or norm < 0.5:  # the two directions are not (near) orthonormal
    return f'degenerate ImageOrientationPatient {_numbers(iop.ravel())}'
  # The normal's sign (feet-first, mirrored rows) does not matter: only its angle to the S axis.
  angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))
  tilt = None
  if 'GantryDetectorTilt' in ds and ds.GantryDetectorTilt not in (None, ''):
    try:
      tilt = float(ds.GantryDetectorTilt)
    except (TypeError, ValueError):
      return f'unreadable GantryDetectorTilt {str(ds.GantryDetectorTilt)[:20]!r}'
  orientation = (f'slice normal {angle:.1f} degrees from the patient\'s S axis '
                 f'(ImageOrientationPatient {_numbers(iop.ravel())})')
  if angle > NOT_AXIAL_DEG:
    return f'not axial: {orientation}'
  if angle > MAX_TILT_DEG or (tilt is not None and abs(tilt) > MAX_TILT_DEG):
    shown = f'GantryDetectorTilt {tilt:g} degrees, ' if tilt is not None else ''
    return (f'gantry tilt or oblique slices: {shown}{orientation}; at most {MAX_TILT_DEG:g} '
            'degrees is converted')
  return None


def _numbers(values) -> str:
  return '[' + ', '.join(f'{float(v):.4g}' for v in values) + ']'


def read_series(folder: str) -> Series:
  """Reads the main axial CT series of ``folder``. Raises StudyError naming the bad file."""
  warnings: list[str] = []
  files = _choose_series(_read_headers(folder, warnings), warnings)

  slices = []
  for name, ds in files:
    slices.append(_Slice(
        name, os.path.join(folder, name), ds,
        _floats(ds.ImagePositionPatient, 3, 'ImagePositionPatient', name),
        _floats(ds.ImageOrientationPatient, 6, 'ImageOrientationPatient', name)))
  ref = slices[0]
  ref_spacing = _floats(ref.ds.get('PixelSpacing') or [], 2, 'PixelSpacing', ref.name)
  for s in slices[1:]:
    if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
      raise StudyError(f'{s.name}: ImageOrientationPatient differs from {ref.name} '
                       '(inconsistent orientation within the series)')
    spacing = _floats(s.ds.get('PixelSpacing') or [], 2, 'PixelSpacing', s.name)
    if not np.allclose(spacing, ref_spacing, rtol=1e-4):
      raise StudyError(f'{s.name}: PixelSpacing {spacing.tolist()} differs from '
                       f'{ref_spacing.tolist()} in {ref.name}')
    if (s.ds.Rows, s.ds.Columns) != (ref.ds.Rows, ref.ds.Columns):
      raise StudyError(f'{s.name}: matrix {s.ds.Rows}x{s.ds.Columns} differs from '
                       f'{ref.ds.Rows}x{ref.ds.Columns} in {ref.name}')
  row_dir, col_dir = ref.orientation[:3], ref.orientation[3:]
  row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
  normal = np.cross(row_dir, col_dir)

  # Order along the slice normal, then make z run from superior to inferior.
  slices.sort(key=lambda s: (float(s.position @ normal), s.name))
  if normal[2] > 0:  # ascending projection = ascending LPS z = towards the head
    slices.reverse()
  slices = _drop_duplicates(slices, normal, warnings)
  if len(slices) < 2:
    raise StudyError(f'only {len(slices)} slice(s): a volume needs at least 2')
  proj = np.array([s.position @ normal for s in slices])
  steps = np.abs(np.diff(proj))
  dz = float(np.median(steps))
  worst = int(np.argmax(np.abs(steps - dz)))
  if steps[worst] > 1.5 * dz:
    missing = int(round(steps[worst] / dz)) - 1
    raise StudyError(
        f'missing slice(s): gap of {steps[worst]:.3f} mm between {slices[worst].name} and '
        f'{slices[worst + 1].name} (slice spacing {dz:.3f} mm; ~{missing} slice(s) missing)')
  if abs(steps[worst] - dz) > 0.1 * dz:
    raise StudyError(f'inconsistent slice spacing: {steps[worst]:.3f} mm between '
                     f'{slices[worst].name} and {slices[worst + 1].name}, median {dz:.3f} mm')
  if abs(steps[worst] - dz) > 0.01 * dz:
    warnings.append(f'slice spacing varies up to {abs(steps[worst] - dz):.3f} mm '
                    f'(median {dz:.3f} mm used)')
  # Slices must stack along the normal: an in-plane drift means gantry tilt or a sheared grid.
  inplane = [(s.position - slices[0].position) - ((s.position - slices[0].position) @ normal)
             * normal for s in slices]
  drift = max(float(np.linalg.norm(d)) for d in inplane)
  if drift > 0.5 * float(ref_spacing.min()):
    raise StudyError(f'slice positions drift {drift:.2f} mm in-plane (gantry tilt or sheared '
                     f'geometry), e.g. {slices[-1].name}; not supported')

  hu = np.empty((len(slices), int(ref.ds.Rows), int(ref.ds.Columns)), np.int16)
  rounded = clipped = False
  syntaxes = set()
  for k, s in enumerate(slices):
    syntaxes.add(str(s.ds.file_meta.get('TransferSyntaxUID', 'missing')))
    pixels = _decode(s)
    if pixels.shape != hu.shape[1:]:
      raise StudyError(f'{s.name}: pixel array {pixels.shape} does not match Rows x Columns')
    slope = float(s.ds.get('RescaleSlope', 1) or 1)
    intercept = float(s.ds.get('RescaleIntercept', 0) or 0)
    lo, hi = int(pixels.min()), int(pixels.max())
    fits = -32768 <= lo + intercept and hi + intercept <= 32767
    if slope == 1 and intercept == int(intercept) and fits:
      # Exact and fast: int16 arithmetic wraps modulo 2^16, and the result is known to fit.
      hu[k] = pixels
      hu[k] += np.int16(intercept)
      continue
    exact = pixels.astype(np.float64) * slope + intercept
    values = np.rint(exact)
    rounded |= bool(np.any(values != exact))
    if values.min() < -32768 or values.max() > 32767:
      clipped = True
      values = np.clip(values, -32768, 32767)
    hu[k] = values
  if rounded:
    warnings.append('non-integer rescale: HU rounded to the nearest integer')
  if clipped:
    warnings.append('HU outside the int16 range were clipped')

  dir_z = (slices[-1].position - slices[0].position)
  dir_z = dir_z / np.linalg.norm(dir_z)
  study_uid = slices[0].ds.get('StudyInstanceUID')
  return Series(
      hu=hu,
      spacing=(dz, float(ref_spacing[0]), float(ref_spacing[1])),
      origin=tuple(float(v) for v in slices[0].position),
      direction=(tuple(dir_z.tolist()), tuple(col_dir.tolist()), tuple(row_dir.tolist())),
      slice_files=[s.name for s in slices],
      transfer_syntaxes=sorted(syntaxes),
      warnings=warnings,
      study_uid_tag=str(study_uid) if study_uid else None)


_JPEG_LOSSLESS = ('1.2.840.10008.1.2.4.57', '1.2.840.10008.1.2.4.70')


def _decode(s: _Slice) -> np.ndarray:
  """The slice's stored values (PixelRepresentation applied), read straight from its file."""
  syntax = str(s.ds.file_meta.get('TransferSyntaxUID', ''))
  if syntax in _JPEG_LOSSLESS:
    fast = _decode_jpeg_lossless(s)
    if fast is not None:
      return fast
  try:
    return pixel_array(s.path)
  except Exception as e:  # pylint: disable=broad-except
    first = e
  try:
    # A file without preamble and file meta: pydicom read it with a guessed encoding.
    full = pydicom.dcmread(s.path, force=True)
    if 'TransferSyntaxUID' not in full.file_meta:
      implicit, little = full.original_encoding
      if not little:
        raise ValueError('big endian without file meta')
      full.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit
                                          else pydicom.uid.ExplicitVRLittleEndian)
      return full.pixel_array
  except Exception:  # pylint: disable=broad-except
    pass
  raise StudyError(f'{s.name}: pixel data cannot be decoded, truncated or corrupt '
                   f'({type(first).__name__}: {first})')


def _decode_jpeg_lossless(s: _Slice) -> np.ndarray | None:
  """JPEG Lossless through imagecodecs' libljpeg: ~4x faster than pydicom's plugins on these
  slices (most of the real data). Returns None (pydicom then decodes, or names the error) for
  anything unusual: several frames or samples, an unexpected shape, a decoder error."""
  try:
    ds = s.ds
    if int(ds.get('SamplesPerPixel', 1)) != 1 or int(ds.get('NumberOfFrames', 1) or 1) != 1:
      return None
    full = pydicom.dcmread(s.path)
    frame = next(generate_frames(full.PixelData, number_of_frames=1))
    raw = imagecodecs.ljpeg_decode(frame)
  except Exception:  # pylint: disable=broad-except
    return None
  if raw.shape != (int(ds.Rows), int(ds.Columns)) or raw.dtype.itemsize != 2:
    return None
  # As pydicom does: bits above BitsStored are not part of the value; signed values are
  # sign-extended from BitsStored.
  bits = int(ds.get('BitsStored', 16))
  raw = raw.view(np.uint16)
  if int(ds.get('PixelRepresentation', 0)) == 1:
    shift = np.int16(16 - bits)
    return (raw.view(np.int16) << shift) >> shift
  return raw & np.uint16((1 << bits) - 1)


def _drop_duplicates(slices: list[_Slice], normal, warnings) -> list[_Slice]:
  """Removes exact duplicate slices; two different images at one position is an error."""
  out = [slices[0]]
  for s in slices[1:]:
    prev = out[-1]
    if abs(float((s.position - prev.position) @ normal)) > 1e-3:
      out.append(s)
      continue
    if not np.array_equal(_decode(s), _decode(prev)):
      raise StudyError(f'{s.name} and {prev.name}: two different slices at the same position')
    warnings.append(f'{s.name}: duplicate of {prev.name}, dropped')
  return out
