"""The converter against independent references: SimpleITK's series reader, pydicom by hand, and the
synthetic ground truth (every voxel, every quirk, every NIfTI layout)."""
import fcntl
import json
import os
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

from cspine_jax import constants
from cspine_jax.data import levels
from cspine_jax.data import store
from data_tools import convert
from data_tools import dicom
from data_tools import nifti
from data_tools import synthetic

sitk = pytest.importorskip('SimpleITK', reason='SimpleITK is the independent reference reader')

SEED = 7
SIZE = 48
# One study per quirk combination: storage x transfer syntax x feet-first x mirrored rows, each
# with a NIfTI mask in a different voxel layout.
QUIRKS = [
    dict(storage='unsigned16', transfer_syntax=synthetic.EXPLICIT_VR_LE, feet_first=False,
         mirrored=False),
    dict(storage='unsigned12', transfer_syntax=synthetic.JPEG_LOSSLESS, feet_first=True,
         mirrored=False),
    dict(storage='signed16', transfer_syntax=synthetic.IMPLICIT_VR_LE, feet_first=True,
         mirrored=True),
    dict(storage='signed12', transfer_syntax=synthetic.JPEG_LOSSLESS, feet_first=False,
         mirrored=True),
    dict(storage='signed16_offset', transfer_syntax=synthetic.EXPLICIT_VR_LE, feet_first=True,
         mirrored=False),
]
LABELS = [[1, 0, 1, 0, 0, 0, 0, 1], [0] * 8, [1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0],
          [0] * 8]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('rsna'))
  studies, records = [], []
  for i, (quirks, labels) in enumerate(zip(QUIRKS, LABELS)):
    study = synthetic.make_study(SEED, i, SIZE, labels=np.array(labels), **quirks)
    layout = synthetic.NIFTI_LAYOUTS[i % len(synthetic.NIFTI_LAYOUTS)]
    records.append(synthetic.write_study(study, root, 'train', layout))
    studies.append(study)
  synthetic.write_csvs(root, records)
  return root, studies


@pytest.fixture(scope='module')
def converted(dataset, tmp_path_factory):
  root, _ = dataset
  out = str(tmp_path_factory.mktemp('converted'))
  records = convert.run(root, out, workers=2, progress=False)
  return out, {r['uid']: r for r in records}


def _sitk_read(folder):
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
  img = reader.Execute()
  return img


def test_every_study_converts(converted, dataset):
  _, records = converted
  assert len(records) == len(QUIRKS)
  assert all(r['status'] == 'ok' for r in records.values()), records
  assert all(r['warnings'] == [] for r in records.values())


def test_hu_identical_to_simpleitk_and_truth(dataset, converted):
  root, studies = dataset
  out, records = converted
  for study in studies:
    ours = store.read_array(os.path.join(out, 'volumes', study.uid))
    assert ours.dtype == np.int16
    np.testing.assert_array_equal(ours, study.hu)
    img = _sitk_read(os.path.join(root, 'train_images', study.uid))
    ref = sitk.GetArrayFromImage(img)  # (z, y, x), z ascending along the slice normal
    # SimpleITK stacks along the normal (row x col); ours runs superior -> inferior.
    normal = np.cross(study.row_dir, study.col_dir)
    if normal[2] > 0:
      ref = ref[::-1]
    np.testing.assert_array_equal(ours.astype(np.int64), ref.astype(np.int64))
    rec = records[study.uid]
    sx, sy, sz = img.GetSpacing()
    np.testing.assert_allclose(rec['spacing_mm'], [sz, sy, sx], rtol=1e-4)
    np.testing.assert_allclose(rec['spacing_mm'], study.spacing, rtol=1e-4)


def test_geometry_matches_truth(dataset, converted):
  _, studies = dataset
  out, records = converted
  for study in studies:
    rec = records[study.uid]
    np.testing.assert_allclose(rec['origin'], study.origin, atol=1e-3)
    np.testing.assert_allclose(rec['direction'],
                               [study.slice_dir, study.col_dir, study.row_dir], atol=1e-6)
    assert rec['shape'] == list(study.hu.shape)
    assert store.read_attributes(os.path.join(out, 'volumes', study.uid))[
        'spacing_mm'] == rec['spacing_mm']
    # z = 0 is the most superior slice: largest LPS z.
    assert rec['direction'][0][2] < 0


def test_order_by_position_not_instance_number(dataset, converted):
  """pydicom by hand: slice z of the volume is the file whose position is z-th from the top."""
  root, studies = dataset
  out, _ = converted
  study = next(s for s in studies if s.feet_first)
  folder = os.path.join(root, 'train_images', study.uid)
  by_height = sorted(os.listdir(folder), key=lambda n: -float(
      pydicom.dcmread(os.path.join(folder, n), stop_before_pixels=True).ImagePositionPatient[2]))
  ours = store.read_array(os.path.join(out, 'volumes', study.uid))
  for z in (0, len(by_height) // 2, len(by_height) - 1):
    ds = pydicom.dcmread(os.path.join(folder, by_height[z]))
    hu = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(ours[z], hu)
  # feet-first: file 1.dcm is the most inferior slice.
  assert by_height[-1] == '1.dcm'


def test_segmentations_aligned_in_every_layout(dataset, converted):
  _, studies = dataset
  out, records = converted
  layouts = set()
  for i, study in enumerate(studies):
    rec = records[study.uid]
    assert rec['has_segmentation']
    ours = store.read_array(os.path.join(out, 'segmentations', study.uid))
    truth = nifti.cervical_labels(study.labels_volume)
    assert ours.dtype == np.uint8
    agreement = float((ours == truth).mean())
    assert agreement >= 0.999, (i, agreement)
    np.testing.assert_array_equal(ours, truth)
    assert set(np.unique(ours)) <= set(range(8))
    assert rec['vertebra_boxes']['C4'][0] < rec['vertebra_boxes']['C5'][0]
    layouts.add(i % len(synthetic.NIFTI_LAYOUTS))
  assert len(layouts) >= 3


def test_general_resampler_equals_axis_aligned_path():
  rng = np.random.default_rng(0)
  data = rng.integers(0, 20, (9, 7, 5))
  affine = np.array([[0, 0, -2.0, 10], [0, 1.5, 0, -3], [1.0, 0, 0, 4], [0, 0, 0, 1]])
  # Target (z, y, x) -> NIfTI index: i = 8 - x, j = y, k = z - 1 (z = 0 falls outside).
  perm = np.array([[0, 0, -1.0, 8], [0, 1, 0, 0], [1, 0, 0, -1], [0, 0, 0, 1]])
  vox = np.linalg.inv(nifti.LPS_TO_RAS) @ affine @ perm
  fast, cov_fast = nifti.to_grid(data, affine, vox, (6, 7, 9))
  expected = np.zeros((6, 7, 9), data.dtype)
  expected[1:] = np.transpose(data[::-1], (2, 1, 0))[:5]
  np.testing.assert_array_equal(fast, expected)
  assert cov_fast == pytest.approx(5 / 6)
  # A 1e-5 rad rotation leaves every nearest voxel the same but forces the slice-by-slice path.
  eps = 1e-5
  rot = np.eye(4)
  rot[:2, :2] = [[np.cos(eps), -np.sin(eps)], [np.sin(eps), np.cos(eps)]]
  slow, cov_slow = nifti.to_grid(data, affine, rot @ vox, (6, 7, 9))
  np.testing.assert_array_equal(slow, expected)
  assert cov_slow == pytest.approx(5 / 6)


def test_labels_and_fracture_boxes(dataset, converted):
  _, studies = dataset
  _, records = converted
  for study, labels in zip(studies, LABELS):
    rec = records[study.uid]
    assert rec['labels'] == labels
    zs = sorted({b['z'] for b in rec['fracture_boxes']})
    assert zs == sorted({b[0] for b in study.boxes})
    assert bool(zs) == bool(labels[0])
    for b in rec['fracture_boxes']:
      # Each box holds fracture voxels (soft-tissue density inside bone labels).
      region = study.labels_volume[b['z'], b['y0']:b['y1'], b['x0']:b['x1']]
      assert set(np.unique(region)) & {i + 1 for i in range(7) if labels[1 + i]}


def test_no_patient_data_in_output(dataset, converted):
  _, studies = dataset
  out, _ = converted
  needles = set()
  for study in studies:
    for value in study.phi.values():
      needles.add(value.encode())
      needles.update(part.encode() for part in value.split('^') if len(part) > 4)
  for dirpath, _, files in os.walk(out):
    for name in files:
      with open(os.path.join(dirpath, name), 'rb') as f:
        blob = f.read()
      for needle in needles:
        assert needle not in blob, (name, needle)


def test_rerun_is_idempotent_and_skips(dataset, converted, tmp_path):
  root, _ = dataset
  out, records = converted
  with open(os.path.join(out, store.MANIFEST)) as f:
    before = f.read()
  again = convert.run(root, out, workers=1, progress=False)
  with open(os.path.join(out, store.MANIFEST)) as f:
    assert f.read() == before
  assert {r['uid'] for r in again} == set(records)


def test_kill_minus_nine_then_resume_equals_clean_run(dataset, converted, tmp_path):
  root, studies = dataset
  clean_out, _ = converted
  out = str(tmp_path / 'killed')
  cmd = [sys.executable, '-m', 'data_tools.convert', f'--input={root}', f'--output={out}',
         '--workers=1', '--noprogress']
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill as soon as the first study is in place: the second is then half-way.
  deadline = time.time() + 120
  while time.time() < deadline:
    vols = os.path.join(out, 'volumes')
    if os.path.isdir(vols) and any(not n.startswith('.') for n in os.listdir(vols)):
      break
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  # The worker dies with the command: an orphan would go on writing studies under the rerun.
  placed = sorted(os.listdir(os.path.join(out, 'volumes')))
  time.sleep(2)
  assert sorted(os.listdir(os.path.join(out, 'volumes'))) == placed
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(out, store.MANIFEST)) as f, \
       open(os.path.join(clean_out, store.MANIFEST)) as g:
    assert f.read() == g.read()
  for sub in ('volumes', 'segmentations', *store.LEVELS):
    assert sorted(os.listdir(os.path.join(out, sub))) == sorted(
        os.listdir(os.path.join(clean_out, sub)))
    for study in studies:
      np.testing.assert_array_equal(
          store.read_array(os.path.join(out, sub, study.uid)),
          store.read_array(os.path.join(clean_out, sub, study.uid)))


def test_levels_are_written_beside_every_volume(converted):
  out, records = converted
  assert any(r['has_segmentation'] for r in records.values())
  for uid, record in records.items():
    labels = list(store.LABEL_LEVELS) if record['has_segmentation'] else []
    assert record['levels'] == list(store.VOLUME_LEVELS) + labels
    volume = store.read_array(store.array_path(out, store.VOLUMES, uid))
    expected = levels.build(volume, record['spacing_mm'])
    if labels:
      mask = store.read_array(store.array_path(out, store.SEGMENTATIONS, uid))
      expected['segmentations_2mm'] = levels.downsample_labels(mask, record['spacing_mm'], 2.0)
    for kind in record['levels']:
      path = store.array_path(out, kind, uid)
      np.testing.assert_array_equal(store.read_array(path), expected[kind])
      attrs = store.read_attributes(path)
      assert attrs['spacing_mm'] == [store.LEVELS[kind]] * 3
      assert attrs['origin'] == record['origin'] and attrs['direction'] == record['direction']


def test_a_second_command_on_the_same_output_is_refused(dataset, tmp_path):
  root, _ = dataset
  out = str(tmp_path / 'busy')
  os.makedirs(os.path.dirname(os.path.join(out, convert.RUN_LOCK)))
  with open(os.path.join(out, convert.RUN_LOCK), 'a') as held:
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running command holds it
    with pytest.raises(RuntimeError, match='another data_tools.convert.*convert.lock'):
      convert.run(root, out, workers=1, progress=False)
  assert not os.path.exists(os.path.join(out, 'volumes'))  # nothing touched


def test_uid_validation():
  assert convert.is_valid_uid('1.2.826.0.1.3680043.10197')
  for bad in ('', '1', '1..2', '01.2', '1.2.', '../1.2', '1.2/3', 'a.b', '1.2.3 ', '1.' * 40 + '1'):
    assert not convert.is_valid_uid(bad), bad


def test_arrays_are_the_bytes_tensorstore_writes(converted, tmp_path):
  """The converter writes its arrays without TensorStore (store.write_shards): every file is the
  one TensorStore writes for the same values and attributes, so datasets converted before read
  the same and a reconversion is byte-identical to them."""
  out, records = converted
  for uid, record in records.items():
    for kind in (store.VOLUMES, store.SEGMENTATIONS) if record['has_segmentation'] else (
        store.VOLUMES,):
      path = store.array_path(out, kind, uid)
      again = str(tmp_path / kind / uid)
      store.write_array(again, store.read_array(path), store.read_attributes(path))
      for folder, _, names in os.walk(again):
        for name in names:
          rel = os.path.relpath(os.path.join(folder, name), again)
          with open(os.path.join(folder, name), 'rb') as f, open(os.path.join(path, rel),
                                                                 'rb') as g:
            assert f.read() == g.read(), (kind, uid, rel)
      assert sum(len(n) for _, _, n in os.walk(again)) == sum(len(n) for _, _, n in os.walk(path))


def test_conversion_imports_no_tensorstore_or_scipy(dataset, tmp_path):
  """What a worker runs (a study with a mask included) and the command around it stay light:
  importing TensorStore alone costs ~0.5 s, scipy.ndimage ~0.15 s, per process and per run (nibabel
  imports the scipy package itself, a few ms)."""
  root, _ = dataset
  code = ('import json, sys\n'
          'from data_tools import convert\n'
          f'records = convert.run({root!r}, {str(tmp_path / "out")!r}, 1, progress=False)\n'
          f'job = [j for j in convert.discover({root!r}) if j["segmentation"]][0]\n'
          f'record = convert.convert_study(job, {str(tmp_path / "again")!r}, None, [])\n'
          'print(json.dumps([record["status"], record["has_segmentation"], sorted(\n'
          '    m for m in ("tensorstore", "scipy.ndimage", "jax") if m in sys.modules)]))\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert json.loads(proc.stdout.splitlines()[-1]) == ['ok', True, []]


def test_volume_is_decoded_and_written_a_slab_at_a_time(dataset, tmp_path, monkeypatch):
  """A worker holds one slab of the volume (a row of shards along z) in one reused buffer, never
  all of it: the slices are decoded a slab at a time, each slab written before the next."""
  root, studies = dataset
  monkeypatch.setattr(store, 'SHARD', (32, 256, 256))  # slabs of 32 slices: several here
  calls = []
  decode = dicom.Scan.decode

  def recorded(scan, start, out):
    calls.append((start, len(out)))
    return decode(scan, start, out)

  monkeypatch.setattr(dicom.Scan, 'decode', recorded)
  job = convert.discover(root)[0]
  record = convert.convert_study(job, str(tmp_path), None, [])
  assert record['status'] == 'ok'
  depth = record['shape'][0]
  assert depth > 32  # two slabs at least
  assert calls == [(z, min(32, depth - z)) for z in range(0, depth, 32)]
  volume = store.read_array(store.array_path(str(tmp_path), store.VOLUMES, job['uid']))
  truth = next(s for s in studies if s.uid == job['uid'])
  np.testing.assert_array_equal(volume, truth.hu)
  assert record['hu_range'] == [int(truth.hu.min()), int(truth.hu.max())]


def test_manifest_record_fields(converted):
  out, _ = converted
  with open(os.path.join(out, store.MANIFEST)) as f:
    rec = json.loads(f.readline())
  for key in ('uid', 'split', 'status', 'warnings', 'shape', 'spacing_mm', 'origin', 'direction',
              'source_slices', 'transfer_syntaxes', 'has_segmentation', 'labels',
              'vertebra_boxes', 'fracture_boxes'):
    assert key in rec
  assert len(rec['labels']) == len(constants.TARGETS)


def _header_slice(path: str) -> dicom._Slice:
  """A slice as the reader holds it: its header, and where its pixel data element starts."""
  with open(path, 'rb') as f:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return dicom._Slice(os.path.basename(path), path, ds, None, None, f.tell())


@pytest.mark.parametrize('syntax', [synthetic.JPEG_LOSSLESS, synthetic.EXPLICIT_VR_LE,
                                    synthetic.IMPLICIT_VR_LE])
@pytest.mark.parametrize('storage', sorted(synthetic.STORAGES))
def test_fast_decoders_equal_pydicom(tmp_path, storage, syntax):
  """The paths without pydicom (raw bytes read at the pixel data offset; libjpeg-turbo) are
  taken for every storage and give exactly pydicom's stored values, dtype and sign included."""
  study = synthetic.make_study(5, 0, 32, storage=storage, transfer_syntax=syntax)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  for name in sorted(os.listdir(folder))[:3]:
    s = _header_slice(str(folder / name))
    fast = dicom._fast_stored(s, np.empty((32, 32), np.uint16))
    assert fast is not None  # the fast path, not the fallback
    ref = pydicom.dcmread(str(folder / name)).pixel_array
    assert fast[0].dtype == ref.dtype
    np.testing.assert_array_equal(fast[0], ref)
    assert fast[1][0] <= ref.min() and ref.max() <= fast[1][1]  # the range it claims


@pytest.mark.parametrize('signed', [0, 1])
def test_fast_native_path_ignores_bits_above_bits_stored(tmp_path, signed):
  """Bits above BitsStored (an overlay, junk) are not part of the value: masked (unsigned) or
  sign-extended from BitsStored (signed), as pydicom does."""
  study = synthetic.make_study(5, 0, 32, storage='signed12' if signed else 'unsigned12',
                               transfer_syntax=synthetic.EXPLICIT_VR_LE)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  path = str(folder / sorted(os.listdir(folder))[0])
  ds = pydicom.dcmread(path)
  raw = np.frombuffer(ds.PixelData, np.uint16).copy()
  raw[::3] |= np.uint16(0xA000)  # junk in bits 13 and 15
  ds.PixelData = raw.tobytes()
  ds.save_as(path)
  fast = dicom._fast_stored(_header_slice(path), np.empty((32, 32), np.uint16))
  ref = pydicom.dcmread(path).pixel_array
  assert fast is not None and fast[0].dtype == ref.dtype
  np.testing.assert_array_equal(fast[0], ref)
  assert -2048 <= int(fast[0].min()) and int(fast[0].max()) <= 4095


@pytest.mark.parametrize('keep', [0.5, 0.98])
def test_truncated_jpeg_lossless_slice_fails_naming_it(tmp_path, keep):
  """libjpeg-turbo and liblj92 decode a cut JPEG stream without complaint: the fast path must
  refuse a file whose items end early, so that the study fails naming the file, as before."""
  study = synthetic.make_study(5, 0, 32, transfer_syntax=synthetic.JPEG_LOSSLESS)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  name = sorted(os.listdir(folder))[2]
  start = _header_slice(str(folder / name)).pixel_offset
  with open(folder / name, 'r+b') as f:  # cut inside the pixel data: the header stays whole
    f.truncate(start + int((os.path.getsize(folder / name) - start) * keep))
  assert dicom._fast_stored(_header_slice(str(folder / name)),
                            np.empty((32, 32), np.uint16)) is None
  with pytest.raises(dicom.StudyError, match=f'{name}: pixel data cannot be decoded'):
    dicom.read_series(str(folder))


def test_a_study_failing_at_decode_keeps_its_earlier_warnings(tmp_path):
  """Failing after its headers were read (a cut slice found while decoding), a study's record
  still says what was noticed before: here the labels' inconsistency."""
  study = synthetic.make_study(5, 0, 32, transfer_syntax=synthetic.JPEG_LOSSLESS)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  name = sorted(os.listdir(folder))[2]
  start = _header_slice(str(folder / name)).pixel_offset
  with open(folder / name, 'r+b') as f:
    f.truncate(start + (os.path.getsize(folder / name) - start) // 2)
  job = {'uid': study.uid, 'split': 'train', 'folder': str(folder), 'segmentation': None}
  labels = [0, 1, 0, 0, 0, 0, 0, 0]  # patient_overall 0 with C1 fractured
  record = convert.convert_study(job, str(tmp_path / 'out'), labels, [])
  assert record['status'].startswith(f'error: {name}: pixel data cannot be decoded')
  assert record['warnings'] == ['patient_overall is not the OR of C1-C7 in train.csv']


@pytest.mark.parametrize('raw', [b'-89.2989\\-78.89\\42.5011 ', b'1e2\\ -3.5\\+4\x00',
                                 b'0\\0\\0'])
def test_decimal_strings_read_raw_equal_pydicom(tmp_path, raw):
  """Geometry tags are parsed from their raw bytes (pydicom's DS objects were most of the
  geometry checks' time): the same numbers as pydicom's, in explicit and implicit VR files."""
  study = synthetic.make_study(5, 0, 32, transfer_syntax=synthetic.IMPLICIT_VR_LE)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  path = str(folder / sorted(os.listdir(folder))[0])
  for syntax in (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian):
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = raw.decode('ascii').strip('\x00 ').split('\\')
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path)
    header = _header_slice(path).ds
    assert isinstance(header.get_item('ImagePositionPatient'), pydicom.dataelem.RawDataElement)
    np.testing.assert_array_equal(
        dicom._ds_floats(header, 'ImagePositionPatient', 3, 'x.dcm'),
        [float(v) for v in pydicom.dcmread(path).ImagePositionPatient])


def test_a_slice_without_position_fails_naming_it(tmp_path):
  study = synthetic.make_study(5, 0, 32, transfer_syntax=synthetic.EXPLICIT_VR_LE)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  name = sorted(os.listdir(folder))[3]
  ds = pydicom.dcmread(str(folder / name))
  del ds.ImagePositionPatient
  ds.save_as(str(folder / name))
  with pytest.raises(dicom.StudyError, match=f'{name}: ImagePositionPatient must have 3 finite'):
    dicom.scan_series(str(folder))


def test_files_without_preamble_or_file_meta(tmp_path):
  """Old exports: no 128-byte preamble, no file meta; the encoding is inferred."""
  study = synthetic.make_study(9, 0, 32, transfer_syntax=synthetic.IMPLICIT_VR_LE)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  for name in os.listdir(folder):
    ds = pydicom.dcmread(str(folder / name))
    ds.preamble = None
    del ds.file_meta
    ds.save_as(str(folder / name), implicit_vr=True, little_endian=True,
               enforce_file_format=False)
  assert open(folder / name, 'rb').read(4) != b'\0\0\0\0'  # really no preamble
  series = dicom.read_series(str(folder))
  np.testing.assert_array_equal(series.hu, study.hu)


def test_synthetic_jpeg_lossless_study_is_byte_reproducible(tmp_path):
  """The same seed writes the same bytes, GDCM-encoded slices included (GDCM's writer used to
  stamp an absent StudyTime with the clock)."""
  study = synthetic.make_study(3, 0, 32, transfer_syntax=synthetic.JPEG_LOSSLESS)
  files = []
  for run in ('a', 'b'):
    synthetic.write_study(study, str(tmp_path / run), 'train', None)
    folder = tmp_path / run / 'train_images' / study.uid
    files.append({n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))})
    time.sleep(0.01)  # the clock moves between the runs
  assert files[0].keys() == files[1].keys()
  assert all(files[0][n] == files[1][n] for n in files[0])


def test_shifted_variant_draws_other_anatomy_and_scans_and_converts(tmp_path):
  """--variant=shifted (the generalization check of issue 18) draws outside the standard ranges,
  deterministically, under UIDs no standard study has; its studies and masks convert."""
  std = [synthetic.make_study(0, i, 64) for i in range(8)]  # the demo's size
  shifted = [synthetic.make_study(0, i, 64, variant='shifted') for i in range(8)]
  assert not {s.uid for s in std} & {s.uid for s in shifted}
  again = synthetic.make_study(0, 3, 64, variant='shifted')
  assert again.uid == shifted[3].uid and np.array_equal(again.hu, shifted[3].hu)
  fov = lambda s: s.spacing[1] * 64
  ratio = lambda s: s.spacing[0] / s.spacing[1]
  assert all(150 <= fov(s) <= 185 for s in std) and all(0.9 <= ratio(s) < 1.41 for s in std)
  # Outside both standard ranges, on this seed: wider fields of view and thicker slices.
  assert max(fov(s) for s in shifted) > 190 and max(ratio(s) for s in shifted) > 1.5
  # Scans end anywhere from C7 to T4 (standard: always below T2, label 9), some above T2.
  assert {int(s.labels_volume.max()) for s in std} <= {9, 10}
  assert min(int(s.labels_volume.max()) for s in shifted) < 9
  raw, out = str(tmp_path / 'raw'), str(tmp_path / 'out')
  records = synthetic.generate(raw, studies=2, size=32, seed=0, test_studies=0, seg_fraction=1,
                               variant='shifted')
  converted = convert.run(raw, out, workers=1, progress=False)
  assert [r['status'] for r in converted] == ['ok', 'ok']
  assert {r['uid'] for r in records} == {s.uid for s in shifted[:2]}
  assert all(r['has_segmentation'] and 'C1' in r['vertebra_boxes'] for r in converted)
