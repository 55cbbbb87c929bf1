r"""Converts RSNA-style DICOM studies (and NIfTI vertebra masks) once into TensorStore volumes.

  python -m data_tools.convert --input=/data/rsna-2022-cervical-spine-fracture-detection \
      --output=/data/cspine_converted --workers=8

Writes the data contract of DESIGN.md section 1:
  OUT/manifest.jsonl          one JSON object per study (uid, split, status, warnings, geometry,
                              labels, vertebra and fracture boxes)
  OUT/volumes/<UID>/          zarr3 int16 HU, axes (z, y, x), z = 0 the most superior slice
  OUT/segmentations/<UID>/    zarr3 uint8 on the same grid, 1-7 = C1-C7, 0 elsewhere

INPUT is an RSNA root (train_images/, test_images/, segmentations/, train.csv,
train_bounding_boxes.csv; any may be missing) or a folder whose sub-folders are studies. Studies
run in parallel worker processes, spawned (never forked: whatever the calling process holds, e.g. a
TensorStore context, must not cross a fork) and kept warm: each converts study after study, and
imports neither TensorStore nor SciPy (arrays are written by store.ShardWriter), so it starts in a
fraction of a second. A worker decodes and writes a volume one slab of shards (64 slices) at a time
into one reused buffer: it never holds a whole volume. Each study is written under a temporary name
and moved into place when complete; a rerun skips finished studies and retries failed ones, so
`kill -9` at any time loses nothing: workers die with the command (a rerun waits for any that
outlive it), and a second command on the same OUTPUT is refused. The command exits 1, after
converting everything it can, when any study failed (the manifest says why), and 1 before writing
anything when INPUT holds no study folder or a malformed train.csv / train_bounding_boxes.csv (the
message names the file, line and column); 2 for a usage error (a missing or bad flag, an INPUT that
is not there). A study folder not named by a DICOM UID fails and is reported by its position
("study folder #3 of train_images/"), never by its name. With --runner=NAME (and --beam_options)
the same conversion runs as an Apache Beam pipeline instead (data_tools/beam_convert.py).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import math
import multiprocessing
import os
import sys
import time

from absl import flags
from absl import logging
import numpy as np
from tqdm import tqdm

from cspine_jax import cli
from cspine_jax import constants
from cspine_jax.data import kaggle
from cspine_jax.data import kvstore
from cspine_jax.data import levels
from cspine_jax.data import store
from data_tools import stages

STATE_DIR = store.CONVERT_STATE  # one finished record per study; the manifest is rebuilt from them
FORMAT_VERSION = 1
# Locks, in STATE_DIR: the running command holds RUN_LOCK (one command per output folder); every
# worker holds WORKERS_LOCK shared while it lives.
RUN_LOCK = os.path.join(STATE_DIR, 'convert.lock')
WORKERS_LOCK = os.path.join(STATE_DIR, 'workers.lock')
EXPECTED_LAYOUT = ('train_images/<StudyInstanceUID>/*.dcm and/or test_images/<StudyInstanceUID>/'
                   '*.dcm (the RSNA layout), or <StudyInstanceUID>/*.dcm folders directly in it')


def is_valid_uid(uid: str) -> bool:
  """A DICOM UID: digits in dot-separated components without leading zeros, <= 64 chars.

  The only study folder names the converter accepts (the RSNA layout names each study's folder
  by its StudyInstanceUID); anything else may be a patient's name and is never echoed.
  """
  return store.is_dicom_uid(uid)


class OutputBusy(cli.Failure, RuntimeError):
  """Another data_tools.convert holds --output's lock."""


# ---------------------------------------------------------------------------------------------
# What to convert.
# ---------------------------------------------------------------------------------------------


def discover(root: str) -> list[dict]:
  """Study jobs: {uid, split, folder, segmentation, refused} for every study folder of ``root``.

  A folder whose name is not a DICOM UID (e.g. "Smith John 1960") is a job too, so that it is
  counted and reported as failed, but under a stand-in uid naming its position only,
  "invalid-folder-<split>-<n>" (the n-th study folder of its parent in name order), and with
  ``refused`` saying why: the name itself may be a patient's and never reaches a path, the
  manifest or a log. Not a hash of the name either: a short hash of a name is found again by
  hashing a list of names.
  """
  def subfolders(path):
    if not os.path.isdir(path):
      return None
    return [n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))]

  return jobs_from_listing(root, subfolders, os.path.isfile)


def jobs_from_listing(root: str, subfolders, is_file) -> list[dict]:
  """`discover`'s rules over any listing, so that a local folder and a bucket
  (data_tools/beam_convert.py) give the same jobs: ``subfolders(path)`` names the folders in
  ``path`` (None when it is not a folder), ``is_file(path)`` says whether a file is there."""
  splits = [s for s in ('train', 'test') if subfolders(os.path.join(root, f'{s}_images'))
            is not None]
  bases = ([(s, os.path.join(root, f'{s}_images'), f'{s}_images/') for s in splits] if splits
           else [('test', root, '--input')])
  seg_dir = os.path.join(root, store.INPUT_SEGMENTATIONS)
  jobs = []
  for split, base, shown in bases:
    names = [n for n in sorted(subfolders(base) or [])
             if not n.startswith('.')
             and not (base == root and n == store.INPUT_SEGMENTATIONS)]  # the masks, not a study
    for position, name in enumerate(names, start=1):
      job = {'uid': name, 'split': split, 'folder': os.path.join(base, name),
             'segmentation': None, 'refused': None}
      if not is_valid_uid(name):
        job['uid'] = f'invalid-folder-{split}-{position}'
        job['refused'] = (f'study folder #{position} of {shown} (folders in name order) is not '
                          'named by a valid DICOM StudyInstanceUID; the name is not shown (it '
                          "may hold patient data): rename the folder to the study's UID")
      else:
        for ext in ('.nii', '.nii.gz'):
          cand = os.path.join(seg_dir, name + ext)
          if is_file(cand):
            job['segmentation'] = cand
      jobs.append(job)
  return jobs


def read_labels(root: str) -> dict[str, list[int]]:
  """{uid: 8 labels} of ROOT/train.csv; ValueError naming the file, line and column of a label
  that is not 0 or 1, or of a study listed twice (`kaggle.read_labels`, the metric's reader)."""
  path = os.path.join(root, 'train.csv')
  if not os.path.isfile(path):
    return {}
  # A uid that no study folder can have is skipped (and not echoed: it may be a name).
  return {uid: labels for _, uid, labels in kaggle.read_labels(path) if is_valid_uid(uid)}


def read_boxes(root: str) -> dict[str, list[dict]]:
  """{uid: [box]} of ROOT/train_bounding_boxes.csv; ValueError naming the file, line and column
  of a value that is not a finite number (slice_number: not a whole number)."""
  path = os.path.join(root, 'train_bounding_boxes.csv')
  if not os.path.isfile(path):
    return {}
  keys = ('x', 'y', 'width', 'height', 'slice_number')
  out: dict[str, list[dict]] = {}
  for line, row in kaggle.csv_rows(path, ('StudyInstanceUID',) + keys):
    box = {}
    for k in keys:
      try:
        box[k] = float(row[k])
      except (TypeError, ValueError):
        box[k] = math.nan
      if not math.isfinite(box[k]) or (k == 'slice_number' and not box[k].is_integer()):
        raise ValueError(f'{path}:{line}: column {k}: {kaggle.cell(row[k])} is not a '
                         f'{"slice number" if k == "slice_number" else "number"}')
    uid = (row['StudyInstanceUID'] or '').strip()
    if is_valid_uid(uid):
      out.setdefault(uid, []).append(box)
  return out


# ---------------------------------------------------------------------------------------------
# One study (runs in a worker process).
# ---------------------------------------------------------------------------------------------


def _fracture_boxes(rows, slice_files, warnings) -> list[dict]:
  """Maps RSNA boxes (slice_number = file name's InstanceNumber) to volume indices."""
  by_number = {}
  for z, name in enumerate(slice_files):
    stem = name.split('.')[0]
    if stem.isdigit():
      by_number[int(stem)] = z
  out, missing = [], 0
  for r in rows:
    z = by_number.get(int(r['slice_number']))
    if z is None:
      missing += 1
      continue
    out.append({'z': z, 'y0': int(r['y']), 'x0': int(r['x']),
                'y1': int(np.ceil(r['y'] + r['height'])), 'x1': int(np.ceil(r['x'] + r['width']))})
  if missing:
    warnings.append(f'{missing} bounding box(es) name slices not in the series')
  out.sort(key=lambda b: (b['z'], b['y0'], b['x0']))
  return out


def convert_study(job: dict, out: str, labels: list[int] | None, boxes: list[dict]) -> dict:
  """Converts one study; returns its manifest record (status "ok" or the error)."""
  uid = job['uid']  # a DICOM UID, or discover's stand-in for a refused folder name
  record = {'uid': uid, 'split': job['split'], 'status': 'ok', 'warnings': [], 'labels': labels,
            'format_version': FORMAT_VERSION}
  if job.get('refused') or not is_valid_uid(uid):
    record['status'] = 'error: ' + (job.get('refused') or 'the study folder name is not a valid '
                                    'DICOM StudyInstanceUID')
    return record
  # Deferred: only workers read DICOM; the command's own process starts its workers sooner.
  from data_tools import dicom  # pylint: disable=import-outside-toplevel
  scan, warnings = None, []  # warnings: the study's own, after the reader's
  try:
    scan = dicom.scan_series(job['folder'])
    if scan.study_uid_tag and scan.study_uid_tag != uid:
      warnings.append('the StudyInstanceUID tag differs from the folder name (folder name used)')
    if labels is not None and labels[0] != max(labels[1:]):
      warnings.append('patient_overall is not the OR of C1-C7 in train.csv')
    geometry = {
        'shape': list(scan.shape),
        'spacing_mm': [round(v, 6) for v in scan.spacing],
        'origin': [round(v, 6) for v in scan.origin],
        'direction': [[round(v, 8) for v in row] for row in scan.direction],
    }
    attrs = {**geometry, 'axes': ['z', 'y', 'x'], 'units': 'HU', 'uid': uid,
             'frame': 'LPS; direction rows are the z, y, x axes'}
    done = dict(record, **geometry, source_slices=len(scan.slice_files),
                transfer_syntaxes=scan.transfer_syntaxes, has_segmentation=False,
                vertebra_boxes={}, fracture_boxes=_fracture_boxes(boxes, scan.slice_files,
                                                                  warnings))
    mask, labelled = None, []
    if job['segmentation']:
      with stages.stage('mask alignment'):
        mask = _aligned_mask(job['segmentation'], scan, warnings)

    store.make_folders(out, (store.VOLUMES, store.SEGMENTATIONS))
    # Each array is written under a temporary name and placed whole; the volume goes last, so a
    # placed volume means the study's arrays are complete.
    if mask is not None:
      with stages.stage('zarr3 encode and write'):
        store.put_array(out, store.SEGMENTATIONS, uid, mask, {
            **attrs, 'units': 'label', 'labels': {'0': 'background', **{
                str(i + 1): v for i, v in enumerate(constants.VERTEBRAE)}}})
      with stages.stage('mask alignment'):
        done['vertebra_boxes'] = store.vertebra_boxes(mask)
      with stages.stage('derived levels'):
        labelled = levels.write_labels(out, uid, mask, scan.spacing, attrs)
      done['has_segmentation'] = True
      del mask
    else:
      for kind in (store.SEGMENTATIONS, *store.LABEL_LEVELS):
        store.remove_array(out, kind, uid)  # a mask an earlier run kept
    done['hu_range'], done['levels'] = _write_volume(scan, out, uid, attrs)
    done['levels'] += labelled
    # The reader's warnings (its decoding's last) before the study's, as the manifest had them.
    done['warnings'] = scan.warnings + warnings
    record = done
  except Exception as e:  # pylint: disable=broad-except
    # A study that fails after its headers were read keeps what was said of it until then.
    record['warnings'] = (scan.warnings if scan is not None else []) + warnings
    why = str(e) if isinstance(e, dicom.StudyError) else f'internal error ({type(e).__name__}: {e})'
    record = _failed(record, why)
  return record


def _write_volume(scan: dicom.Scan, out: str, uid: str, attrs: dict
                  ) -> tuple[list[int], list[str]]:
  """Decodes the volume one slab (a row of shards, 64 slices) at a time into one reused buffer
  and writes each as it is done: a worker never holds the whole volume. The derived levels
  (cspine_jax/data/levels.py) are built from the same slabs and placed before the volume, which
  goes last. Returns its HU range and the levels' kinds."""
  derived = levels.VolumeLevels(scan.shape, scan.spacing)
  with store.new_array(out, store.VOLUMES, uid, scan.shape, np.int16, attrs) as volume:
    slab = np.empty((volume.slab_depth,) + scan.shape[1:], np.int16)
    lo, hi = [], []
    for z in range(0, scan.shape[0], volume.slab_depth):
      part = slab[:min(volume.slab_depth, scan.shape[0] - z)]
      low, high = scan.decode(z, part)
      lo.append(low)
      hi.append(high)
      with stages.stage('zarr3 encode and write'):
        volume.write(z, part)
      with stages.stage('derived levels'):
        derived.add(part)
    with stages.stage('derived levels'):
      kinds = levels.write_built(out, uid, derived.finish(), attrs)
  return [min(lo), max(hi)], kinds


def _aligned_mask(path: str, scan: dicom.Scan, warnings: list[str]) -> np.ndarray | None:
  """The NIfTI mask at ``path`` on the series' grid as C1-C7 labels, or None (with a warning)
  when it is unreadable or does not cover the volume."""
  from data_tools import nifti  # deferred: nibabel is needed by the studies with a mask only
  seg_name = os.path.basename(path)
  try:
    data, affine = nifti.load(path)
    mask, coverage = nifti.to_grid(data, affine, scan.voxel_to_lps(), scan.shape)
    del data  # a memory map of the file: unmapped, so that the peak holds one mask
    if coverage < 0.5:
      warnings.append(f'{seg_name}: covers {coverage:.0%} of the volume; its geometry does '
                      'not match the series, segmentation dropped')
      return None
    if coverage < 0.999:
      warnings.append(f'{seg_name}: covers only {coverage:.1%} of the volume (0 elsewhere)')
    unknown = []
    if mask.min() < 0 or mask.max() > 19:  # cheap check first: np.unique sorts
      unknown = np.setdiff1d(np.unique(mask), np.arange(20))
    if len(unknown):
      warnings.append(f'{seg_name}: unexpected labels {unknown.tolist()[:5]} set to 0')
    return nifti.cervical_labels(mask, out=mask if mask.dtype == np.uint8 else None)
  except Exception as e:  # pylint: disable=broad-except
    warnings.append(f'{seg_name}: unreadable NIfTI ({type(e).__name__}: {e}); ignored')
    return None


def _failed(record: dict, message: str) -> dict:
  keep = ('uid', 'split', 'warnings', 'labels', 'format_version')
  return {**{k: record[k] for k in keep}, 'status': f'error: {message}'}


def _remove_outputs(out: str, uid: str) -> None:
  for kind in (store.VOLUMES, store.SEGMENTATIONS, *store.LEVELS):
    store.remove_array(out, kind, uid)


_worker_lock = None  # the worker's open WORKERS_LOCK: held until the process exits


def _worker_init(out: str, parent: int) -> None:
  """Ties a worker's life to the command's and marks it alive for the next run.

  Without this a `kill -9` of the command leaves its worker converting studies; a rerun then
  writes the same studies at the same time and each removes the other's temporaries.
  """
  global _worker_lock
  if sys.platform.startswith('linux'):
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, 9)  # SIGKILL when the parent dies
  if os.getppid() != parent:  # the parent died before the line above took effect
    os._exit(1)  # pylint: disable=protected-access
  if kvstore.is_url(out):
    return
  _worker_lock = open(os.path.join(out, WORKERS_LOCK), 'a')  # pylint: disable=consider-using-with
  fcntl.flock(_worker_lock, fcntl.LOCK_SH)


def _lock_output(out: str):
  """Takes the output folder for this command; returns the open lock file (keep it open).

  Waits for workers left by a killed command to exit before anything is touched. A bucket has
  no locks (store.try_lock): one command per output there is the user's to keep.
  """
  if kvstore.is_url(out):
    return store.try_lock(out)
  run_lock = store.try_lock(os.path.join(out, RUN_LOCK))
  if run_lock is None:
    raise OutputBusy(f'--output {out} is being written by another data_tools.convert '
                     f'(it holds {os.path.join(out, RUN_LOCK)}); wait for it to finish')
  with open(os.path.join(out, WORKERS_LOCK), 'a') as workers:
    fcntl.flock(workers, fcntl.LOCK_EX)  # blocks while a killed run's worker still lives
  return run_lock


def _worker(args):
  job, out, labels, boxes = args
  record = convert_study(job, out, labels, boxes)
  with stages.stage('manifest and bookkeeping'):
    if is_valid_uid(job['uid']):  # an invalid name never becomes a path
      if record['status'] != 'ok':
        _remove_outputs(out, job['uid'])
      store.JobRecords(out, STATE_DIR).save(record)
  return record


def _done(out: str, record: dict | None) -> bool:
  if not record or record.get('status') != 'ok':
    return False
  uid = record['uid']
  need = ([store.VOLUMES] + ([store.SEGMENTATIONS] if record.get('has_segmentation') else [])
          + list(record.get('levels', [])))
  return all(store.array_exists(out, kind, uid) for kind in need)


def run(input_root: str, out: str, workers: int, progress: bool = True) -> list[dict]:
  """Converts every study of ``input_root`` not already done; returns all manifest records.

  Raises, before anything is written: cli.UsageError when --input is not a folder or --output
  not one; cli.Failure when no study folder is found; ValueError naming the line of a malformed
  train.csv or train_bounding_boxes.csv.
  """
  input_root, out = os.path.abspath(input_root), store.normalize_root(out)
  if not os.path.isdir(input_root):
    what = 'does not exist' if not os.path.exists(input_root) else 'is not a folder'
    raise cli.UsageError(f'--input {input_root} {what}')
  if not kvstore.is_url(out) and os.path.exists(out) and not os.path.isdir(out):
    raise cli.UsageError(f'--output {out} is a file, not a folder')
  jobs = discover(input_root)
  if not jobs:
    # Converting nothing "successfully" hides a wrong --input (a parent folder, a typo'd split).
    raise cli.Failure(f'no study folder found under --input {input_root}: expected '
                      f'{EXPECTED_LAYOUT}')
  labels, boxes = read_labels(input_root), read_boxes(input_root)
  if kvstore.is_url(out):
    kvstore.check(out, write=True)  # a wrong bucket, endpoint or key: said now, nothing written
  else:
    os.makedirs(out, exist_ok=True)
  run_lock = _lock_output(out)
  try:
    return _run_locked(jobs, labels, boxes, out, workers, progress)
  finally:
    run_lock.close()


def _run_locked(jobs: list[dict], labels: dict, boxes: dict, out: str, workers: int,
                progress: bool) -> list[dict]:
  store.clean_temporaries(out, (store.VOLUMES, store.SEGMENTATIONS, *store.LEVELS, STATE_DIR))
  job_records = store.JobRecords(out, STATE_DIR)
  records, todo = {}, []
  for job in jobs:
    state = job_records.load(job['uid']) if is_valid_uid(job['uid']) else None
    if _done(out, state):
      records[job['uid']] = state
    else:
      todo.append(job)
  logging.info('%d studies: %d already converted, %d to do', len(jobs), len(records), len(todo))
  args = [(j, out, labels.get(j['uid']), boxes.get(j['uid'], [])) for j in todo]
  bar = None
  if progress:
    bar = tqdm(total=len(args), unit='study', desc='convert', file=sys.stderr)
  last_manifest = time.monotonic()

  def finish(record):
    nonlocal last_manifest
    records[record['uid']] = record
    if bar:
      bar.update(1)
    if time.monotonic() - last_manifest > 30:  # a killed run still leaves a useful manifest
      store.write_manifest(out, list(records.values()))
      last_manifest = time.monotonic()

  crashed = []
  pool_args = {'mp_context': multiprocessing.get_context('spawn'), 'initializer': _worker_init,
               'initargs': (out, os.getpid())}
  # No more workers than studies: each costs a process start and its imports.
  with concurrent.futures.ProcessPoolExecutor(max(1, min(workers, len(args))), **pool_args) as pool:
    futures = {pool.submit(_worker, a): a for a in args}  # the workers start here
    for fut in concurrent.futures.as_completed(futures):
      try:
        finish(fut.result())
      except concurrent.futures.process.BrokenProcessPool:
        crashed.append(futures[fut])
  # A dead worker (a decoder crash, the OOM killer) breaks the whole pool: redo the unfinished
  # studies one process each, so only the study that crashes is recorded as failed.
  for a in crashed:
    with concurrent.futures.ProcessPoolExecutor(1, **pool_args) as pool:
      try:
        finish(pool.submit(_worker, a).result())
      except concurrent.futures.process.BrokenProcessPool:
        job = a[0]
        record = {'uid': job['uid'], 'split': job['split'], 'warnings': [], 'labels': a[2],
                  'format_version': FORMAT_VERSION,
                  'status': 'error: the conversion process crashed on this study'}
        if is_valid_uid(job['uid']):
          job_records.save(record)
        finish(record)
  if bar:
    bar.close()
  result = [records[j['uid']] for j in jobs if j['uid'] in records]
  store.write_manifest(out, result)
  return result


FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program: modules stay importable)."""
  flags.DEFINE_string('input', None, 'RSNA root (train_images/, segmentations/, train.csv, ...) '
                      'or a folder of study folders.')
  flags.DEFINE_string('output', None, 'Converted dataset: a folder (created; reruns resume) or '
                      'a bucket URL, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (README "Converted '
                      'data in a bucket").')
  flags.DEFINE_integer('workers', 0, 'Parallel study conversions (0: all cores).')
  flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr.')
  flags.DEFINE_string('runner', None, 'Convert on this Apache Beam runner instead of the local '
                      'process pool: DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, '
                      'PortableRunner, ... (data_tools/beam_convert.py; needs the "beam" extra).')
  flags.DEFINE_string('beam_options', '', 'With --runner: further Beam pipeline options, one '
                      'shell-quoted string, e.g. --beam_options="--direct_running_mode='
                      'multi_processing --direct_num_workers=8".')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]} (flags are --name=value)')
  if not FLAGS.input or not FLAGS.output:
    raise cli.UsageError('--input and --output are required')
  if FLAGS.workers < 0:
    raise cli.UsageError(f'--workers={FLAGS.workers}: must be >= 0 (0: all cores)')
  if FLAGS.beam_options and not FLAGS.runner:
    raise cli.UsageError('--beam_options needs --runner')
  if FLAGS.runner and FLAGS['workers'].present:
    raise cli.UsageError('--workers sizes the process pool; with --runner the runner has its own '
                         'options (e.g. --beam_options="--direct_num_workers=8")')
  workers = FLAGS.workers or os.cpu_count() or 1
  start = time.time()
  if FLAGS.runner:
    try:
      from data_tools import beam_convert  # deferred: only this path imports Apache Beam
    except ImportError as e:
      raise cli.UsageError(f'--runner needs Apache Beam ({e}): pip install ".[beam]"') from None
    records = beam_convert.run(FLAGS.input, FLAGS.output, FLAGS.runner, FLAGS.beam_options)
  else:
    records = run(FLAGS.input, FLAGS.output, workers, FLAGS.progress)
  failed = [r for r in records if r['status'] != 'ok']
  ok = len(records) - len(failed)
  slices = sum(r.get('source_slices', 0) for r in records if r['status'] == 'ok')
  print(f'{ok} studies converted ({slices} slices), {len(failed)} failed, '
        f'{sum(len(r["warnings"]) for r in records)} warnings, in {time.time() - start:.1f} s '
        f'-> {store.manifest_path(FLAGS.output)}')
  for r in failed:
    print(f'FAILED {r["uid"]}: {r["status"][len("error: "):]}', flush=True)
  if failed:
    # The command's last line, as cli.run ends any failure: what went wrong and where to look.
    print(f'error: {len(failed)} of {len(records)} studies failed (FAILED lines above; the '
          f'reasons are also in {store.manifest_path(FLAGS.output)})', file=sys.stderr)
    sys.exit(cli.FAILURE)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
