r"""Synthetic RSNA-2022-shaped dataset: CT phantoms of the neck as DICOM series, with the real quirks.

  python -m data_tools.synthetic --output=/tmp/rsna_synth --studies=16 --size=64 --seed=0

Writes, like the Kaggle data (DESIGN.md section 1):
  train.csv, test.csv, train_bounding_boxes.csv, train_images/<UID>/<n>.dcm,
  test_images/<UID>/<n>.dcm, segmentations/<UID>.nii

Quirks reproduced, each drawn per study from the seed: file name = InstanceNumber; feet-first
studies (instance 1 is the most inferior slice); mirrored row direction; signed and unsigned
storage with different RescaleIntercept; BitsStored 12 and 16; padding outside the scan circle;
JPEG Lossless (1.2.840.10008.1.2.4.70, written with GDCM), explicit and implicit VR; fake patient
names, IDs and institution in the tags; NIfTI masks in a voxel order different from the DICOM
slices, with an affine that is correct (RAS). Fractures are fracture lines in exactly the
vertebrae that train.csv marks positive; every fractured slice gets a bounding-box row.

``--size=64`` makes ~60 slices of 64x64 per study (tens of KB); ``--size=512`` makes real-sized
studies (~300 slices of 512x512).
"""
from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
import secrets

from absl import flags
import gdcm
import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid

from cspine_jax import cli
from cspine_jax import constants
from cspine_jax.data import store
from data_tools import phantom as phantom_lib

CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2'
JPEG_LOSSLESS = '1.2.840.10008.1.2.4.70'
EXPLICIT_VR_LE = '1.2.840.10008.1.2.1'
IMPLICIT_VR_LE = '1.2.840.10008.1.2'

# Storage schemes seen in the real data: (PixelRepresentation, BitsStored, RescaleIntercept).
STORAGES = {
    'unsigned16': (0, 16, -1024),
    'unsigned12': (0, 12, -1024),
    'signed16': (1, 16, 0),
    'signed12': (1, 12, 0),
    'signed16_offset': (1, 16, -1024),
}

# Voxel layouts of the NIfTI masks: (permutation of the DICOM grid axes (z, y, x) into the NIfTI
# array axes, flips applied after the permutation). The affine is always made to match.
NIFTI_LAYOUTS = (
    ((2, 1, 0), (False, False, True)),   # x, y, z ascending inferior->superior (dcm2niix-like)
    ((1, 2, 0), (True, False, False)),   # RSNA-like: rows and columns swapped, flipped
    ((2, 0, 1), (True, True, False)),    # "sagittal": x first, then z, then y, flipped
    ((0, 1, 2), (False, True, True)),    # the DICOM grid order itself, y and x flipped
)


@dataclasses.dataclass
class Study:
  """One synthetic study, with everything a test needs as ground truth."""
  uid: str
  index: int
  hu: np.ndarray  # (z, y, x) int16, z = 0 most superior: the contract's grid
  labels_volume: np.ndarray  # (z, y, x) uint8 1-7 C1-C7, 8+ thoracic
  fracture_labels: np.ndarray  # (8,) int: patient_overall, C1..C7
  spacing: tuple  # (dz, dy, dx) mm
  origin: np.ndarray  # LPS of voxel (0, 0, 0)
  row_dir: np.ndarray  # LPS direction of increasing column index (x)
  col_dir: np.ndarray  # LPS direction of increasing row index (y)
  feet_first: bool
  storage: str
  transfer_syntax: str
  boxes: list  # (slice index z, x, y, width, height)
  phi: dict  # the fake patient tags (tests check none leaks)
  pad_outside_fov: int | None

  @property
  def slice_dir(self) -> np.ndarray:
    """LPS direction of increasing z index (towards the feet)."""
    return np.array([0.0, 0.0, -1.0])

  def instance_number(self, z: int) -> int:
    n = self.hu.shape[0]
    return (n - z) if self.feet_first else (z + 1)


@dataclasses.dataclass(frozen=True)
class Acquisition:
  """The uniform ranges of a study's scan: field of view and slices (mm, or factors)."""
  fov: tuple = (150, 185)  # in-plane field of view
  dz_factor: tuple = (0.9, 1.4)  # slice spacing / pixel spacing (at least 0.5 mm)
  max_dz: float | None = None  # mm; thicker slices could miss all of C1 (a 6-10 mm ring)
  above_occiput: tuple = (12, 25)  # the scan's top above the occiput's underside
  # The scan's bottom: below the body of one of these levels (index into C1..T4, drawn), by
  # this much (negative: the level is cut).
  bottom_levels: tuple = (8, 8)
  below_bottom: tuple = (0, 12)


# --variant: the anatomy (phantom.ANATOMIES) and acquisition a study is drawn from. 'standard'
# is every dataset's so far; 'shifted' is kept out of every tuning loop, to measure how what was
# tuned on 'standard' holds elsewhere: other proportions, fields of view of 130-230 mm, slices
# 0.7-2x the pixel spacing, scans from just below the occiput (sometimes cutting it) to C7
# (sometimes cutting it) or T4.
VARIANTS = {
    'standard': (phantom_lib.ANATOMIES['standard'], Acquisition()),
    'shifted': (phantom_lib.ANATOMIES['shifted'],
                Acquisition(fov=(130, 230), dz_factor=(0.7, 2.0), max_dz=6.0,
                            above_occiput=(-2, 40),
                            bottom_levels=(6, 10), below_bottom=(-3, 12))),
}


def study_uid(seed: int, index: int, split: str, variant: str = 'standard') -> str:
  entropy = ['cspine-synthetic', str(seed), split, str(index)]
  if variant != 'standard':  # never the UID of a standard study (a standard one's is unchanged)
    entropy.append(variant)
  return generate_uid(prefix='1.2.826.0.1.3680043.8.498.', entropy_srcs=entropy)


def sample_fractures(rng: np.random.Generator) -> np.ndarray:
  """8 labels with roughly the real data's rates; patient_overall = OR of C1..C7."""
  labels = np.zeros(8, np.int64)
  if rng.random() < 0.5:
    rates = np.array(constants.POSITIVE_RATES[1:])
    n = 1 + (rng.random() < 0.35)
    picks = rng.choice(7, size=n, replace=False, p=rates / rates.sum())
    labels[1 + picks] = 1
  labels[0] = labels[1:].max()
  return labels


def make_study(seed: int, index: int, size: int, split: str = 'train',
               labels: np.ndarray | None = None, variant: str = 'standard',
               **overrides) -> Study:
  """Draws one study (deterministic in seed, index, split, size, variant).

  ``overrides`` force quirks for tests: storage (a STORAGES key), transfer_syntax, feet_first,
  mirrored (bool).
  """
  anatomy, acq = VARIANTS[variant]
  key = [seed, index, 0 if split == 'train' else 1, size]
  rng = np.random.default_rng(key + ([list(VARIANTS).index(variant)] if variant != 'standard'
                                     else []))
  if labels is None:
    labels = sample_fractures(rng)
  fractured = {constants.VERTEBRAE[i] for i in range(7) if labels[1 + i]}
  fov = rng.uniform(*acq.fov)
  dxy = round(fov / size, 4)
  dz = round(max(0.5, dxy * rng.uniform(*acq.dz_factor)), 3)
  if acq.max_dz:
    dz = min(dz, acq.max_dz)
  z_c1 = rng.uniform(-60, 60)
  ph = phantom_lib.make_phantom(rng, z_c1, fractured, anatomy)
  z_top = ph.z_occiput + rng.uniform(*acq.above_occiput)
  lo, hi = acq.bottom_levels
  bottom = lo if lo == hi else int(rng.integers(lo, hi + 1))  # standard: below T2, no draw
  z_bottom = ph.vertebrae[bottom].z_bot - rng.uniform(*acq.below_bottom)
  n_slices = int(np.ceil((z_top - z_bottom) / dz))
  mirrored = overrides.get('mirrored', rng.random() < 0.15)
  row_dir = np.array([-1.0 if mirrored else 1.0, 0.0, 0.0])
  col_dir = np.array([0.0, 1.0, 0.0])
  x0 = -row_dir[0] * 0.5 * fov + rng.uniform(-10, 10)
  y0 = -0.5 * fov + rng.uniform(-10, 10)
  origin = np.array([x0, y0, z_top])
  cols = np.arange(size) * dxy
  X = (x0 + row_dir[0] * cols)[None, :].repeat(size, 0)
  Y = (y0 + cols)[:, None].repeat(size, 1)
  storage = overrides.get('storage', list(STORAGES)[rng.integers(len(STORAGES))])
  pixel_rep, bits, intercept = STORAGES[storage]
  lo = intercept + (-(1 << (bits - 1)) if pixel_rep else 0)
  hi = intercept + ((1 << (bits - 1)) - 1 if pixel_rep else (1 << bits) - 1)
  pad = None
  if storage in ('signed16', 'signed16_offset') and rng.random() < 0.6:
    pad = int(rng.choice([-2000, -3024]))
  noise = rng.uniform(8, 20)
  hu = np.empty((n_slices, size, size), np.int16)
  lab = np.empty((n_slices, size, size), np.uint8)
  boxes = []
  fov_circle = ((X - (x0 + row_dir[0] * fov / 2)) ** 2 + (Y - (y0 + fov / 2)) ** 2
                > (0.5 * fov) ** 2)
  for k in range(n_slices):
    z = z_top - k * dz
    h, l, frac = phantom_lib.render_slice(ph, z, X, Y, min_half_mm=0.85 * dxy)
    h += rng.normal(0, noise, h.shape).astype(np.float32)
    if pad is not None:
      h[fov_circle] = pad
    hu[k] = np.clip(np.rint(h), lo, hi)
    lab[k] = l
    for mask in frac.values():
      rows, cols_ = np.nonzero(mask)
      boxes.append((k, int(cols_.min()), int(rows.min()), int(cols_.max() - cols_.min() + 1),
                    int(rows.max() - rows.min() + 1)))
  ts_draw = rng.random()
  transfer_syntax = overrides.get('transfer_syntax', (
      JPEG_LOSSLESS if ts_draw < 0.3 else IMPLICIT_VR_LE if ts_draw < 0.45 else EXPLICIT_VR_LE))
  feet_first = overrides.get('feet_first', rng.random() < 0.3)
  first = ['Jane', 'John', 'Maria', 'Wei', 'Amara', 'Lars']
  last = ['Doe', 'Roe', 'Fakeman', 'Synthsson', 'Placeholder']
  phi = {
      'PatientName': f'{last[rng.integers(5)]}^{first[rng.integers(6)]}^Q{rng.integers(1e6):06d}',
      'PatientID': f'PID{rng.integers(1e9):09d}',
      'PatientBirthDate': f'19{rng.integers(30, 99)}0{rng.integers(1, 9)}1{rng.integers(0, 9)}',
      'InstitutionName': f'Fictional General Hospital {rng.integers(1e5):05d}',
      'ReferringPhysicianName': f'Dr^Invented{rng.integers(1e5):05d}',
      'AccessionNumber': f'ACC{rng.integers(1e8):08d}',
  }
  return Study(
      uid=study_uid(seed, index, split, variant), index=index, hu=hu, labels_volume=lab,
      fracture_labels=labels, spacing=(dz, dxy, dxy), origin=origin, row_dir=row_dir,
      col_dir=col_dir, feet_first=bool(feet_first), storage=storage,
      transfer_syntax=transfer_syntax, boxes=boxes, phi=phi, pad_outside_fov=pad)


# ---------------------------------------------------------------------------------------------
# Writing DICOM and NIfTI.
# ---------------------------------------------------------------------------------------------


def slice_dataset(study: Study, z: int, series_uid: str, frame_uid: str):
  """The pydicom Dataset of slice z (uncompressed; see write_study for JPEG)."""
  pixel_rep, bits, intercept = STORAGES[study.storage]
  stored = study.hu[z].astype(np.int32) - intercept
  sop_uid = generate_uid(prefix='1.2.826.0.1.3680043.8.498.',
                         entropy_srcs=[study.uid, 'slice', str(z)])
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
  meta.MediaStorageSOPInstanceUID = sop_uid
  meta.TransferSyntaxUID = (IMPLICIT_VR_LE if study.transfer_syntax == IMPLICIT_VR_LE
                            else EXPLICIT_VR_LE)
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = CT_IMAGE_STORAGE
  ds.SOPInstanceUID = sop_uid
  for key, value in study.phi.items():
    setattr(ds, key, value)
  ds.PatientSex = 'O'
  ds.StudyDate = '20200101'
  # Set, not left empty: GDCM's writer (JPEG Lossless studies) fills an absent StudyTime with
  # the current time, which made the output differ run to run and slice to slice (dcm2niix then
  # splits the series into one volume per slice).
  ds.StudyTime = '120000'
  ds.StudyID = '1'
  ds.Modality = 'CT'
  ds.Manufacturer = 'cspine_jax synthetic'
  ds.ImageType = ['ORIGINAL', 'PRIMARY', 'AXIAL']
  ds.ConvolutionKernel = 'BONE'
  ds.KVP = '120'
  ds.BodyPartExamined = 'CSPINE'
  ds.StudyInstanceUID = study.uid
  ds.SeriesInstanceUID = series_uid
  ds.FrameOfReferenceUID = frame_uid
  ds.SeriesNumber = 2
  ds.InstanceNumber = study.instance_number(z)
  ds.PatientPosition = 'FFS' if study.feet_first else 'HFS'
  dz, dy, dx = study.spacing
  pos = study.origin + z * dz * study.slice_dir
  ds.ImagePositionPatient = [f'{v:.4f}' for v in pos]
  ds.ImageOrientationPatient = [f'{v:g}' for v in (*study.row_dir, *study.col_dir)]
  ds.PixelSpacing = [f'{dy:g}', f'{dx:g}']
  ds.SliceThickness = f'{dz:g}'
  ds.SliceLocation = f'{pos[2]:.4f}'
  ds.Rows, ds.Columns = study.hu.shape[1:]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.BitsAllocated = 16
  ds.BitsStored = bits
  ds.HighBit = bits - 1
  ds.PixelRepresentation = pixel_rep
  ds.RescaleIntercept = str(intercept)
  ds.RescaleSlope = '1'
  ds.RescaleType = 'HU'
  ds.WindowCenter = '500'
  ds.WindowWidth = '2000'
  ds.PixelData = stored.astype(np.int16 if pixel_rep else np.uint16).tobytes()
  return ds


def _to_jpeg_lossless(src: str, dst: str) -> None:
  reader = gdcm.ImageReader()
  reader.SetFileName(src)
  if not reader.Read():
    raise RuntimeError(f'GDCM could not read {src}')
  change = gdcm.ImageChangeTransferSyntax()
  change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
  change.SetInput(reader.GetImage())
  if not change.Change():
    raise RuntimeError(f'GDCM could not encode {src} as JPEG Lossless')
  writer = gdcm.ImageWriter()
  writer.SetFileName(dst)
  writer.SetFile(reader.GetFile())
  writer.SetImage(change.GetOutput())
  if not writer.Write():
    raise RuntimeError(f'GDCM could not write {dst}')


def write_series(study: Study, folder: str) -> None:
  """Writes the study's slices into ``folder`` as <InstanceNumber>.dcm."""
  series_uid = generate_uid(entropy_srcs=[study.uid, 'series'])
  frame_uid = generate_uid(entropy_srcs=[study.uid, 'frame'])
  os.makedirs(folder, exist_ok=True)
  for z in range(study.hu.shape[0]):
    ds = slice_dataset(study, z, series_uid, frame_uid)
    path = os.path.join(folder, f'{study.instance_number(z)}.dcm')
    if study.transfer_syntax == JPEG_LOSSLESS:
      raw = path + '.raw'
      ds.save_as(raw, enforce_file_format=True)
      _to_jpeg_lossless(raw, path)
      os.remove(raw)
    else:
      ds.save_as(path, enforce_file_format=True, implicit_vr=(
          study.transfer_syntax == IMPLICIT_VR_LE), little_endian=True)


def nifti_affine_and_data(study: Study, layout) -> tuple[np.ndarray, np.ndarray]:
  """The mask in a NIfTI voxel layout and the RAS affine that maps it to the patient."""
  perm, flips = layout
  data = np.transpose(study.labels_volume, perm)
  # Voxel -> LPS for the DICOM grid, columns (z, y, x).
  dz, dy, dx = study.spacing
  grid = np.stack([study.slice_dir * dz, study.col_dir * dy, study.row_dir * dx], axis=1)
  lps = np.eye(4)
  lps[:3, :3] = grid[:, perm]
  lps[:3, 3] = study.origin
  for axis, flip in enumerate(flips):
    if flip:
      data = np.flip(data, axis)
      n = data.shape[axis]
      # index i in the flipped array is n-1-i in the unflipped one.
      lps[:3, 3] = lps[:3, 3] + lps[:3, axis] * (n - 1)
      lps[:3, axis] = -lps[:3, axis]
  ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  return ras, np.ascontiguousarray(data)


def write_nifti(study: Study, path: str, layout) -> None:
  affine, data = nifti_affine_and_data(study, layout)
  img = nib.Nifti1Image(data.astype(np.uint8), affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, path)


def write_study(study: Study, output: str, split: str = 'train', seg_layout=None) -> dict:
  """Writes one study's DICOM folder (and NIfTI mask if ``seg_layout``); returns its CSV rows."""
  images = os.path.join(output, f'{split}_images')
  os.makedirs(images, exist_ok=True)
  final = os.path.join(images, study.uid)
  if not os.path.isdir(final):
    # Not tempfile.mkdtemp: its folders are 0700, unreadable by the other users of shared data.
    tmp = os.path.join(images, f'.tmp-{secrets.token_hex(8)}')
    os.mkdir(tmp, 0o777)  # the umask's permissions
    write_series(study, tmp)
    os.replace(tmp, final)
  if seg_layout is not None:
    os.makedirs(os.path.join(output, store.INPUT_SEGMENTATIONS), exist_ok=True)
    seg = os.path.join(output, store.INPUT_SEGMENTATIONS, f'{study.uid}.nii')
    if not os.path.exists(seg):
      tmp = seg + '.tmp.nii'
      write_nifti(study, tmp, seg_layout)
      os.replace(tmp, seg)
  return {
      'uid': study.uid, 'split': split, 'labels': study.fracture_labels.tolist(),
      'boxes': [(x, y, w, h, study.instance_number(z)) for z, x, y, w, h in study.boxes],
  }


def _write_one(args) -> dict:
  """Generates and writes one study (a worker's unit)."""
  seed, index, size, split, with_seg, output, variant = args
  study = make_study(seed, index, size, split, variant=variant)
  layout = NIFTI_LAYOUTS[index % len(NIFTI_LAYOUTS)] if with_seg else None
  return write_study(study, output, split, layout)


def generate(output: str, studies: int, size: int = 64, seed: int = 0, test_studies: int = 1,
             seg_fraction: float = 0.6, workers: int = 1,
             variant: str = 'standard') -> list[dict]:
  """Writes the whole dataset; returns one record per study (uid, split, labels, boxes)."""
  for sub in ('train_images', 'test_images', store.INPUT_SEGMENTATIONS):
    os.makedirs(os.path.join(output, sub), exist_ok=True)
  n_seg = int(round(seg_fraction * studies)) if studies > 1 else studies
  jobs = [(seed, i, size, 'train', i < n_seg, output, variant) for i in range(studies)]
  jobs += [(seed, i, size, 'test', False, output, variant) for i in range(test_studies)]
  if workers > 1:
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      records = pool.map(_write_one, jobs, chunksize=1)
  else:
    records = [_write_one(j) for j in jobs]
  write_csvs(output, records)
  return records


def write_csvs(output: str, records: list[dict]) -> None:
  """train.csv, train_bounding_boxes.csv and test.csv for the written studies."""
  train = [r for r in records if r['split'] == 'train']
  _write_csv(os.path.join(output, 'train.csv'), ['StudyInstanceUID', *constants.TARGETS],
             [[r['uid'], *r['labels']] for r in train])
  _write_csv(os.path.join(output, 'train_bounding_boxes.csv'),
             ['StudyInstanceUID', 'x', 'y', 'width', 'height', 'slice_number'],
             [[r['uid'], *b] for r in train for b in r['boxes']])
  _write_csv(os.path.join(output, 'test.csv'), ['row_id', 'StudyInstanceUID', 'prediction_type'],
             [[f'{r["uid"]}_{t}', r['uid'], t] for r in records if r['split'] == 'test'
              for t in constants.VERTEBRAE + ('patient_overall',)])


def _write_csv(path, header, rows):
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  os.replace(tmp, path)


FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program: modules stay importable)."""
  flags.DEFINE_string('output', None, 'Folder to write the RSNA-shaped dataset into.')
  flags.DEFINE_integer('studies', 16, 'Number of training studies.')
  flags.DEFINE_integer('size', 64, 'Rows and columns of each slice (64: quick tests; 512: real).')
  flags.DEFINE_integer('seed', 0, 'Seed: the same seed gives the same dataset.')
  flags.DEFINE_integer('test_studies', 1, 'Number of unlabelled studies under test_images/.')
  flags.DEFINE_float('seg_fraction', 0.6, 'Fraction of training studies with a NIfTI mask.')
  flags.DEFINE_integer('workers', 0, 'Parallel processes (0: all cores).')
  flags.DEFINE_enum('variant', 'standard', list(VARIANTS), 'Anatomy and acquisition ranges: '
                    'standard (every dataset so far), or shifted (other proportions, fields of '
                    'view and slice spacings, kept out of tuning: a generalization check).')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]} (flags are --name=value)')
  if not FLAGS.output:
    raise cli.UsageError('--output is required')
  if FLAGS.studies < 1 or FLAGS.size < 32:
    raise cli.UsageError(f'--studies={FLAGS.studies} --size={FLAGS.size}: need --studies >= 1 '
                         'and --size >= 32')
  if FLAGS.test_studies < 0 or FLAGS.workers < 0 or not 0 <= FLAGS.seg_fraction <= 1:
    raise cli.UsageError('need --test_studies >= 0, --workers >= 0 and 0 <= --seg_fraction <= 1')
  if os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
    raise cli.UsageError(f'--output {FLAGS.output} is a file, not a folder')
  workers = FLAGS.workers or os.cpu_count() or 1
  records = generate(FLAGS.output, FLAGS.studies, FLAGS.size, FLAGS.seed, FLAGS.test_studies,
                     FLAGS.seg_fraction, workers, FLAGS.variant)
  n_pos = sum(r['labels'][0] for r in records if r['split'] == 'train')
  print(f'wrote {len(records)} studies ({FLAGS.studies} train, {n_pos} with fractures; '
        f'{FLAGS.test_studies} test) to {FLAGS.output}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
