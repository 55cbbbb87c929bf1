"""How the commands meet bad input and bad usage: a malformed train.csv, an empty or missing
--input, a bad flag (each one line on stderr, no traceback, exit 1 for a failure and 2 for a usage
error, nothing written); a manifest whose uids could point outside its folder; and the
permissions of the files written whole (they are shared data)."""
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from cspine_jax import constants
from cspine_jax.data import manifest
from cspine_jax.data import store
from data_tools import dicom
from data_tools import synthetic


def _command(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True)


def _one_line_error(proc, code, *texts):
  """The command failed with ``code``, saying all of ``texts`` in one stderr line, no traceback."""
  assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for text in texts:
    assert text in lines[0], lines[0]


@pytest.fixture(scope='module')
def one_study(tmp_path_factory):
  """An RSNA-shaped root with one tiny good study (no CSVs: each test writes its own)."""
  root = str(tmp_path_factory.mktemp('one'))
  study = synthetic.make_study(13, 0, 32, labels=np.zeros(8, int),
                               transfer_syntax=synthetic.EXPLICIT_VR_LE)
  synthetic.write_study(study, root, 'train', None)
  return root, study


def _root_with(tmp_path, one_study, name, text):
  """A root sharing ``one_study``'s images, with the CSV file ``name`` holding ``text``."""
  root = tmp_path / 'rsna'
  root.mkdir()
  os.symlink(os.path.join(one_study[0], 'train_images'), root / 'train_images')
  (root / name).write_text(text)
  return str(root)


def _labels_csv(uid, bad_c3):
  row = ['0'] * 8
  row[constants.TARGETS.index('C3')] = bad_c3
  return (f'StudyInstanceUID,{",".join(constants.TARGETS)}\n{uid},{",".join(["0"] * 8)}\n'
          f'1.2.3.4,{",".join(row)}\n')


# Before: 'yes' and '' ended in a bare ValueError traceback (int(float('yes'))), '2' was
# accepted as a label, a bad box value a bare traceback too.
CSV_CASES = {
    'label_yes': ('train.csv', lambda uid: _labels_csv(uid, 'yes'),
                  "train.csv:3: column C3: 'yes' is not 0 or 1"),
    'label_two': ('train.csv', lambda uid: _labels_csv(uid, '2'),
                  "train.csv:3: column C3: '2' is not 0 or 1"),
    'label_empty': ('train.csv', lambda uid: _labels_csv(uid, ''),
                    'train.csv:3: column C3: empty is not 0 or 1'),
    'box_not_a_number': ('train_bounding_boxes.csv',
                         lambda uid: f'StudyInstanceUID,x,y,width,height,slice_number\n'
                                     f'{uid},1,2,abc,4,5\n',
                         "train_bounding_boxes.csv:2: column width: 'abc' is not a number"),
}


@pytest.mark.parametrize('case', sorted(CSV_CASES))
def test_malformed_csv_fails_naming_file_line_and_column(tmp_path, one_study, case):
  name, text, message = CSV_CASES[case]
  root = _root_with(tmp_path, one_study, name, text(one_study[1].uid))
  out = tmp_path / 'out'
  proc = _command('data_tools.convert', f'--input={root}', f'--output={out}', '--noprogress')
  _one_line_error(proc, 1, f'{root}/{message}')
  assert not out.exists()  # read before anything is written


@pytest.mark.parametrize('layout', ['empty_folder', 'rsna_without_studies'])
def test_no_study_found_fails_and_writes_nothing(tmp_path, layout):
  """Before: exit 0 and "0 studies converted", with an empty manifest."""
  root = tmp_path / 'input'
  root.mkdir()
  if layout == 'rsna_without_studies':
    (root / 'train_images').mkdir()
    (root / 'train.csv').write_text(f'StudyInstanceUID,{",".join(constants.TARGETS)}\n')
    (root / 'train_images' / 'notes.txt').write_text('not a study folder\n')
  out = tmp_path / 'out'
  proc = _command('data_tools.convert', f'--input={root}', f'--output={out}', '--noprogress')
  _one_line_error(proc, 1, f'no study folder found under --input {root}',
                  'train_images/<StudyInstanceUID>/*.dcm')
  assert proc.stdout == ''
  assert not out.exists()


# Usage errors (exit 2, nothing done). Before: absl's usage text (many lines, exit 1) or, for a
# missing --input, a FileNotFoundError traceback.
USAGE_CASES = {
    'convert_negative_workers': ('data_tools.convert', ['--workers=-1'], '--workers=-1'),
    'convert_missing_input': ('data_tools.convert', ['--input={tmp}/nowhere'],
                              '--input {tmp}/nowhere does not exist'),
    'convert_no_output': ('data_tools.convert', ['--output='], '--input and --output are required'),
    'convert_unknown_flag': ('data_tools.convert', ['--wrokers=2'], 'wrokers'),
    'convert_beam_options_alone': ('data_tools.convert', ['--beam_options=--direct_num_workers=2'],
                                   '--beam_options needs --runner'),
    'convert_workers_with_runner': ('data_tools.convert', ['--runner=DirectRunner', '--workers=2'],
                                    '--workers sizes the process pool'),
    'synthetic_tiny_size': ('data_tools.synthetic', ['--output={tmp}/out', '--size=8'],
                            '--size >= 32'),
    'bench_missing_input': ('data_tools.bench_convert', ['--input={tmp}/nowhere'],
                            '--input {tmp}/nowhere: no train_images/'),
}


@pytest.mark.parametrize('case', sorted(USAGE_CASES))
def test_usage_errors_exit_2_with_one_line(tmp_path, one_study, case):
  module, args, message = USAGE_CASES[case]
  defaults = {'--input': f'--input={one_study[0]}', '--output': f'--output={tmp_path}/out',
              '--noprogress': '--noprogress'} if module == 'data_tools.convert' else {}
  for a in args:
    defaults[a.split('=')[0]] = a
  argv = [a.format(tmp=tmp_path) for a in defaults.values()]
  proc = _command(module, *argv)
  _one_line_error(proc, 2, message.format(tmp=tmp_path))
  assert not (tmp_path / 'out').exists()


# --------------------------------------------------------------------------------------------
# The manifest's uids become paths (ROOT/<kind>/<uid>/, replaced with rmtree by the localizer).
# --------------------------------------------------------------------------------------------

GOOD = {'uid': '1.2.826.0.1.1', 'split': 'train', 'status': 'ok', 'shape': [4, 5, 6],
        'spacing_mm': [1.0, 1.0, 1.0], 'labels': [0] * 8}


def _write_lines(root, *lines):
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, store.MANIFEST), 'w') as f:
    f.write(''.join(line + '\n' for line in lines))
  return os.path.join(root, store.MANIFEST)


@pytest.mark.parametrize('uid', ['..', '.', 'a/b', '../../home', '', '.tmp-1.2.3', '/etc',
                                 '1.2 3', 'x' * 65, 123, None])
def test_manifest_uids_that_are_not_one_plain_name_are_refused(tmp_path, uid):
  """Before: any uid was accepted, and "..", handed to the localizer, made its rmtree target
  the dataset's parent folder."""
  bad = {**GOOD, 'uid': uid}
  if uid is None:
    del bad['uid']
  path = _write_lines(str(tmp_path), json.dumps(GOOD), '', json.dumps(bad))
  for read in (store.read_manifest, manifest.load_manifest):
    with pytest.raises(ValueError, match=f'^{re.escape(path)}:3: uid '):
      read(str(tmp_path))
  with pytest.raises(ValueError, match='uid'):
    manifest.parse_study(bad)
  if isinstance(uid, str):  # and no path is ever built from it
    for make_path in (lambda: store.array_path(str(tmp_path), store.PREDICTED_SEGMENTATIONS, uid),
                      lambda: store.JobRecords(str(tmp_path), store.LOCALIZE_STATE).path(uid),
                      lambda: store.new_temp_dir(str(tmp_path / 'v'), uid)):
      with pytest.raises(ValueError, match='not a study UID'):
        make_path()


def test_manifest_uids_the_writers_use_are_accepted(tmp_path):
  """DICOM UIDs, the converter's stand-ins for refused folders, the fixtures' short names."""
  uids = ['1.2.826.0.1.3680043.10197', 'invalid-folder-train-3', 'u1', 'broken']
  _write_lines(str(tmp_path), *(json.dumps({**GOOD, 'uid': u}) for u in uids))
  assert [r['uid'] for r in store.read_manifest(str(tmp_path))] == uids
  assert [s.uid for s in manifest.load_manifest(str(tmp_path))] == sorted(uids)


@pytest.mark.parametrize('line, message', [
    ('{"uid": "1.2.826.0.1.1", "status": "ok"', 'not valid JSON'),
    ('[1, 2]', 'a list, not a JSON object'),
    (json.dumps({**GOOD, 'split': 'test'}), 'uid 1.2.826.0.1.1 is already on line 1'),
    (json.dumps({**GOOD, 'uid': '1.2.3', 'shape': None}), 'field shape is missing'),
    (json.dumps({**GOOD, 'uid': '1.2.3', 'spacing_mm': ['a', 1, 1]}), 'field spacing_mm: '),
    (json.dumps({**GOOD, 'uid': '1.2.3', 'labels': [0, 1]}), 'field labels: 2 labels, want 8'),
])
def test_malformed_manifest_lines_are_named(tmp_path, line, message):
  path = _write_lines(str(tmp_path), json.dumps(GOOD), line)
  with pytest.raises(ValueError, match=f'^{re.escape(path)}:2: {message}'):
    manifest.load_manifest(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Permissions.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_written_whole_get_the_umask_mode(tmp_path, umask, mode):
  """Before: tempfile.mkstemp made every manifest, state record, prediction.json and overlay
  0600 whatever the umask, unreadable by the other users of a shared dataset."""
  root = str(tmp_path)
  old = os.umask(umask)
  try:
    store.atomic_write(os.path.join(root, 'prediction.json'), '{}\n')
    store.atomic_write(os.path.join(root, 'prediction.json'), '{"again": 1}\n')  # a replace
    store.write_manifest(root, [GOOD])
    store.JobRecords(root, store.CONVERT_STATE).save({'uid': GOOD['uid']})
    folder = store.new_temp_dir(os.path.join(root, store.VOLUMES), GOOD['uid'], create=True)
  finally:
    os.umask(old)
  for path in ('prediction.json', store.MANIFEST, os.path.join(store.CONVERT_STATE,
                                                              GOOD['uid'] + '.json')):
    assert stat.S_IMODE(os.stat(os.path.join(root, path)).st_mode) == mode, path
  assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask
  assert not [n for n in os.listdir(root) if n.startswith(store.TMP_PREFIX)]


def test_synthetic_study_folders_get_the_umask_mode(tmp_path):
  """Before: tempfile.mkdtemp made each generated study folder 0700."""
  study = synthetic.make_study(13, 1, 32, transfer_syntax=synthetic.EXPLICIT_VR_LE)
  old = os.umask(0o022)
  try:
    synthetic.write_study(study, str(tmp_path), 'train', None)
  finally:
    os.umask(old)
  folder = tmp_path / 'train_images' / study.uid
  assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755


def test_a_slice_cut_inside_its_header_fails_naming_that_file(tmp_path, one_study):
  # It used to parse as file meta only, be set aside as a "second series (modality missing)",
  # and fail the study as a gap in z between its two neighbours.
  folder = os.path.join(one_study[0], 'train_images', one_study[1].uid)
  copy = tmp_path / 'study'
  copy.mkdir()
  names = sorted(os.listdir(folder), key=lambda n: int(n.split('.')[0]))
  for name in names:
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    (copy / name).write_bytes(data[:300] if name == names[len(names) // 2] else data)
  with pytest.raises(dicom.StudyError, match=re.escape(f'{names[len(names) // 2]}: not a readable '
                                                       'DICOM file')):
    dicom.read_series(str(copy))
