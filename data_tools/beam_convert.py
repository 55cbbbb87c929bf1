r"""data_tools.convert's per-study conversion as one Apache Beam transform.

  python -m data_tools.convert --input=/data/rsna --output=/data/cspine_converted \
      --runner=DirectRunner \
      --beam_options="--direct_running_mode=multi_processing --direct_num_workers=8"

  python -m data_tools.convert --input=gs://BUCKET/rsna --output=OUT --runner=DataflowRunner \
      --beam_options="--project=P --region=R --temp_location=gs://BUCKET/tmp \
                      --extra_package=dist/cspine_jax-0.1.0-py3-none-any.whl"

`--runner` names any Beam runner; `--beam_options` is one shell-quoted string of further Beam
pipeline options (absl, which parses the command's own flags, refuses flags it does not know, so
Beam's cannot simply follow). The README's "Converting on Apache Beam" has the Dataflow, Flink and
Spark commands. Without `--runner` the command converts in its local process pool, which never
imports Beam; neither does anything else of the package.

The output is the one the pool writes, file for file and byte for byte (tests/test_beam_convert.py):
each study runs `convert._worker` itself (its arrays, then its .state record, its outputs removed
when it fails). The driver (this process) does what the pool's parent does around it:

  1. lists INPUT through Beam's filesystems (a local folder, gs://, s3://, ...) and finds the
     studies by `convert.discover`'s rules (`convert.jobs_from_listing`); reads train.csv and
     train_bounding_boxes.csv with `convert.read_labels` / `read_boxes`;
  2. skips the studies a record says are done (resumable), and records the refused folder names
     (`invalid-folder-<split>-<n>`) itself: they fail before reading anything;
  3. runs the pipeline  Create(studies) | Reshuffle | ParDo(ConvertStudy)  and waits for it;
  4. reads every study's record back and writes the manifest.

A worker reads a local INPUT in place; from a bucket it first copies one study (its files and its
mask) to a local temporary folder, since the DICOM reader and nibabel read local files. A study that
fails, for any reason short of its worker dying, is recorded as failed and the pipeline goes on; a
rerun retries it. A worker that dies (a decoder crash, the OOM killer) makes the runner retry or
fail the pipeline: rerun the command to go on, the studies already done are kept.

With a local OUTPUT the command takes the same locks as the pool (one command per folder, either
kind), and a worker on the command's machine holds the workers' lock while it converts a study and
starts none once the command is gone: after a `kill -9` of the command a rerun waits for its
worker processes (the DirectRunner's exit within ~2 s, when their connection to the command
closes) and none writes beside it. With an OUTPUT URL the runner's workers are elsewhere: run one
command per OUTPUT.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import shlex
import shutil
import socket
import tempfile

from absl import logging
import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from cspine_jax import cli
from cspine_jax.data import kvstore
from cspine_jax.data import store
from data_tools import convert

TABLES = ('train.csv', 'train_bounding_boxes.csv')


def is_local(path: str) -> bool:
  """A path of this machine's file system (no scheme such as gs:// or s3://)."""
  return FileSystems.get_scheme(path) is None


def pipeline_options(runner: str, beam_options: str = '') -> PipelineOptions:
  """Beam's options from --runner and the --beam_options string; cli.UsageError if malformed.

  Options Beam does not know are left to it: it warns and drops them, or a portable runner hands
  them on to its job server (Flink's and Spark's own options)."""
  try:
    args = shlex.split(beam_options)
  except ValueError as e:
    raise cli.UsageError(f'--beam_options: {e}') from None
  if any(a == '--runner' or a.startswith('--runner=') for a in args):
    raise cli.UsageError('--beam_options must not name the runner: give it with --runner')
  return PipelineOptions([f'--runner={runner}'] + args)


# ---------------------------------------------------------------------------------------------
# The driver: what to convert, the pipeline, the manifest.
# ---------------------------------------------------------------------------------------------


def run(input_root: str, out: str, runner: str, beam_options: str = '') -> list[dict]:
  """`convert.run` on a Beam runner: converts every study not already done; returns all manifest
  records, in the pool's order. Raises as `convert.run` does before anything is written."""
  options = pipeline_options(runner, beam_options)
  FileSystems.set_options(options)  # e.g. S3 credentials and endpoint, for the listing here
  input_root = _check_input(input_root)
  out = _check_output(out)
  jobs, labels, boxes = plan(input_root)
  if not jobs:
    raise cli.Failure(f'no study folder found under --input {input_root}: expected '
                      f'{convert.EXPECTED_LAYOUT}')
  if kvstore.is_url(out):
    return _convert_all(jobs, labels, boxes, input_root, out, options)
  os.makedirs(out, exist_ok=True)
  run_lock = convert._lock_output(out)  # pylint: disable=protected-access
  try:
    # As the pool: only a command holding the lock may remove a killed run's temporaries.
    store.clean_temporaries(out, (store.VOLUMES, store.SEGMENTATIONS, *store.LEVELS,
                                  convert.STATE_DIR))
    return _convert_all(jobs, labels, boxes, input_root, out, options)
  finally:
    run_lock.close()


def _check_input(root: str) -> str:
  if not is_local(root):
    return root.rstrip('/')
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    what = 'does not exist' if not os.path.exists(root) else 'is not a folder'
    raise cli.UsageError(f'--input {root} {what}')
  return root


def _check_output(out: str) -> str:
  out = store.normalize_root(out)
  if kvstore.is_url(out):
    kvstore.check(out, write=True)  # as the pool: a bad bucket is said now, nothing written
    return out
  if os.path.exists(out) and not os.path.isdir(out):
    raise cli.UsageError(f'--output {out} is a file, not a folder')
  return out


def plan(root: str) -> tuple[list[dict], dict, dict]:
  """(jobs, labels, boxes) of INPUT ``root``, as `convert.run` finds them.

  A local folder is read by the pool's own functions (the same listing, symbolic links and empty
  folders included); a bucket through one listing of everything under ``root``, its folders being
  the prefixes of its objects (so an empty folder, which a bucket cannot hold, is no study)."""
  if is_local(root):
    return convert.discover(root), convert.read_labels(root), convert.read_boxes(root)
  subfolders, is_file = _listing(root)
  jobs = convert.jobs_from_listing(root, subfolders, is_file)
  labels, boxes = _read_tables(root, is_file)
  return jobs, labels, boxes


def _listing(root: str):
  """(subfolders, is_file) of `convert.jobs_from_listing` over every object under ``root``."""
  folders: dict[str, set[str]] = {}
  files = set()
  for meta in FileSystems.match([FileSystems.join(root, '**')])[0].metadata_list:
    if meta.path.endswith('/') or not meta.path.startswith(root + '/'):
      continue  # an empty "folder" object, which some bucket consoles create: no file
    files.add(meta.path)
    parts = meta.path[len(root) + 1:].split('/')
    for depth in range(len(parts) - 1):
      folders.setdefault(os.path.join(root, *parts[:depth]), set()).add(parts[depth])
  return (lambda path: None if path not in folders else sorted(folders[path])), files.__contains__


def _read_tables(root: str, is_file) -> tuple[dict, dict]:
  """`convert.read_labels` / `read_boxes` of a bucket's CSVs, through local copies (the Kaggle
  reader takes a path); an error names the file in the bucket, not the copy."""
  with tempfile.TemporaryDirectory(prefix='cspine-tables-') as tmp:
    for name in TABLES:
      if is_file(os.path.join(root, name)):
        _copy(os.path.join(root, name), os.path.join(tmp, name))
    try:
      return convert.read_labels(tmp), convert.read_boxes(tmp)
    except ValueError as e:
      raise ValueError(str(e).replace(tmp, root)) from None


def _convert_all(jobs: list[dict], labels: dict, boxes: dict, input_root: str, out: str,
                 options: PipelineOptions) -> list[dict]:
  job_records = store.JobRecords(out, convert.STATE_DIR)
  records, todo = {}, []
  for job in jobs:
    uid = job['uid']
    if job['refused']:
      # Fails at once, reading and writing nothing (no record either: the name is no path), as in
      # the pool's worker: no need to send it to a Beam worker.
      records[uid] = convert.convert_study(job, out, labels.get(uid), boxes.get(uid, []))
    else:
      state = job_records.load(uid)
      if convert._done(out, state):  # pylint: disable=protected-access
        records[uid] = state
      else:
        todo.append(job)
  refused = sum(1 for j in jobs if j['refused'])
  logging.info('%d studies: %d already converted, %d to do', len(jobs),
               len(records) - refused, len(todo) + refused)
  if todo:
    elements = [(j, labels.get(j['uid']), boxes.get(j['uid'], [])) for j in todo]
    _run_pipeline(options, elements, ConvertStudy(out, not is_local(input_root), _driver(out)))
    for job in todo:
      # Every study the pipeline was given saved its record (a failure too) before the pipeline
      # could finish: its outcome is read back here, whichever machine converted it.
      records[job['uid']] = job_records.load(job['uid']) or _lost(job, labels)
  result = [records[j['uid']] for j in jobs if j['uid'] in records]
  store.write_manifest(out, result)
  return result


@contextlib.contextmanager
def _own_temp_folder():
  """Points this process's and its workers' temporary files into a folder removed afterwards.

  Each DirectRunner run leaves folders in the temp dir (beam-temp*, tmp*, beam-requirements-cache:
  four per run, measured), so every conversion and test run would litter /tmp.
  """
  old_env, old_tempdir = os.environ.get('TMPDIR'), tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix='cspine-beam-') as folder:
    os.environ['TMPDIR'] = tempfile.tempdir = folder
    try:
      yield
    finally:
      tempfile.tempdir = old_tempdir
      if old_env is None:
        os.environ.pop('TMPDIR', None)
      else:
        os.environ['TMPDIR'] = old_env


def _run_pipeline(options: PipelineOptions, elements: list, convert_fn: beam.DoFn) -> None:
  pipeline = beam.Pipeline(options=options)
  _ = (pipeline
       | 'Studies' >> beam.Create(elements, reshuffle=False)
       # Without it the runner fuses Create with the conversion: one worker converts everything.
       | 'Spread' >> beam.Reshuffle()
       | 'Convert' >> beam.ParDo(convert_fn))
  try:
    with _own_temp_folder():
      state = pipeline.run().wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except
    raise cli.Failure(f'the Beam pipeline failed ({type(e).__name__}: {e}); rerun the command to '
                      'go on: the studies already converted are kept') from e
  if state != PipelineState.DONE:
    raise cli.Failure(f'the Beam pipeline ended {state}; rerun the command to go on: the studies '
                      'already converted are kept')


def _lost(job: dict, labels: dict) -> dict:
  """The record of a study whose record cannot be read back after the pipeline (not saved)."""
  return {'uid': job['uid'], 'split': job['split'], 'warnings': [],
          'labels': labels.get(job['uid']), 'format_version': convert.FORMAT_VERSION,
          'status': 'error: the Beam pipeline finished without recording this study'}


# ---------------------------------------------------------------------------------------------
# A worker: one study.
# ---------------------------------------------------------------------------------------------


class ConvertStudy(beam.DoFn):
  """(job, labels, boxes) -> the study's manifest record, saved in OUTPUT/.state/ as the pool's
  worker saves it."""

  def __init__(self, out: str, copy_input: bool, driver: tuple | None):
    super().__init__()
    self.out, self.copy_input, self.driver = out, copy_input, driver
    self.ok = beam.metrics.Metrics.counter('convert', 'studies_ok')
    self.failed = beam.metrics.Metrics.counter('convert', 'studies_failed')
    self.slices = beam.metrics.Metrics.counter('convert', 'slices')

  def process(self, element):
    job, labels, boxes = element
    with _while_driver_lives(self.out, self.driver):
      record = convert_one(job, self.out, labels, boxes, self.copy_input)
    if record['status'] == 'ok':
      self.ok.inc()
      self.slices.inc(record['source_slices'])
    else:
      self.failed.inc()
    yield record


def convert_one(job: dict, out: str, labels, boxes, copy_input: bool) -> dict:
  """`convert._worker` on one study (a local copy of it when ``copy_input``). Anything it raises
  is recorded as the study's failure, so that one study never fails the pipeline; only a record
  that cannot be saved (OUTPUT unwritable) raises."""
  worker = convert._worker  # pylint: disable=protected-access  (the pool's: the same files)
  try:
    if not copy_input:
      return worker((job, out, labels, boxes))
    with tempfile.TemporaryDirectory(prefix='cspine-study-') as tmp:
      return worker((_fetch(job, tmp), out, labels, boxes))
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('study %s', job['uid'])
    record = convert._failed(  # pylint: disable=protected-access
        {'uid': job['uid'], 'split': job['split'], 'warnings': [], 'labels': labels,
         'format_version': convert.FORMAT_VERSION},
        f'internal error in the Beam worker ({type(e).__name__}: {e})')
    if convert.is_valid_uid(job['uid']):
      convert._remove_outputs(out, job['uid'])  # pylint: disable=protected-access
      store.JobRecords(out, convert.STATE_DIR).save(record)
    return record


FETCH_THREADS = 16  # a study's files copied at once: a bucket's latency, not bandwidth, bounds one


def _fetch(job: dict, tmp: str) -> dict:
  """Copies the study's files (those directly in its folder, as the reader lists them) and its
  mask (under its own name, which warnings quote) into ``tmp``; returns the job pointing there."""
  folder = os.path.join(tmp, job['uid'])
  os.makedirs(folder)
  pairs = [(m.path, os.path.join(folder, m.path.rsplit('/', 1)[-1]))
           for m in FileSystems.match([FileSystems.join(job['folder'], '*')])[0].metadata_list
           if not m.path.endswith('/')]
  local = dict(job, folder=folder)
  if job['segmentation']:
    local['segmentation'] = os.path.join(tmp, job['segmentation'].rsplit('/', 1)[-1])
    pairs.append((job['segmentation'], local['segmentation']))
  _client(job['folder'])  # made once, before the threads share it
  with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
    list(pool.map(lambda pair: _copy(*pair), pairs))  # list(): re-raises a failed copy
  return local


def _copy(src: str, dst: str) -> None:
  client = _client(src)
  with (client.open(src, 'rb', read_buffer_size=1 << 20) if client else
        # UNCOMPRESSED: FileSystems' default would gunzip a .nii.gz on the way.
        FileSystems.open(src, compression_type=CompressionTypes.UNCOMPRESSED)) as f, \
       open(dst, 'wb') as g:
    shutil.copyfileobj(f, g, 1 << 20)


_CLIENTS: dict = {}  # scheme -> object-store client or None, one per process


def _client(path: str):
  """The process's one S3 or GCS client for ``path``, or None: FileSystems reads it.

  FileSystems.open builds a new client at every call, ~0.13 s of CPU for S3 (botocore loads its
  service model again), more than the decoding of the slice it reads."""
  scheme = FileSystems.get_scheme(path)
  if scheme not in _CLIENTS:
    # The options the worker was started with (FileSystems keeps them, privately): credentials,
    # region, endpoint.
    options = FileSystems._pipeline_options  # pylint: disable=protected-access
    if scheme == 's3':
      from apache_beam.io.aws import s3io  # pylint: disable=import-outside-toplevel
      _CLIENTS[scheme] = s3io.S3IO(options=options)
    elif scheme == 'gs':
      from apache_beam.io.gcp import gcsio  # pylint: disable=import-outside-toplevel
      _CLIENTS[scheme] = gcsio.GcsIO(pipeline_options=options)
    else:
      _CLIENTS[scheme] = None
  return _CLIENTS[scheme]


# ---------------------------------------------------------------------------------------------
# kill -9 of the command: the pool's guarantee, for the workers on the command's machine.
# ---------------------------------------------------------------------------------------------


def _driver(out: str) -> tuple | None:
  """(host, pid, start time) of this command when OUTPUT is local, else None (nothing to guard:
  the locks are files of this machine)."""
  if kvstore.is_url(out):
    return None
  return socket.gethostname(), os.getpid(), _start_time(os.getpid())


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (tells a reused pid apart); None where
  /proc has no such process (or no /proc)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


@contextlib.contextmanager
def _while_driver_lives(out: str, driver: tuple | None):
  """Holds OUTPUT's workers' lock (shared) while a study is converted, as the pool's workers do,
  and refuses to start one once the command that started the pipeline is gone.

  A runner's worker processes can outlive a `kill -9` of the command (the DirectRunner's run under
  a shell, out of reach of a parent-death signal; they exit when their connection to the command
  closes, ~2 s later, but nothing promises it), possibly with studies still in hand: a rerun would
  write the same studies at the same time. With this, the rerun waits (convert._lock_output) for
  the study in hand, and an orphan starts no other. Only on the command's machine: the locks are
  files of it (OUTPUT is local there; the pool's lock files, not arrays)."""
  if driver is None or driver[0] != socket.gethostname():
    yield
    return
  with open(os.path.join(out, convert.WORKERS_LOCK), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_SH)
    _, pid, started = driver
    if _start_time(pid) != started:
      raise RuntimeError('the data_tools.convert command that started this pipeline is gone: '
                         'converting nothing more')
    yield
