"""Bad input: each troublesome study gets its documented policy, a message naming the file, and the
batch goes on; failed studies leave no volume and the command exits non-zero."""
import json
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
           'orientation', 'spacing', 'same_position', 'bad_uid']
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
    elif kind == 'bad_uid':
      os.rename(folder, os.path.join(root, 'train_images', 'Patient_Smith_scan'))
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


def _record(converted, bad_root, kind):
  _, cases = bad_root
  _, _, records = converted
  uid = 'Patient_Smith_scan' if kind == 'bad_uid' else cases[kind][0].uid
  return next(r for r in records if r['uid'] == uid)


FAILS = {
    'truncated': 'truncated or corrupt',
    'mr': 'modality MR, expected CT',
    'missing': 'missing slice',
    'orientation': 'ImageOrientationPatient differs',
    'spacing': 'PixelSpacing',
    'same_position': 'two different slices at the same position',
    'bad_uid': 'not a valid DICOM StudyInstanceUID',
}
WARNS = {
    'not_dicom_file': 'README.txt: not a DICOM file, ignored',
    'localizer': 'localizer',
    'duplicate': 'duplicate of',
}


def test_exit_code_and_summary(converted):
  _, proc, records = converted
  assert proc.returncode == 1
  assert len(records) == 11
  assert f'{len(FAILS)} failed' in proc.stdout
  assert proc.stdout.count('FAILED ') == len(FAILS)


@pytest.mark.parametrize('kind', sorted(FAILS))
def test_failed_study_policy(converted, bad_root, kind):
  out, _, _ = converted
  rec = _record(converted, bad_root, kind)
  assert rec['status'].startswith('error: ')
  assert FAILS[kind] in rec['status'], rec['status']
  if kind in ('truncated', 'orientation', 'spacing', 'same_position'):
    assert bad_root[1][kind][1] in rec['status']  # names the file
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
  assert not os.path.exists(os.path.join(os.path.dirname(out), 'Patient_Smith_scan'))
  for dirpath, dirnames, files in os.walk(out):
    for name in dirnames + files:
      assert not name.startswith('.tmp-'), os.path.join(dirpath, name)
      assert 'Patient_Smith' not in name
  assert sorted(os.listdir(out)) == ['.state', 'manifest.jsonl', 'segmentations', 'volumes']
