r"""Converts RSNA-style DICOM studies (and NIfTI vertebra masks) once into TensorStore volumes.

  python -m data_tools.convert --input=/data/rsna-2022-cervical-spine-fracture-detection \
      --output=/data/cspine_converted --workers=8

Writes the data contract of DESIGN.md section 1:
  OUT/manifest.jsonl          one JSON object per study (uid, split, status, warnings, geometry,
                              labels, vertebra and fracture boxes)
  OUT/volumes/<UID>/          zarr3 int16 HU, axes (z, y, x), z = 0 the most superior slice
  OUT/segmentations/<UID>/    zarr3 uint8 on the same grid, 1-7 = C1-C7, 0 elsewhere

INPUT is an RSNA root (train_images/, test_images/, segmentations/, train.csv,
train_bounding_boxes.csv; any may be missing) or a folder whose sub-folders are studies.
Studies run in parallel processes (spawned: TensorStore is never used across fork). Each study is
written under a temporary name and moved into place when complete; a rerun skips finished studies
and retries failed ones, so `kill -9` at any time loses nothing: workers die with the command (a
rerun waits for any that outlive it), and a second command on the same OUTPUT is refused. The
command exits non-zero, after converting everything it can, when any study failed; the manifest
says why.
"""
from __future__ import annotations

import concurrent.futures
import csv
import ctypes
import fcntl
import multiprocessing
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from tqdm import tqdm

from cspine_jax import constants
from cspine_jax.data import store
from data_tools import dicom
from data_tools import nifti

STATE_DIR = store.CONVERT_STATE  # one finished record per study; the manifest is rebuilt from them
FORMAT_VERSION = 1
# Locks, in STATE_DIR: the running command holds RUN_LOCK (one command per output folder); every
# worker holds WORKERS_LOCK shared while it lives.
RUN_LOCK = os.path.join(STATE_DIR, 'convert.lock')
WORKERS_LOCK = os.path.join(STATE_DIR, 'workers.lock')
_UID_RE = re.compile(r'^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$')


def is_valid_uid(uid: str) -> bool:
  """A DICOM UID: digits in dot-separated components without leading zeros, <= 64 chars."""
  return isinstance(uid, str) and len(uid) <= 64 and bool(_UID_RE.match(uid))


def _safe_label(name: str) -> str:
  """A printable stand-in for an invalid folder name (never used in a path)."""
  return ''.join(c if c.isalnum() or c in '._-' else '?' for c in name)[:80]


# ---------------------------------------------------------------------------------------------
# What to convert.
# ---------------------------------------------------------------------------------------------


def discover(root: str) -> list[dict]:
  """Study jobs: {uid, split, folder, segmentation} for every study folder under ``root``."""
  splits = [s for s in ('train', 'test') if os.path.isdir(os.path.join(root, f'{s}_images'))]
  folders = []
  if splits:
    for split in splits:
      base = os.path.join(root, f'{split}_images')
      folders += [(name, split, os.path.join(base, name)) for name in sorted(os.listdir(base))]
  else:
    folders = [(name, 'test', os.path.join(root, name)) for name in sorted(os.listdir(root))]
  seg_dir = os.path.join(root, store.INPUT_SEGMENTATIONS)
  jobs = []
  for name, split, folder in folders:
    if name.startswith('.') or not os.path.isdir(folder):
      continue
    seg = None
    for ext in ('.nii', '.nii.gz'):
      cand = os.path.join(seg_dir, name + ext)
      if is_valid_uid(name) and os.path.isfile(cand):
        seg = cand
    jobs.append({'uid': name, 'split': split, 'folder': folder, 'segmentation': seg})
  return jobs


def read_labels(root: str) -> dict[str, list[int]]:
  path = os.path.join(root, 'train.csv')
  if not os.path.isfile(path):
    return {}
  out = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      out[row['StudyInstanceUID']] = [int(float(row[t])) for t in constants.TARGETS]
  return out


def read_boxes(root: str) -> dict[str, list[dict]]:
  path = os.path.join(root, 'train_bounding_boxes.csv')
  if not os.path.isfile(path):
    return {}
  out: dict[str, list[dict]] = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      out.setdefault(row['StudyInstanceUID'], []).append(
          {k: float(row[k]) for k in ('x', 'y', 'width', 'height', 'slice_number')})
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
  uid = job['uid']
  record = {'uid': uid if is_valid_uid(uid) else _safe_label(uid), 'split': job['split'],
            'status': 'ok', 'warnings': [], 'labels': labels, 'format_version': FORMAT_VERSION}
  if not is_valid_uid(uid):
    record['status'] = 'error: the study folder name is not a valid DICOM StudyInstanceUID'
    return record
  try:
    series = dicom.read_series(job['folder'])
    warnings = record['warnings']
    warnings += series.warnings
    if series.study_uid_tag and series.study_uid_tag != uid:
      warnings.append('the StudyInstanceUID tag differs from the folder name (folder name used)')
    if labels is not None and labels[0] != max(labels[1:]):
      warnings.append('patient_overall is not the OR of C1-C7 in train.csv')
    geometry = {
        'shape': list(series.hu.shape),
        'spacing_mm': [round(v, 6) for v in series.spacing],
        'origin': [round(v, 6) for v in series.origin],
        'direction': [[round(v, 8) for v in row] for row in series.direction],
    }
    attrs = {**geometry, 'axes': ['z', 'y', 'x'], 'units': 'HU', 'uid': uid,
             'frame': 'LPS; direction rows are the z, y, x axes'}
    record.update(geometry)
    record.update({
        'source_slices': len(series.slice_files),
        'transfer_syntaxes': series.transfer_syntaxes,
        'hu_range': [int(series.hu.min()), int(series.hu.max())],
        'has_segmentation': False, 'vertebra_boxes': {},
        'fracture_boxes': _fracture_boxes(boxes, series.slice_files, warnings),
    })
    mask = None
    if job['segmentation']:
      seg_name = os.path.basename(job['segmentation'])
      try:
        data, affine = nifti.load(job['segmentation'])
        mask, coverage = nifti.to_grid(data, affine, series.voxel_to_lps(), series.hu.shape)
        if coverage < 0.5:
          warnings.append(f'{seg_name}: covers {coverage:.0%} of the volume; its geometry does '
                          'not match the series, segmentation dropped')
          mask = None
        elif coverage < 0.999:
          warnings.append(f'{seg_name}: covers only {coverage:.1%} of the volume (0 elsewhere)')
        if mask is not None:
          unknown = []
          if mask.min() < 0 or mask.max() > 19:  # cheap check first: np.unique sorts
            unknown = np.setdiff1d(np.unique(mask), np.arange(20))
          if len(unknown):
            warnings.append(f'{seg_name}: unexpected labels {unknown.tolist()[:5]} set to 0')
          mask = nifti.cervical_labels(mask)
      except Exception as e:  # pylint: disable=broad-except
        warnings.append(f'{seg_name}: unreadable NIfTI ({type(e).__name__}: {e}); ignored')
        mask = None

    for kind in (store.VOLUMES, store.SEGMENTATIONS):
      os.makedirs(os.path.join(out, kind), exist_ok=True)
    # Each array is written under a temporary name and placed whole; the volume goes last, so a
    # placed volume means the study's arrays are complete.
    if mask is not None:
      store.put_array(out, store.SEGMENTATIONS, uid, mask, {
          **attrs, 'units': 'label', 'labels': {'0': 'background', **{
              str(i + 1): v for i, v in enumerate(constants.VERTEBRAE)}}})
      record['has_segmentation'] = True
      record['vertebra_boxes'] = store.vertebra_boxes(mask)
    else:
      store.remove_array(out, store.SEGMENTATIONS, uid)  # a mask an earlier run kept
    store.put_array(out, store.VOLUMES, uid, series.hu, attrs)
  except dicom.StudyError as e:
    record = _failed(record, str(e))
  except Exception as e:  # pylint: disable=broad-except
    record = _failed(record, f'internal error ({type(e).__name__}: {e})')
  return record


def _failed(record: dict, message: str) -> dict:
  keep = ('uid', 'split', 'warnings', 'labels', 'format_version')
  return {**{k: record[k] for k in keep}, 'status': f'error: {message}'}


def _remove_outputs(out: str, uid: str) -> None:
  for kind in (store.VOLUMES, store.SEGMENTATIONS):
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
  _worker_lock = open(os.path.join(out, WORKERS_LOCK), 'a')  # pylint: disable=consider-using-with
  fcntl.flock(_worker_lock, fcntl.LOCK_SH)


def _lock_output(out: str):
  """Takes the output folder for this command; returns the open lock file (keep it open).

  Waits for workers left by a killed command to exit before anything is touched.
  """
  os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
  run_lock = open(os.path.join(out, RUN_LOCK), 'a')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    run_lock.close()
    raise RuntimeError(f'--output {out} is being written by another data_tools.convert '
                       f'(it holds {os.path.join(out, RUN_LOCK)}); wait for it to finish') from None
  with open(os.path.join(out, WORKERS_LOCK), 'a') as workers:
    fcntl.flock(workers, fcntl.LOCK_EX)  # blocks while a killed run's worker still lives
  return run_lock


def _worker(args):
  job, out, labels, boxes = args
  record = convert_study(job, out, labels, boxes)
  if is_valid_uid(job['uid']):  # an invalid name never becomes a path
    if record['status'] != 'ok':
      _remove_outputs(out, job['uid'])
    store.JobRecords(out, STATE_DIR).save(record)
  return record


def _done(out: str, record: dict | None) -> bool:
  if not record or record.get('status') != 'ok':
    return False
  uid = record['uid']
  need = [store.VOLUMES] + ([store.SEGMENTATIONS] if record.get('has_segmentation') else [])
  return all(store.array_exists(out, kind, uid) for kind in need)


def run(input_root: str, out: str, workers: int, progress: bool = True) -> list[dict]:
  """Converts every study of ``input_root`` not already done; returns all manifest records."""
  input_root, out = os.path.abspath(input_root), os.path.abspath(out)
  if not os.path.isdir(input_root):
    raise FileNotFoundError(f'--input {input_root} is not a folder')
  os.makedirs(out, exist_ok=True)
  run_lock = _lock_output(out)
  try:
    return _run_locked(input_root, out, workers, progress)
  finally:
    run_lock.close()


def _run_locked(input_root: str, out: str, workers: int, progress: bool) -> list[dict]:
  store.clean_temporaries(out, (store.VOLUMES, store.SEGMENTATIONS, STATE_DIR))
  jobs = discover(input_root)
  labels, boxes = read_labels(input_root), read_boxes(input_root)
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
  ctx = multiprocessing.get_context('spawn')
  pool_args = {'mp_context': ctx, 'initializer': _worker_init, 'initargs': (out, os.getpid())}
  with concurrent.futures.ProcessPoolExecutor(max(1, workers), **pool_args) as pool:
    futures = {pool.submit(_worker, a): a for a in args}
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
  flags.DEFINE_string('output', None, 'Converted dataset folder (created; reruns resume).')
  flags.DEFINE_integer('workers', 0, 'Parallel study conversions (0: all cores).')
  flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr.')


def main(argv):
  del argv
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError('--input and --output are required')
  if FLAGS.workers < 0:
    raise app.UsageError('--workers must be >= 0')
  workers = FLAGS.workers or os.cpu_count() or 1
  start = time.time()
  records = run(FLAGS.input, FLAGS.output, workers, FLAGS.progress)
  failed = [r for r in records if r['status'] != 'ok']
  ok = len(records) - len(failed)
  slices = sum(r.get('source_slices', 0) for r in records if r['status'] == 'ok')
  print(f'{ok} studies converted ({slices} slices), {len(failed)} failed, '
        f'{sum(len(r["warnings"]) for r in records)} warnings, in {time.time() - start:.1f} s '
        f'-> {store.manifest_path(FLAGS.output)}')
  for r in failed:
    print(f'FAILED {r["uid"]}: {r["status"][len("error: "):]}')
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
