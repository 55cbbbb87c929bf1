"""data_tools.convert --runner (data_tools/beam_convert.py) against the process pool: the same
files, byte for byte, from a local folder with the DirectRunner's worker processes and from an S3
bucket (moto's); failed and refused studies recorded, a rerun converting nothing it did before."""
import gzip
import os
import re
import shutil
import socket
import subprocess
import sys

import boto3
from moto import mock_aws
import pytest

from cspine_jax import cli
from cspine_jax.data import store
from data_tools import beam_convert
from data_tools import convert
from data_tools import synthetic

HOSTILE = 'Smith John'  # a study folder named by a patient: refused, never echoed
MULTI_PROCESSING = '--direct_running_mode=multi_processing --direct_num_workers=2'


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  """(RSNA root, uid of its corrupt study): 4 train studies (2 with masks, one of them gzipped)
  and 1 test study of 32x32; one train study with a truncated slice (fails), one with a README.txt
  beside its slices (a warning), and a folder named by a patient (refused)."""
  root = str(tmp_path_factory.mktemp('raw'))
  synthetic.generate(root, studies=4, size=32, seed=21, test_studies=1, seg_fraction=0.5)
  images = os.path.join(root, 'train_images')
  uids = sorted(os.listdir(images))
  masks = sorted(os.listdir(os.path.join(root, store.INPUT_SEGMENTATIONS)))
  assert len(masks) == 2
  nii = os.path.join(root, store.INPUT_SEGMENTATIONS, masks[0])
  with open(nii, 'rb') as f, gzip.open(nii + '.gz', 'wb') as g:
    g.write(f.read())
  os.remove(nii)
  plain = [u for u in uids if u + '.nii' not in masks]
  corrupt = plain[0]
  slices = sorted(os.listdir(os.path.join(images, corrupt)), key=lambda n: int(n.split('.')[0]))
  middle = os.path.join(images, corrupt, slices[len(slices) // 2])
  with open(middle, 'r+b') as f:
    f.truncate(os.path.getsize(middle) // 2)
  with open(os.path.join(images, plain[1], 'README.txt'), 'w') as f:
    f.write('exported by a PACS\n')
  os.mkdir(os.path.join(images, HOSTILE))
  shutil.copy(os.path.join(images, plain[1], slices[0]), os.path.join(images, HOSTILE))
  return root, corrupt


def _command(root, out, *args):
  return subprocess.run([sys.executable, '-m', 'data_tools.convert', f'--input={root}',
                         f'--output={out}', '--noprogress', *args],
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def converted(raw, tmp_path_factory):
  """(pool's output, Beam's output, pool's process, Beam's process): the same command, once with
  2 pool workers and once on the DirectRunner with 2 worker processes."""
  base = tmp_path_factory.mktemp('converted')
  pool_out, beam_out = str(base / 'pool'), str(base / 'beam')
  pool = _command(raw[0], pool_out, '--workers=2')
  beam = _command(raw[0], beam_out, '--runner=DirectRunner', f'--beam_options={MULTI_PROCESSING}')
  return pool_out, beam_out, pool, beam


def _tree(root: str) -> dict[str, bytes | None]:
  """{relative path: bytes} of every file under ``root``; folders as None (empty ones count)."""
  found = {}
  for dirpath, dirnames, files in os.walk(root):
    for name in dirnames:
      found[os.path.relpath(os.path.join(dirpath, name), root) + '/'] = None
    for name in files:
      with open(os.path.join(dirpath, name), 'rb') as f:
        found[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
  return found


def _assert_same_tree(a: str, b: str) -> None:
  ta, tb = _tree(a), _tree(b)
  assert len(ta) > 40  # arrays, levels, records: the walk saw the output
  missing = b'<missing>'
  differ = sorted(k for k in set(ta) | set(tb) if ta.get(k, missing) != tb.get(k, missing))
  assert not differ, differ


def test_beam_output_is_byte_identical_to_the_pool(converted):
  """Every file: arrays, levels, .state records, manifest.jsonl; and the lock files of .state/ (the
  Beam command takes the pool's locks on a local output, so nothing is left out)."""
  pool_out, beam_out, pool, beam = converted
  _assert_same_tree(pool_out, beam_out)
  assert os.path.exists(os.path.join(beam_out, convert.RUN_LOCK))
  # The conversions ran in the DirectRunner's 2 worker processes (each logs its start), not in
  # the command's.
  assert beam.stderr.count('Python sdk harness starting') == 2, beam.stderr[-3000:]


def test_same_summary_and_exit_code(converted):
  pool_out, beam_out, pool, beam = converted
  assert pool.returncode == beam.returncode == cli.FAILURE, beam.stderr[-3000:]

  def summary(proc, out):
    return re.sub(r' in [0-9.]+ s ', ' in T s ', proc.stdout).replace(out, 'OUT')

  assert summary(beam, beam_out) == summary(pool, pool_out)
  assert '4 studies converted' in pool.stdout and '2 failed' in pool.stdout
  last = [p.stderr.strip().splitlines()[-1] for p in (pool, beam)]
  assert last[1] == last[0].replace(pool_out, beam_out)
  assert 'Traceback' not in beam.stderr


def test_failed_and_refused_studies_are_recorded_and_the_others_convert(raw, converted):
  root, corrupt = raw
  records = {r['uid']: r for r in store.read_manifest(converted[1])}
  assert len(records) == 6  # 5 train folders (one refused, one corrupt) + 1 test study
  failed = {u: r['status'] for u, r in records.items() if r['status'] != 'ok'}
  assert set(failed) == {corrupt, 'invalid-folder-train-5'}
  assert 'truncated or corrupt' in failed[corrupt]
  assert 'not named by a valid DICOM StudyInstanceUID' in failed['invalid-folder-train-5']
  assert not store.array_exists(converted[1], store.VOLUMES, corrupt)
  assert any('README.txt: not a DICOM file' in w for r in records.values() for w in r['warnings'])
  assert sum(r.get('has_segmentation', False) for r in records.values()) == 2
  for name in ('Smith', 'John'):
    assert name not in open(os.path.join(converted[1], store.MANIFEST)).read()


def _stamps(root: str) -> dict[str, int]:
  return {path: os.stat(os.path.join(root, path)).st_mtime_ns
          for path in _tree(root) if not path.endswith('/')}


def test_rerun_skips_what_is_done(raw, converted, tmp_path):
  """In-process (in_memory), on a copy: only the failed study is tried again; no other record,
  array or level is written again, and the manifest reads the same."""
  root, corrupt = raw
  out = str(tmp_path / 'again')
  shutil.copytree(converted[1], out)
  before, stamps = _tree(out), _stamps(out)
  beam_convert.run(root, out, 'DirectRunner')
  assert _tree(out) == before
  rewritten = {p for p, t in _stamps(out).items() if t != stamps[p]}
  assert rewritten == {store.MANIFEST, os.path.join(convert.STATE_DIR, corrupt + '.json')}


def _upload(root: str, url: str, options) -> None:
  from apache_beam.io.aws import s3io  # pylint: disable=import-outside-toplevel
  client = s3io.S3IO(options=options)
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f, client.open(f'{url}/{os.path.relpath(path, root)}', 'wb') as g:
        g.write(f.read())


def test_bucket_input_is_byte_identical_to_the_pool(raw, converted, tmp_path):
  """--input=s3://...: the studies found by the same rules in a listing of objects, each copied to
  a local folder by its worker (a gzipped mask stays gzipped); the output equals the pool's."""
  out = str(tmp_path / 'from_s3')
  options = '--s3_region_name=us-east-1'
  with mock_aws():
    boto3.client('s3', region_name='us-east-1').create_bucket(Bucket='rsna-input')
    _upload(raw[0], 's3://rsna-input/rsna', beam_convert.pipeline_options('DirectRunner', options))
    records = beam_convert.run('s3://rsna-input/rsna/', out, 'DirectRunner', options)
  assert len(records) == 6
  _assert_same_tree(converted[0], out)


def test_an_unexpected_error_fails_one_study_only(raw, tmp_path, monkeypatch):
  """What convert_study does not turn into a record (a bug, a full disk) becomes one here: the
  study is recorded as failed, its outputs removed, and the pipeline goes on."""
  job = next(j for j in convert.discover(raw[0]) if not j['refused'] and j['uid'] != raw[1])
  out = str(tmp_path / 'out')

  def broken(*args):
    raise MemoryError('no room')

  monkeypatch.setattr(convert, 'convert_study', broken)
  record = beam_convert.convert_one(job, out, [0] * 8, [], copy_input=False)
  assert record['status'] == 'error: internal error in the Beam worker (MemoryError: no room)'
  assert store.JobRecords(out, convert.STATE_DIR).load(job['uid']) == record
  assert not store.array_exists(out, store.VOLUMES, job['uid'])


def test_a_worker_left_by_a_killed_command_converts_nothing(tmp_path):
  out = str(tmp_path)
  os.makedirs(os.path.join(out, convert.STATE_DIR))
  alive = beam_convert._driver(out)
  with beam_convert._while_driver_lives(out, alive):
    pass
  gone = (socket.gethostname(), alive[1], 'another start time')  # the pid, reused or dead
  with pytest.raises(RuntimeError, match='is gone'):
    with beam_convert._while_driver_lives(out, gone):
      pytest.fail('converted a study for a command that is gone')
  # A worker on another machine cannot see the command's process: it does not look.
  with beam_convert._while_driver_lives(out, ('elsewhere', 1, 'x')):
    pass


def test_beam_options_string():
  options = beam_convert.pipeline_options('DirectRunner', MULTI_PROCESSING + " --job_name='a b'")
  got = options.get_all_options()
  assert (got['runner'], got['direct_num_workers'], got['job_name']) == ('DirectRunner', 2, 'a b')
  with pytest.raises(cli.UsageError, match='No closing quotation'):
    beam_convert.pipeline_options('DirectRunner', '--job_name="a')
  with pytest.raises(cli.UsageError, match='give it with --runner'):
    beam_convert.pipeline_options('DirectRunner', '--runner=DataflowRunner')
