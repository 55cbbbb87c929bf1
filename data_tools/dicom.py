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
Each file's header is parsed once (pydicom, up to the pixel data, whose offset is kept). Pixels are
then decoded one slice at a time straight into the output volume, on a few threads (the decoders
and file reads release the GIL): native little-endian pixel data is read from that offset as raw
bytes, JPEG Lossless through imagecodecs' libjpeg-turbo (its lossless mode; liblj92 second), both
bit-identical to pydicom, which decodes everything else and anything unusual (its GDCM plugin).
Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient vectors), never by file name or InstanceNumber, and the volume is
returned with z index 0 the most superior slice.

``read_series`` returns the whole volume. ``scan_series`` stops before the pixels (every check
done, every file named on error) and ``Scan.decode`` decodes any run of slices into a caller's
buffer: the converter decodes and writes a volume a slab at a time.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import sys

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from cspine_jax import cli
from data_tools import stages

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
  hu_range: tuple[int, int] = (0, 0)  # min and max of hu, found while decoding

  def voxel_to_lps(self) -> np.ndarray:
    """4x4 matrix from (z, y, x, 1) voxel indices to LPS millimetres."""
    return _voxel_to_lps(self.direction, self.spacing, self.origin)


def _voxel_to_lps(direction, spacing, origin) -> np.ndarray:
  m = np.eye(4)
  m[:3, :3] = np.asarray(direction, float).T * np.asarray(spacing)[None, :]
  m[:3, 3] = origin
  return m


# Slices decoded at once per study: the decoders and file reads release the GIL, so a study uses a
# second core while the converter's other worker process is between studies or done (or alone,
# in predict).
DECODE_THREADS = 2


@dataclasses.dataclass
class _Slice:
  name: str
  path: str
  ds: pydicom.Dataset  # the header, up to the pixel data
  position: np.ndarray | None
  orientation: np.ndarray | None
  pixel_offset: int | None = None  # where the file's (7FE0,0010) Pixel Data element starts


def _floats(value, n: int, what: str, name: str) -> np.ndarray:
  try:
    out = np.array([float(v) for v in value], float)
  except (TypeError, ValueError) as e:
    raise StudyError(f'{name}: unreadable {what}: {e}') from None
  if out.shape != (n,) or not np.all(np.isfinite(out)):
    raise StudyError(f'{name}: {what} must have {n} finite numbers')
  return out


def _ds_floats(ds: pydicom.Dataset, keyword: str, n: int, name: str) -> np.ndarray:
  """The numbers of a decimal string (DS) tag, as ``_floats``. Parsed from the raw bytes while
  pydicom has not converted the element: its DS objects validate every number, which was most of
  the time spent checking a series' geometry."""
  element = ds.get_item(keyword)
  if (isinstance(element, RawDataElement) and isinstance(element.value, bytes)
      and element.VR in (None, 'DS')):  # None: implicit VR, where the dictionary says DS
    text = element.value.decode('ascii', 'replace').strip(' \0')
    return _floats(text.split('\\') if text else [], n, keyword, name)
  return _floats(ds.get(keyword) or [], n, keyword, name)


def _read_headers(folder: str,
                  warnings: list[str]) -> list[tuple[str, pydicom.Dataset, int | None]]:
  """Parses every file's header once: (name, header, offset of its pixel data element)."""
  try:
    names = sorted(os.listdir(folder))
  except OSError as e:
    raise StudyError(f'cannot list the study folder: {e.strerror}') from None
  out = []
  for name in names:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    offset = None
    try:
      # Headers only: pixels are decoded one slice at a time later, so memory holds one study.
      # pydicom stops with the file positioned at the pixel data element's tag.
      with open(path, 'rb') as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        offset = f.tell()
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
    out.append((name, ds, offset))
  return out


def _choose_series(files, warnings) -> list[tuple[str, pydicom.Dataset, int | None]]:
  """Keeps the largest axial CT series; says what else was there."""
  if not files:
    raise StudyError('no DICOM file in the study folder')
  groups = collections.defaultdict(list)
  for name, ds, offset in files:
    groups[str(ds.get('SeriesInstanceUID', ''))].append((name, ds, offset))
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


@dataclasses.dataclass
class Scan:
  """A series as its headers describe it, every check passed and no pixel decoded yet: the
  volume's shape and geometry (as in Series) and its slices, superior first. ``read_series``
  decodes it whole; the converter a slab at a time (``decode``), never holding all of it."""
  shape: tuple[int, int, int]  # (z, y, x)
  spacing: tuple[float, float, float]
  origin: tuple[float, float, float]
  direction: tuple
  slice_files: list[str]
  transfer_syntaxes: list[str]
  warnings: list[str]  # decode() adds its own
  study_uid_tag: str | None
  slices: list[_Slice] = dataclasses.field(repr=False)

  def voxel_to_lps(self) -> np.ndarray:
    """4x4 matrix from (z, y, x, 1) voxel indices to LPS millimetres."""
    return _voxel_to_lps(self.direction, self.spacing, self.origin)

  def decode(self, start: int, out: np.ndarray) -> tuple[int, int]:
    """Decodes slices [start, start + len(out)) straight into ``out`` (int16 HU, each slice into
    its plane), DECODE_THREADS at once; returns their min and max HU. Raises StudyError naming
    the first bad slice in z order."""
    slices = self.slices[start:start + len(out)]
    with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
      futures = [pool.submit(_slice_to_hu, s, out[k]) for k, s in enumerate(slices)]
      try:
        done = [f.result() for f in futures]
      except BaseException:
        pool.shutdown(cancel_futures=True)  # a bad study: do not decode the rest of it
        raise
    for i, warning in enumerate(('non-integer rescale: HU rounded to the nearest integer',
                                 'HU outside the int16 range were clipped')):
      if any(d[i] for d in done) and warning not in self.warnings:
        self.warnings.append(warning)
    return min(lo for _, _, (lo, _) in done), max(hi for _, _, (_, hi) in done)


def scan_series(folder: str) -> Scan:
  """The main axial CT series of ``folder`` from its headers (every file parsed once, the pixel
  data left in the files). Raises StudyError naming the bad file."""
  warnings: list[str] = []
  with stages.stage('file listing and header parsing'):
    files = _read_headers(folder, warnings)
  with stages.stage('sorting and geometry checks'):
    slices, dz = _sorted_slices(folder, _choose_series(files, warnings), warnings)
  ref = slices[0]
  row_dir, col_dir = ref.orientation[:3], ref.orientation[3:]
  row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
  dir_z = (slices[-1].position - slices[0].position)
  dir_z = dir_z / np.linalg.norm(dir_z)
  ref_spacing = _floats(ref.ds.get('PixelSpacing') or [], 2, 'PixelSpacing', ref.name)
  study_uid = ref.ds.get('StudyInstanceUID')
  return Scan(
      shape=(len(slices), int(ref.ds.Rows), int(ref.ds.Columns)),
      spacing=(dz, float(ref_spacing[0]), float(ref_spacing[1])),
      origin=tuple(float(v) for v in slices[0].position),
      direction=(tuple(dir_z.tolist()), tuple(col_dir.tolist()), tuple(row_dir.tolist())),
      slice_files=[s.name for s in slices],
      transfer_syntaxes=sorted({_syntax(s) for s in slices}),
      warnings=warnings,
      study_uid_tag=str(study_uid) if study_uid else None,
      slices=slices)


def read_series(folder: str) -> Series:
  """Reads the main axial CT series of ``folder``. Raises StudyError naming the bad file."""
  scan = scan_series(folder)
  hu = np.empty(scan.shape, np.int16)
  hu_range = scan.decode(0, hu)
  return Series(hu=hu, spacing=scan.spacing, origin=scan.origin, direction=scan.direction,
                slice_files=scan.slice_files, transfer_syntaxes=scan.transfer_syntaxes,
                warnings=scan.warnings, study_uid_tag=scan.study_uid_tag, hu_range=hu_range)


def _syntax(s: _Slice) -> str:
  return str(s.ds.file_meta.get('TransferSyntaxUID', 'missing'))


def _sorted_slices(folder: str, files, warnings: list[str]) -> tuple[list[_Slice], float]:
  """(the series' slices superior first, slice spacing) after every geometry check; StudyError
  naming the file otherwise."""
  slices = [_Slice(name, os.path.join(folder, name), ds,
                   _ds_floats(ds, 'ImagePositionPatient', 3, name),
                   _ds_floats(ds, 'ImageOrientationPatient', 6, name), offset)
            for name, ds, offset in files]
  ref = slices[0]
  ref_spacing = _ds_floats(ref.ds, 'PixelSpacing', 2, ref.name)
  # Every slice against the first, all at once; the first slice that differs is named.
  orientation_ok = np.isclose(np.stack([s.orientation for s in slices]), ref.orientation,
                              atol=1e-4).all(axis=1)
  spacings = np.stack([_ds_floats(s.ds, 'PixelSpacing', 2, s.name) for s in slices])
  spacing_ok = np.isclose(spacings, ref_spacing, rtol=1e-4).all(axis=1)
  matrices = [(s.ds.Rows, s.ds.Columns) for s in slices]
  for k in np.flatnonzero(~orientation_ok | ~spacing_ok
                          | np.array([m != matrices[0] for m in matrices]))[:1]:
    s = slices[k]
    if not orientation_ok[k]:
      raise StudyError(f'{s.name}: ImageOrientationPatient differs from {ref.name} '
                       '(inconsistent orientation within the series)')
    if not spacing_ok[k]:
      raise StudyError(f'{s.name}: PixelSpacing {spacings[k].tolist()} differs from '
                       f'{ref_spacing.tolist()} in {ref.name}')
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
  positions = np.stack([s.position for s in slices])
  proj = positions @ normal
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
  offsets = positions - positions[0]
  drift = float(np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1).max())
  if drift > 0.5 * float(ref_spacing.min()):
    raise StudyError(f'slice positions drift {drift:.2f} mm in-plane (gantry tilt or sheared '
                     f'geometry), e.g. {slices[-1].name}; not supported')
  return slices, dz


def _slice_to_hu(s: _Slice, out: np.ndarray) -> tuple[bool, bool, tuple[int, int]]:
  """Decodes one slice into ``out`` (int16 HU); returns (rounded, clipped, (min, max))."""
  pixels, bounds = _stored_into(s, out)
  if pixels.shape != out.shape:
    raise StudyError(f'{s.name}: pixel array {pixels.shape} does not match Rows x Columns')
  with stages.stage('HU conversion'):
    slope = float(s.ds.get('RescaleSlope', 1) or 1)
    intercept = float(s.ds.get('RescaleIntercept', 0) or 0)
    rounded = clipped = False
    if bounds is None or not (-32768 <= bounds[0] + intercept and bounds[1] + intercept <= 32767):
      # The stored values' possible range does not settle it (e.g. 16 bits unsigned): look.
      bounds = int(pixels.min()), int(pixels.max())
    fits = -32768 <= bounds[0] + intercept and bounds[1] + intercept <= 32767
    if slope == 1 and intercept == int(intercept) and fits:
      # Exact and fast: int16 arithmetic wraps modulo 2^16, and the result is known to fit.
      if not np.shares_memory(pixels, out):
        out[...] = pixels
      out += np.int16(intercept)
    else:
      exact = pixels.astype(np.float64) * slope + intercept
      values = np.rint(exact)
      rounded = bool(np.any(values != exact))
      clipped = bool(values.min() < -32768 or values.max() > 32767)
      out[...] = np.clip(values, -32768, 32767) if clipped else values
    return rounded, clipped, (int(out.min()), int(out.max()))


_JPEG_LOSSLESS = ('1.2.840.10008.1.2.4.57', '1.2.840.10008.1.2.4.70')
_IMPLICIT_VR = {'1.2.840.10008.1.2': True, '1.2.840.10008.1.2.1': False}  # native little endian
# Names in the converter benchmark's per-stage profile.
_SYNTAX_NAMES = {'1.2.840.10008.1.2': 'Implicit VR Little Endian',
                 '1.2.840.10008.1.2.1': 'Explicit VR Little Endian',
                 '1.2.840.10008.1.2.4.57': 'JPEG Lossless',
                 '1.2.840.10008.1.2.4.70': 'JPEG Lossless'}
# Little-endian tags: (7FE0,0010) Pixel Data; (FFFE,E000) Item; (FFFE,E0DD) Sequence Delimiter.
_PIXEL_DATA_TAG = b'\xe0\x7f\x10\x00'
_ITEM_TAG = b'\xfe\xff\x00\xe0'
_SEQUENCE_END_TAG = b'\xfe\xff\xdd\xe0'
_UNDEFINED_LENGTH = 0xFFFFFFFF
_JPEG_END = b'\xff\xd9'  # the EOI marker


def _stored_into(s: _Slice, out: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
  """(the slice's stored values, the range they can take or None): decoded into ``out``'s memory
  by the fast paths (the values are then a view of it), else by pydicom into a new array."""
  syntax = _syntax(s)
  with stages.stage(f'pixel decode ({_SYNTAX_NAMES.get(syntax, syntax)})'):
    fast = _fast_stored(s, out.view(np.uint16))
    if fast is not None:
      return fast
    return _pydicom_stored(s), None


def _decode(s: _Slice) -> np.ndarray:
  """The slice's stored values (PixelRepresentation applied), read straight from its file."""
  fast = _fast_stored(s, np.empty((int(s.ds.Rows), int(s.ds.Columns)), np.uint16))
  return fast[0] if fast is not None else _pydicom_stored(s)


def _fast_stored(s: _Slice, buf: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
  """Decodes the stored values into ``buf`` (uint16, Rows x Columns) without pydicom: native
  little-endian pixel data read from the file at the pixel data offset straight into ``buf``,
  JPEG Lossless through libjpeg-turbo. Returns (values viewing ``buf``, their possible range), or
  None for anything unusual, pydicom then decoding it or naming the error: other transfer
  syntaxes, several frames or samples, not 16 bits allocated, a length, item or marker that is
  off (a truncated file among them: the JPEG decoders would decode a cut stream silently)."""
  ds = s.ds
  syntax = _syntax(s)
  if s.pixel_offset is None or sys.byteorder != 'little' or (
      syntax not in _IMPLICIT_VR and syntax not in _JPEG_LOSSLESS):
    return None
  try:
    if (int(ds.get('SamplesPerPixel', 1)) != 1 or int(ds.get('NumberOfFrames', 1) or 1) != 1
        or int(ds.get('BitsAllocated', 0)) != 16
        or (int(ds.Rows), int(ds.Columns)) != buf.shape):
      return None
    bits = int(ds.get('BitsStored', 16))
    signed = int(ds.get('PixelRepresentation', 0)) == 1
    if not 1 <= bits <= 16:
      return None
    with open(s.path, 'rb') as f:
      f.seek(s.pixel_offset)
      if syntax in _IMPLICIT_VR:
        ok = _read_native(f, _IMPLICIT_VR[syntax], buf)
      else:
        ok = _read_jpeg_lossless(f, buf)
  except Exception:  # pylint: disable=broad-except
    return None
  if not ok:
    return None
  # As pydicom does: bits above BitsStored are not part of the value; signed values are
  # sign-extended from BitsStored.
  if signed:
    values = buf.view(np.int16)
    if bits < 16:
      values <<= np.int16(16 - bits)
      values >>= np.int16(16 - bits)
    return values, (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
  if bits < 16:
    buf &= np.uint16((1 << bits) - 1)
  return buf, (0, (1 << bits) - 1)


def _read_native(f, implicit: bool, buf: np.ndarray) -> bool:
  """Reads native pixel data (``f`` at its element) into ``buf``: the tag, (explicit VR: 'OW' or
  'OB' and 2 reserved bytes), a 4-byte length that must be exactly ``buf``'s, then the values."""
  head = f.read(8 if implicit else 12)
  if head[:4] != _PIXEL_DATA_TAG or (not implicit and head[4:6] not in (b'OW', b'OB')):
    return False
  if int.from_bytes(head[-4:], 'little') != buf.nbytes:
    return False
  return f.readinto(memoryview(buf).cast('B')) == buf.nbytes


def _read_jpeg_lossless(f, buf: np.ndarray) -> bool:
  """Decodes encapsulated JPEG Lossless pixel data (``f`` at its element) into ``buf``."""
  head = f.read(12)  # tag, 'OB', 2 reserved bytes, undefined length, then the items
  if (head[:4] != _PIXEL_DATA_TAG or head[4:6] != b'OB'
      or int.from_bytes(head[8:12], 'little') != _UNDEFINED_LENGTH):
    return False
  frame = _single_frame(f.read())
  return frame is not None and _jpeg_lossless_into(frame, buf)


def _single_frame(items: bytes) -> bytes | None:
  """The one frame of encapsulated pixel data (``items``: what follows the element's header):
  the fragments after the Basic Offset Table, joined. None unless every item is whole, the
  sequence delimiter follows them and the JPEG stream ends with its EOI marker (padding aside):
  a truncated file is left to pydicom, which names it."""
  pos, fragments = 0, []
  while pos + 8 <= len(items):
    tag, length = items[pos:pos + 4], int.from_bytes(items[pos + 4:pos + 8], 'little')
    pos += 8
    if tag == _SEQUENCE_END_TAG:
      frame = b''.join(fragments[1:])  # fragments[0] is the Basic Offset Table
      return frame if frame.rstrip(b'\0').endswith(_JPEG_END) else None
    if tag != _ITEM_TAG or pos + length > len(items):
      return None
    fragments.append(items[pos:pos + length])
    pos += length
  return None


def _jpeg_lossless_into(frame: bytes, buf: np.ndarray) -> bool:
  """Decodes a JPEG Lossless frame into ``buf``: libjpeg-turbo (lossless since 3.0; ~2x faster
  than liblj92 on these slices, ~5x pydicom's plugins), liblj92 when it refuses. False when
  neither fits."""
  for decode in (imagecodecs.jpeg8_decode, imagecodecs.ljpeg_decode):
    try:
      raw = decode(frame, out=buf)  # straight into buf (a frame of another shape raises)
    except Exception:  # pylint: disable=broad-except
      continue
    if raw.shape == buf.shape and raw.dtype.itemsize == 2:
      if not np.shares_memory(raw, buf):
        buf[...] = raw.view(np.uint16)
      return True
  return False


def _pydicom_stored(s: _Slice) -> np.ndarray:
  """The stored values through pydicom (any transfer syntax it can decode); StudyError if none."""
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
