"""Converted datasets in a bucket: convert, train, localize and eval against a local S3 server.

The server is moto's, in this process (from PyPI, in the test extra): the real S3 protocol over
HTTP, spoken by TensorStore's own s3 driver exactly as it would speak to AWS, MinIO or Ceph. Every
output is compared byte for byte with the same run on a local folder.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cspine_jax import cli
from cspine_jax import eval as eval_lib
from cspine_jax import localize_lib
from cspine_jax import train_loop
from cspine_jax.data import kvstore
from cspine_jax.data import store
from data_tools import convert
from tests import test_localize
from tests.conftest import repo_root

BUCKET = 'cspine-test'
LOCKS = {convert.RUN_LOCK, convert.WORKERS_LOCK}  # flock files: a bucket has no locks


@pytest.fixture(scope='module')
def s3():
  """The endpoint URL of a local S3 server holding an empty bucket, with the standard AWS
  variables pointing at it for the module's tests (and the processes they start)."""
  boto3 = pytest.importorskip('boto3')  # moto's own dependency
  from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
  server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  endpoint = f'http://{host}:{port}'
  with pytest.MonkeyPatch.context() as mp:
    for k in ('AWS_ENDPOINT_URL_S3', 'AWS_SESSION_TOKEN', 'AWS_PROFILE', 'AWS_DEFAULT_REGION'):
      mp.delenv(k, raising=False)
    mp.setenv('AWS_ENDPOINT_URL', endpoint)
    mp.setenv('AWS_ACCESS_KEY_ID', 'test-key')
    mp.setenv('AWS_SECRET_ACCESS_KEY', 'test-secret')
    mp.setenv('AWS_REGION', 'us-east-1')
    boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1').create_bucket(
        Bucket=BUCKET)
    yield endpoint
  server.stop()


def _local_files(root: str) -> dict[str, bytes]:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      key = os.path.relpath(path, root)
      if key not in LOCKS:
        out[key] = open(path, 'rb').read()
  return out


def _bucket_files(url: str) -> dict[str, bytes]:
  return {k: kvstore.read_object(f'{url}/{k}') for k in kvstore.list_folder(url)}


def _losses(workdir: str) -> list[float]:
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [l['loss'] for l in lines if 'loss' in l]


@pytest.fixture(scope='module')
def converted_s3(s3, synthetic_converted):
  """The session's synthetic studies converted into the bucket (workers=1, as the local copy)."""
  raw, _ = synthetic_converted
  url = f's3://{BUCKET}/converted'
  records = convert.run(raw, url, workers=1, progress=False)
  assert all(r['status'] == 'ok' for r in records)
  return url


def test_convert_to_s3_is_byte_identical_and_resumes(converted_s3, synthetic_converted):
  local = _local_files(synthetic_converted[1])
  remote = _bucket_files(converted_s3)
  assert sorted(remote) == sorted(local)
  assert any(k.startswith('volumes_1mm/') for k in remote) and 'manifest.jsonl' in remote
  assert [k for k in remote if remote[k] != local[k]] == []
  # A rerun converts nothing again: no object is rewritten (a record is written last per study).
  before = {k: v for k, v in remote.items() if k.startswith('.state/')}
  records = convert.run(synthetic_converted[0], converted_s3 + '/', workers=1, progress=False)
  assert len(records) == 11 and _bucket_files(converted_s3) == remote and before


def test_a_study_is_visible_only_once_complete(s3, synthetic_converted, monkeypatch):
  """A conversion that dies inside a study leaves no record and no manifest line for it; the
  rerun removes what it wrote and converts it whole."""
  raw = synthetic_converted[0]
  url = f's3://{BUCKET}/killed'
  real = store.ShardWriter.close

  real_delete = kvstore.delete_folder

  def die_on_second_volume(self):
    if '/volumes/' in self.path and sum('/volumes/' in p for p in seen) == 1:
      dead.append(True)  # as kill -9: no cleanup runs after this
      raise KeyboardInterrupt
    seen.append(self.path)
    real(self)

  seen, dead = [], []
  monkeypatch.setattr(store.ShardWriter, 'close', die_on_second_volume)
  monkeypatch.setattr(kvstore, 'delete_folder', lambda u: None if dead else real_delete(u))
  monkeypatch.setattr(convert, '_run_locked', _in_process_run)
  with pytest.raises(KeyboardInterrupt):
    convert.run(raw, url, workers=1, progress=False)
  keys = kvstore.list_folder(url)
  done = [k for k in keys if k.startswith('.state/')]
  assert len(done) == 1 and 'manifest.jsonl' not in keys
  half = [k for k in keys if k.startswith('volumes/') and k.split('/')[1] not in done[0]]
  assert half and not any(k.endswith('zarr.json') for k in half)  # shards, never a zarr.json
  monkeypatch.undo()
  convert.run(raw, url, workers=1, progress=False)
  assert _bucket_files(url) == _bucket_files(f's3://{BUCKET}/converted')


def _in_process_run(jobs, labels, boxes, out, workers, progress):
  """convert._run_locked without its worker processes (so that a patched writer applies)."""
  records = [convert._worker((j, out, labels.get(j['uid']), boxes.get(j['uid'], [])))
             for j in jobs]
  store.write_manifest(out, records)
  return records


def test_train_localize_eval_from_s3_match_a_local_folder(converted_s3, synthetic_converted,
                                                          tmp_path):
  local = str(tmp_path / 'converted')
  shutil.copytree(synthetic_converted[1], local)  # localize writes into the dataset
  # Train the tiny localizer from each; the losses are equal.
  workdirs = {}
  for name, root in (('local', local), ('s3', converted_s3)):
    workdirs[name] = str(tmp_path / f'loc_{name}')
    train_loop.train_and_evaluate(test_localize._localizer_config(root), workdirs[name],
                                  progress=False)
  assert _losses(workdirs['s3']) == _losses(workdirs['local']) and _losses(workdirs['s3'])
  # Localize both with one checkpoint (its path is in the records): byte-identical outputs.
  for root in (local, converted_s3):
    localize_lib.run(workdirs['s3'], root)
  remote, here = _bucket_files(converted_s3), _local_files(local)
  assert sorted(remote) == sorted(here)
  assert any(k.startswith('predicted_segmentations/') for k in remote)
  assert [k for k in remote if remote[k] != here[k]] == []
  # Eval: the same submission from either.
  c = test_localize.demo.get_config()
  c.data.root = converted_s3
  c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 1, 1
  c.optimizer.warmup_steps = 0
  cls = str(tmp_path / 'classifier')
  train_loop.train_and_evaluate(c, cls, progress=False)
  subs = {}
  for name, root in (('local', local), ('s3', converted_s3)):
    subs[name] = str(tmp_path / f'{name}.csv')
    summary = eval_lib.run(cls, root, 'latest', subs[name])
    assert summary['predicted_studies'] == 11
  assert open(subs['s3']).read() == open(subs['local']).read()


def _convert_cli(raw: str, output: str, **env) -> subprocess.CompletedProcess:
  environ = {**os.environ, **env}
  for k, v in env.items():
    if v is None:
      environ.pop(k)
  return subprocess.run([sys.executable, '-m', 'data_tools.convert', f'--input={raw}',
                         f'--output={output}', '--workers=1', '--noprogress'],
                        cwd=repo_root(), env=environ, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('output,env,message', [
    ('s3://no-such-bucket/x', {}, "bucket 'no-such-bucket' does not exist at http"),
    (f's3://{BUCKET}/nocreds', {'AWS_SECRET_ACCESS_KEY': None},
     'AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not'),
    (f's3://{BUCKET}/unreachable', {'AWS_ENDPOINT_URL': 'http://127.0.0.1:9'},
     'cannot reach the store at http://127.0.0.1:9 (AWS_ENDPOINT_URL)'),
])
def test_bad_bucket_credentials_or_endpoint_fail_clearly_and_write_nothing(
    s3, synthetic_converted, output, env, message):
  result = _convert_cli(synthetic_converted[0], output, **env)
  assert result.returncode == cli.USAGE, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, result.stderr
  assert 'Traceback' not in result.stderr
  if 'no-such-bucket' not in output:
    assert kvstore.list_folder(output) == []


def test_data_root_in_a_missing_bucket_names_the_key(s3, smoke_config):
  smoke_config.data.root = 's3://no-such-bucket/data'
  with pytest.raises(cli.UsageError, match=r"^config.data.root=s3://no-such-bucket/data: "
                     r"bucket 'no-such-bucket' does not exist"):
    train_loop.validate_config(smoke_config)


@pytest.mark.parametrize('workdir,why', [('s3://b/run', 'Orbax cannot write checkpoints to S3'),
                                         ('gs://b/run', 'appended to'),
                                         ('file:///tmp/run', 'give it as a path')])
def test_a_bucket_workdir_is_refused_at_start(smoke_config, tmp_path, workdir, why):
  with pytest.raises(cli.UsageError, match=f'--workdir={workdir}: must be a local folder'):
    train_loop.train_and_evaluate(smoke_config, workdir, progress=False)
  with pytest.raises(cli.UsageError, match=why):
    train_loop.check_workdir(workdir)


def test_urls_map_onto_the_drivers_options(monkeypatch):
  for k in ('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'AWS_REGION', 'AWS_DEFAULT_REGION',
            'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'):
    monkeypatch.delenv(k, raising=False)
  s = kvstore.spec('s3://bucket/a/b')
  assert (s['driver'], s['bucket'], s['path'], s['aws_credentials']) == (
      's3', 'bucket', 'a/b/', {'type': 'default'})
  assert 'endpoint' not in s and 'aws_region' not in s
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://minio:9000')
  monkeypatch.setenv('AWS_DEFAULT_REGION', 'eu-west-1')
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'k')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 's')
  s = kvstore.spec('s3://bucket')
  assert (s['endpoint'], s['aws_region'], s['aws_credentials'], s['path']) == (
      'http://minio:9000', 'eu-west-1', {'type': 'environment'}, '')
  monkeypatch.setenv('AWS_ENDPOINT_URL_S3', 'http://s3only:9000')  # the service-specific one wins
  monkeypatch.setenv('AWS_REGION', 'us-west-2')
  assert kvstore.spec('s3://bucket')['endpoint'] == 'http://s3only:9000'
  assert kvstore.spec('s3://bucket')['aws_region'] == 'us-west-2'
  g = kvstore.spec('gs://bucket/p/')
  assert (g['driver'], g['bucket'], g['path']) == ('gcs', 'bucket', 'p/')
  assert kvstore.normalize('file:///tmp/x/') == '/tmp/x' and kvstore.normalize('s3://b/p//') \
      == 's3://b/p'
  assert store.array_path('s3://b/p', 'volumes', '1.2') == 's3://b/p/volumes/1.2'
  with pytest.raises(cli.UsageError, match='no bucket name'):
    kvstore.normalize('s3:///x')


def test_beam_converts_into_a_bucket_as_the_pool_does(s3, synthetic_converted, tmp_path,
                                                      monkeypatch):
  from data_tools import beam_convert  # pylint: disable=import-outside-toplevel
  url = f's3://{BUCKET}/beam'
  temp = tmp_path / 'temp'  # the process's temp dir: the run leaves nothing there
  temp.mkdir()
  monkeypatch.setenv('TMPDIR', str(temp))
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  records = beam_convert.run(synthetic_converted[0], url, 'DirectRunner',
                             '--direct_running_mode=in_memory')
  assert len(records) == 11 and all(r['status'] == 'ok' for r in records)
  assert _bucket_files(url) == _local_files(synthetic_converted[1])  # (converted_s3: localized)
  assert os.listdir(temp) == []
