"""Bad input: each troublesome study gets its documented policy, a message naming the file, and the
batch goes on; failed studies leave no volume and the command exits non-zero."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from cspine_jax.data import store
from data_tools import synthetic

SIZE = 32
# Study folder names that are not DICOM UIDs (a patient's name, as PACS exports write them): each
# study fails, counted and listed, and the name reaches no output, log or path.
HOSTILE_NAMES = {'bad_uid': 'Patient_Smith', 'spaces_name': 'Smith John 1960'}
TILT_DEG = 22.0  # a real gantry-tilted study: IOP [1, 0, 0, 0, 0.927, -0.375], tilt -22


def _edit(path, **tags):
  ds = pydicom.dcmread(path)
  for key, value in tags.items():
    setattr(ds, key, value)
  ds.save_as(path)


def _middle(folder):
  names = sorted(os.listdir(folder), key=lambda n: int(n.split('.')[0]))
  return names[len(names) // 2], names


@pytest.fixture(scope='module')
def bad_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('bad'))
  cases, records = {}, []
  kinds = ['good', 'truncated', 'not_dicom_file', 'mr', 'localizer', 'duplicate', 'missing',
           'orientation', 'spacing', 'same_position', 'bad_uid', 'spaces_name', 'tilted',
           'tilt_tag']
  for i, kind in enumerate(kinds):
    study = synthetic.make_study(11, i, SIZE, labels=np.zeros(8, int),
                                 transfer_syntax=synthetic.EXPLICIT_VR_LE)
    records.append(synthetic.write_study(study, root, 'train', None))
    folder = os.path.join(root, 'train_images', study.uid)
    mid, names = _middle(folder)
    if kind == 'truncated':
      with open(os.path.join(folder, mid), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(folder, mid)) // 2)
    elif kind == 'not_dicom_file':
      with open(os.path.join(folder, 'README.txt'), 'w') as f:
        f.write('exported by a PACS\n')
    elif kind == 'mr':
      for n in names:
        _edit(os.path.join(folder, n), Modality='MR')
    elif kind == 'localizer':
      src = os.path.join(folder, mid)
      ds = pydicom.dcmread(src)
      ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=['localizer', str(i)])
      ds.ImageType = ['ORIGINAL', 'PRIMARY', 'LOCALIZER']
      ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
      ds.InstanceNumber = 9999
      ds.save_as(os.path.join(folder, '9999.dcm'))
    elif kind == 'duplicate':
      shutil.copy(os.path.join(folder, mid), os.path.join(folder, '5000.dcm'))
    elif kind == 'missing':
      os.remove(os.path.join(folder, mid))
    elif kind == 'orientation':
      _edit(os.path.join(folder, mid), ImageOrientationPatient=[1, 0, 0, 0, 0.96, 0.28])
    elif kind == 'spacing':
      _edit(os.path.join(folder, mid), PixelSpacing=[1.5, 1.5])
    elif kind == 'same_position':
      other = names[names.index(mid) + 1]
      pos = pydicom.dcmread(os.path.join(folder, other)).ImagePositionPatient
      _edit(os.path.join(folder, mid), ImagePositionPatient=pos)
    elif kind in HOSTILE_NAMES:
      os.rename(folder, os.path.join(root, 'train_images', HOSTILE_NAMES[kind]))
    elif kind == 'tilted':
      # Oblique slices stacked along their own (tilted) normal: a consistent geometry that only
      # the angle to the patient's S axis gives away.
      c, s = math.cos(math.radians(TILT_DEG)), math.sin(math.radians(TILT_DEG))
      normal = np.array([0.0, s, c])  # row (1, 0, 0) x column (0, c, -s)
      for n in names:
        path = os.path.join(folder, n)
        z = float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])
        k = (study.origin[2] - z) / study.spacing[0]  # slice index, from the top
        pos = study.origin - k * study.spacing[0] * normal
        _edit(path, ImageOrientationPatient=[1, 0, 0, 0, round(c, 6), round(-s, 6)],
              ImagePositionPatient=[round(float(v), 4) for v in pos],
              GantryDetectorTilt=-TILT_DEG)
    elif kind == 'tilt_tag':
      # Axial-looking geometry, but the scanner says its gantry was tilted.
      for n in names:
        _edit(os.path.join(folder, n), GantryDetectorTilt=-TILT_DEG)
    cases[kind] = (study, mid)
  synthetic.write_csvs(root, records)
  return root, cases


@pytest.fixture(scope='module')
def converted(bad_root, tmp_path_factory):
  root, _ = bad_root
  out = str(tmp_path_factory.mktemp('out'))
  proc = subprocess.run([sys.executable, '-m', 'data_tools.convert', f'--input={root}',
                         f'--output={out}', '--workers=2', '--noprogress'],
                        capture_output=True, text=True)
  with open(os.path.join(out, 'manifest.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return out, proc, records


def _stand_in(bad_root, kind):
  """The uid the converter gives a refused folder: its position among the study folders."""
  folders = sorted(os.listdir(os.path.join(bad_root[0], 'train_images')))
  return f'invalid-folder-train-{folders.index(HOSTILE_NAMES[kind]) + 1}'


def _record(converted, bad_root, kind):
  _, cases = bad_root
  _, _, records = converted
  uid = _stand_in(bad_root, kind) if kind in HOSTILE_NAMES else cases[kind][0].uid
  return next(r for r in records if r['uid'] == uid)


FAILS = {
    'truncated': 'truncated or corrupt',
    'mr': 'modality MR, expected CT',
    'missing': 'missing slice',
    'orientation': 'ImageOrientationPatient differs',
    'spacing': 'PixelSpacing',
    'same_position': 'two different slices at the same position',
    'bad_uid': 'not named by a valid DICOM StudyInstanceUID',
    'spaces_name': 'not named by a valid DICOM StudyInstanceUID',
    'tilted': f'gantry tilt or oblique slices: GantryDetectorTilt -22 degrees, slice normal '
              f'{TILT_DEG:.1f} degrees from the patient\'s S axis (ImageOrientationPatient '
              '[1, 0, 0, 0, 0.9272, -0.3746])',
    'tilt_tag': 'gantry tilt or oblique slices: GantryDetectorTilt -22 degrees, slice normal '
                '0.0 degrees',
}
WARNS = {
    'not_dicom_file': 'README.txt: not a DICOM file, ignored',
    'localizer': 'localizer',
    'duplicate': 'duplicate of',
}


def test_exit_code_and_summary(converted, bad_root):
  _, proc, records = converted
  assert proc.returncode == 1
  assert len(records) == len(bad_root[1])  # every folder counted, hostile names included
  assert f'{len(bad_root[1]) - len(FAILS)} studies converted' in proc.stdout
  assert f'{len(FAILS)} failed' in proc.stdout
  assert proc.stdout.count('FAILED ') == len(FAILS)
  for kind in FAILS:
    assert f'FAILED {_record(converted, bad_root, kind)["uid"]}: ' in proc.stdout
  # The command's last line says it failed and where the reasons are; no traceback.
  assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {len(FAILS)} of ')
  assert 'Traceback' not in proc.stderr


def test_hostile_folder_names_are_reported_by_position_only(converted, bad_root):
  """Before: "Smith John 1960" vanished from manifest and counts (stored under a mangled name,
  looked up by the real one), and "Patient_Smith" was written verbatim into the manifest and the
  log. Now each is failed and listed as "study folder #n", and no byte of any output, of stdout or
  of stderr holds the name or a part of it."""
  out, proc, _ = converted
  needles = [n.encode() for n in HOSTILE_NAMES.values()] + [b'Smith', b'Patient_']
  blobs = {'stdout': proc.stdout.encode(), 'stderr': proc.stderr.encode()}
  for dirpath, dirnames, files in os.walk(out):
    for name in dirnames + files:
      blobs[os.path.join(dirpath, name) + ' (name)'] = name.encode()
    for name in files:
      with open(os.path.join(dirpath, name), 'rb') as f:
        blobs[os.path.join(dirpath, name)] = f.read()
  for where, blob in blobs.items():
    for needle in needles:
      assert needle not in blob, (where, needle)
  folders = sorted(os.listdir(os.path.join(bad_root[0], 'train_images')))
  for kind, name in HOSTILE_NAMES.items():
    rec = _record(converted, bad_root, kind)
    assert rec['uid'] == f'invalid-folder-train-{folders.index(name) + 1}'
    assert f'study folder #{folders.index(name) + 1} of train_images/' in rec['status']
  assert len(store.read_manifest(out)) == len(bad_root[1])  # stand-ins are valid manifest uids


@pytest.mark.parametrize('kind', sorted(FAILS))
def test_failed_study_policy(converted, bad_root, kind):
  out, _, _ = converted
  rec = _record(converted, bad_root, kind)
  assert rec['status'].startswith('error: ')
  assert FAILS[kind] in rec['status'], rec['status']
  if kind in ('truncated', 'orientation', 'spacing', 'same_position'):
    assert bad_root[1][kind][1] in rec['status']  # names the file
  if kind in ('tilted', 'tilt_tag'):
    folder = os.path.join(bad_root[0], 'train_images', bad_root[1][kind][0].uid)
    assert f'e.g. {sorted(os.listdir(folder))[0]}' in rec['status']  # names a file
  for sub in ('volumes', 'segmentations'):
    assert not os.path.exists(os.path.join(out, sub, rec['uid']))
  assert 'shape' not in rec


@pytest.mark.parametrize('kind', sorted(WARNS))
def test_recovered_study_policy(converted, bad_root, kind):
  out, _, _ = converted
  rec = _record(converted, bad_root, kind)
  assert rec['status'] == 'ok'
  assert any(WARNS[kind] in w for w in rec['warnings']), rec['warnings']
  study = bad_root[1][kind][0]
  np.testing.assert_array_equal(
      store.read_array(os.path.join(out, 'volumes', study.uid)), study.hu)


def test_good_study_unaffected(converted, bad_root):
  rec = _record(converted, bad_root, 'good')
  assert rec['status'] == 'ok' and rec['warnings'] == []


def test_nothing_outside_output_and_no_temporaries(converted, bad_root):
  out, _, _ = converted
  root, _ = bad_root
  for name in HOSTILE_NAMES.values():
    assert not os.path.exists(os.path.join(os.path.dirname(out), name))
  for dirpath, dirnames, files in os.walk(out):
    for name in dirnames + files:
      assert not name.startswith('.tmp-'), os.path.join(dirpath, name)
  listed = set(os.listdir(out))
  assert {'.state', 'manifest.jsonl', 'volumes', *store.VOLUME_LEVELS} <= listed
  assert listed <= {'.state', 'manifest.jsonl', 'volumes', 'segmentations', *store.LEVELS}
