"""What `python -m cspine_jax.predict` does, as functions: one study (a DICOM series or a converted
volume) through the localizer and the classifier, loaded once (`Predictor`), its outputs written
whole (`write_study`), and batches of studies (`run_batch`: resumable, failures recorded).

The command, its flags and its policies (null probabilities, not-assessable studies, batch
layout, identifiers) are documented in `cspine_jax/predict.py`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

from cspine_jax import cli
from cspine_jax import calibration
from cspine_jax import constants
from cspine_jax import dicom_outputs
from cspine_jax import localize_lib
from cspine_jax import metrics
from cspine_jax import overlay
from cspine_jax import parallel
from cspine_jax import restore
from cspine_jax.data import manifest as manifest_lib
from cspine_jax.data import store
from cspine_jax.data import transforms
from data_tools import convert
from data_tools import dicom

UID = 'study'  # the in-memory volume's key; never the StudyInstanceUID (no identifiers out)
NONE_FOUND = ('the localizer found no vertebra C1-C7 in this series (not a cervical spine CT, '
              'the neck outside the field of view, or a localizer failure)')
PREDICTION, OVERLAY = 'prediction.json', 'overlay.png'
SEG, SR = dicom_outputs.SEG_NAME, dicom_outputs.SR_NAME  # seg.dcm, sr.dcm
SUBMISSION = 'submission.csv'
FAILURES = 'failures.jsonl'
RECORDS = '.predict'  # OUT/.predict/<study>.json: a batch's per-study records, and its lock
LOCK = os.path.join(RECORDS, 'predict.lock')
# What submission.csv holds for a null probability (a study not assessable, a vertebra not
# found); prediction.json keeps the null. Kaggle scores every row of every study, so a number
# has to be there. The training-set positive rate of the real data (patient, C1-C7): what is
# known about a study nobody looked at, and the constant that minimises the expected log loss
# without information (the metric's constant-prevalence baseline). Not 0.5: on levels with 4-20%
# prevalence it costs more log loss than the prior. Not the classifier's output on an empty crop:
# that is the model's answer to an image of nothing (untrained territory; for a study with no
# vertebra found the classifier is not even run).
SUBMISSION_FALLBACK = dict(zip(constants.TARGETS, constants.POSITIVE_RATES))


# The classifier's crops of one study, by its task's crop mode (models.factory.TASKS).
_CROPS = {
    'region': transforms.make_region_crop,
    'vertebrae': lambda reader, study, cfg: transforms.make_vertebra_crops(reader, study, cfg)[0],
}


def classify(model: restore.InferenceModel, reader, study) -> np.ndarray:
  """(8,) probabilities in TARGETS order from the pipeline's crops of ``study``."""
  hu = _CROPS[model.task.crop_mode](reader, study, model.data)
  return model.predict(transforms.apply_windows(hu, model.windows)[None])[0]


def box_lps(box, voxel_to_lps: np.ndarray) -> tuple[list[list[float]], list[float]]:
  """Axis-aligned LPS extent ([min], [max], mm) of a voxel box's outer faces, and its centre.

  Voxel indices are voxel centres, so the box's faces are at -0.5 and end - 0.5.
  """
  b = np.asarray(box, float)
  lo, hi = b[:3] - 0.5, b[3:] - 0.5
  corners = np.array(np.meshgrid(*zip(lo, hi), indexing='ij')).reshape(3, -1).T
  pts = corners @ voxel_to_lps[:3, :3].T + voxel_to_lps[:3, 3]
  center = ((lo + hi) / 2.0) @ voxel_to_lps[:3, :3].T + voxel_to_lps[:3, 3]
  r = lambda v: [round(float(x), 3) for x in v]  # noqa: E731
  return [r(pts.min(0)), r(pts.max(0))], r(center)


def levels(names) -> str:
  """'C1, C2, C4-C7': vertebra names with runs of consecutive levels shortened."""
  idx = sorted(constants.VERTEBRAE.index(n) for n in names)
  runs, parts = [], []
  for i in idx:
    if runs and i == runs[-1][-1] + 1:
      runs[-1].append(i)
    else:
      runs.append([i])
  for run in runs:
    a, b = constants.VERTEBRAE[run[0]], constants.VERTEBRAE[run[-1]]
    parts.append(a if len(run) == 1 else f'{a}, {b}' if len(run) == 2 else f'{a}-{b}')
  return ', '.join(parts)


def _voxel_to_lps(spacing, direction, origin) -> np.ndarray:
  """4x4 (z, y, x, 1) -> LPS mm (as `dicom.Series.voxel_to_lps`, for any volume's geometry)."""
  m = np.eye(4)
  m[:3, :3] = np.asarray(direction, float).T * np.asarray(spacing, float)[None, :]
  m[:3, 3] = origin
  return m


@dataclasses.dataclass
class Prediction:
  """One study's prediction in memory: what the output files are made from."""
  result: dict  # prediction.json's content
  png: bytes  # overlay.png
  mask: np.ndarray  # (z, y, x) uint8 vertebra labels on the volume's grid (0, 1..7 = C1..C7)
  slice_files: list[str] | None  # the DICOM file of each z slice; None from a converted volume


def calibrate(probs, record: dict, found) -> np.ndarray:
  """(8,) probabilities with the record's per-target temperatures, and patient_overall raised to
  the largest calibrated vertebra among those ``found`` (a vertebra without a box has no image
  behind its output, so it cannot raise the patient's)."""
  t = calibration.temperatures_of(record)
  out = calibration.sigmoid(calibration.logits_from_probs(np.asarray(probs, np.float64)) / t)
  seen = [1 + constants.VERTEBRAE.index(v) for v in found]
  if seen:
    out[0] = max(out[0], out[seen].max())
  return out


class Predictor:
  """Both models, restored once and reused for every study (each head is jitted once per model:
  `restore.InferenceModel.jitted`, so only the first study pays for XLA compilation)."""

  def __init__(self, classifier_dir: str, localizer_dir: str,
               classifier_checkpoint: str = 'latest', localizer_checkpoint: str = 'latest'):
    t0 = time.perf_counter()
    mesh = parallel.make_mesh()
    self.localizer = localize_lib.load(localizer_dir, localizer_checkpoint, mesh)
    self.classifier = restore.InferenceModel(classifier_dir, classifier_checkpoint, mesh,
                                             expect='classifier')
    # CLASSIFIER/calibration.json (python -m cspine_jax.calibrate) where it was fitted on this
    # checkpoint: the probabilities predict reports are the ones eval scored.
    self.calibration, self.calibration_note = calibration.for_step(classifier_dir,
                                                                   int(self.classifier.step))
    self.load_s = time.perf_counter() - t0

  @property
  def checkpoints(self) -> dict[str, int]:
    return {'classifier': int(self.classifier.step), 'localizer': int(self.localizer.step)}

  def from_dicom(self, folder: str) -> Prediction:
    """Reads and predicts one DICOM series (StudyError, naming the file, on bad input)."""
    started = time.perf_counter()
    series = dicom.read_series(folder)
    return self.from_series(series, {'read_dicom': time.perf_counter() - started}, started)

  def from_series(self, series: dicom.Series, timings: dict | None = None,
                  started: float | None = None) -> Prediction:
    prediction = self.from_volume(series.hu, series.spacing, series.direction, series.origin,
                                  len(series.slice_files), series.warnings, timings, started)
    prediction.slice_files = list(series.slice_files)
    return prediction

  def from_converted(self, data: str, record: dict, hu: np.ndarray | None = None,
                     read_s: float = 0.0) -> Prediction:
    """Predicts one ok study of a converted dataset from its volume (no DICOM read); ``hu``:
    the volume already read (`read_volume`, in ``read_s`` seconds), else it is read here."""
    started = time.perf_counter() - read_s
    study = manifest_lib.parse_study(record)
    if hu is None:
      hu = read_volume(data, record)
      read_s = time.perf_counter() - started
    return self.from_volume(hu, study.spacing_mm, study.direction, study.origin,
                            int(record.get('source_slices') or hu.shape[0]),
                            record.get('warnings') or [], {'read_volume': read_s}, started)

  def from_volume(self, hu: np.ndarray, spacing, direction, origin, slices: int, warnings,
                  timings: dict | None = None, started: float | None = None) -> Prediction:
    """Localizes, classifies and renders one (z, y, x) HU volume; writes nothing.

    ``timings`` (seconds by stage, e.g. the read) are kept and extended; ``started``
    (perf_counter) is when the study's work began: ``total`` counts from it.
    """
    timings = dict(timings or {})
    started = time.perf_counter() if started is None else started
    reader = localize_lib.ArrayReader({store.VOLUMES: {UID: hu}})
    study = localize_lib.study_from_geometry(UID, hu.shape, spacing, direction, origin)
    t0 = time.perf_counter()
    # Through the module, not a bound name: tests replace localize_lib.localize with an oracle.
    loc = localize_lib.localize(self.localizer, reader, study)
    timings['localize'] = time.perf_counter() - t0
    timings.update({f'localize_{k[:-2]}': v for k, v in loc.timings.items()})

    found = [v for v in constants.VERTEBRAE if v in loc.boxes]
    missing = [v for v in constants.VERTEBRAE if v not in loc.boxes]
    not_assessed = {v: f'the localizer found no {v}' for v in missing}
    warnings = list(warnings)
    probabilities = dict.fromkeys(constants.TARGETS)
    if found:
      t0 = time.perf_counter()
      located = localize_lib.study_from_geometry(UID, hu.shape, spacing, direction, origin,
                                                 loc.boxes)
      probs = classify(self.classifier, reader, located)
      if self.calibration is not None:
        probs = calibrate(probs, self.calibration, found)
      timings['classify'] = time.perf_counter() - t0
      probabilities['patient_overall'] = float(probs[0])
      for i, name in enumerate(constants.VERTEBRAE):
        if name in loc.boxes:
          probabilities[name] = float(probs[i + 1])
      if missing:
        warnings.append(f'the localizer found no {levels(missing)}: not assessed (probability '
                        'null); a fracture there is neither found nor ruled out')
        warnings.append(f'patient_overall rests on {levels(found)} only (the classifier saw no '
                        f'image of {levels(missing)})')
    else:
      not_assessed['patient_overall'] = NONE_FOUND
      warnings.append(f'not assessable: {NONE_FOUND}')
    affine = _voxel_to_lps(spacing, direction, origin)
    vertebrae = {}
    for name in found:
      extent, center = box_lps(loc.boxes[name], affine)
      vertebrae[name] = {'box_voxel': loc.boxes[name], 'box_lps_mm': extent,
                         'center_lps_mm': center, 'probability': probabilities[name]}
    t0 = time.perf_counter()
    if not found:
      notes = ['the localizer found no vertebra C1-C7']
    else:
      notes = [f'not found, no probability: {levels(missing)}'] if missing else []
    png = overlay.render(hu, loc.mask, spacing,
                         {v: probabilities[v] for v in constants.VERTEBRAE},
                         probabilities['patient_overall'], notes)
    timings['overlay'] = time.perf_counter() - t0
    timings['total'] = time.perf_counter() - started
    result = {
        'assessable': bool(found),
        'not_assessable_reason': None if found else NONE_FOUND,
        'probabilities': probabilities,
        'not_assessed': {k: not_assessed[k] for k in constants.TARGETS if k in not_assessed},
        'vertebrae': vertebrae,
        'volume': {'shape': list(hu.shape), 'spacing_mm': [float(v) for v in spacing],
                   'origin': [float(v) for v in origin],
                   'direction': [[float(v) for v in r] for r in direction],
                   'slices': int(slices), 'frame': 'LPS; voxel (z, y, x)'},
        'checkpoints': self.checkpoints,
        'calibration': 'applied' if self.calibration is not None else 'none',
        'timings_s': {k: round(v, 3) for k, v in timings.items()},
        'warnings': warnings,
    }
    return Prediction(result=result, png=png, mask=loc.mask, slice_files=None)


def read_volume(data: str, record: dict) -> np.ndarray:
  """The (z, y, x) HU volume of a converted study (ValueError if it is not the manifest's)."""
  path = store.array_path(data, store.VOLUMES, record['uid'])
  hu = store.read_array(path)
  if list(hu.shape) != list(record.get('shape') or []):
    raise ValueError(f'{path}: shape {list(hu.shape)}, the manifest says {record.get("shape")}')
  return hu


def predict(classifier_dir: str, localizer_dir: str, dicom_dir: str,
            classifier_checkpoint: str = 'latest', localizer_checkpoint: str = 'latest'
            ) -> tuple[dict, bytes]:
  """One DICOM series, models loaded for it; returns (prediction dict, overlay PNG bytes).
  Writes nothing. The series is read first: a bad folder fails before any model is loaded."""
  p = predict_one(classifier_dir, localizer_dir, dicom_dir, classifier_checkpoint,
                  localizer_checkpoint)
  return p.result, p.png


def predict_one(classifier_dir: str, localizer_dir: str, dicom_dir: str,
                classifier_checkpoint: str = 'latest', localizer_checkpoint: str = 'latest'
                ) -> Prediction:
  """`predict` as a `Prediction` (with the mask and slice files the DICOM outputs need)."""
  started = time.perf_counter()
  series = dicom.read_series(dicom_dir)  # StudyError (naming the file) on bad input
  timings = {'read_dicom': time.perf_counter() - started}
  predictor = Predictor(classifier_dir, localizer_dir, classifier_checkpoint,
                        localizer_checkpoint)
  timings['load_models'] = predictor.load_s
  return predictor.from_series(series, timings, started)


def summary(result: dict) -> str:
  """The console line: the probabilities, or why there are none."""
  if not result['assessable']:
    return f'not assessable: {result["not_assessable_reason"]}'
  p, missing = result['probabilities'], list(result['not_assessed'])
  head = f'patient_overall {p["patient_overall"]:.3f}'
  if missing:
    found = [v for v in constants.VERTEBRAE if v not in missing]
    head += f' (from {levels(found)} only)'
  return head + '; ' + ', '.join(f'{v} {p[v]:.3f}' if p[v] is not None else f'{v} not found'
                                 for v in constants.VERTEBRAE)


def write_outputs(output: str, result: dict, png: bytes) -> None:
  """OUT/prediction.json and OUT/overlay.png, each via a temporary file and a rename."""
  os.makedirs(output, exist_ok=True)
  store.atomic_write(os.path.join(output, OVERLAY), png)
  store.atomic_write(os.path.join(output, PREDICTION), json.dumps(result, indent=2) + '\n')


def write_study(folder: str, prediction: Prediction, dicom_dir: str | None = None,
                threshold: float = 0.5) -> list[str]:
  """A study's files in ``folder``, each whole (temporary + rename); returns their names.

  With ``dicom_dir`` (the series the prediction was read from) also sr.dcm and, when a vertebra
  was found, seg.dcm first (`dicom_outputs.write`), timed in ``timings_s``; prediction.json goes
  last.
  """
  os.makedirs(folder, exist_ok=True)
  result = prediction.result
  names = [OVERLAY, PREDICTION]
  if dicom_dir is not None:
    t0 = time.perf_counter()
    paths = dicom_outputs.write(folder, dicom_dir, prediction.slice_files, prediction.mask,
                                result, threshold=threshold)
    dt = time.perf_counter() - t0
    t = result['timings_s']
    total = t.pop('total')
    t['dicom_outputs'] = round(dt, 3)
    t['total'] = round(total + dt, 3)
    names = [os.path.basename(p) for p in paths] + names
  write_outputs(folder, result, prediction.png)
  return names


# ---------------------------------------------------------------------------------------------
# Batches: a folder of study folders, or a converted dataset.
# ---------------------------------------------------------------------------------------------


def is_one_series(folder: str) -> bool:
  """Whether --dicom names one series (today's single-study mode) rather than a folder of
  studies: it holds a .dcm file, or no sub-folder at all (an empty or non-DICOM folder then
  fails as one bad series, as before)."""
  entries = [e for e in os.scandir(folder) if not e.name.startswith('.')]
  if any(e.is_file() and e.name.lower().endswith('.dcm') for e in entries):
    return True
  return not any(e.is_dir() for e in entries)


def dicom_jobs(root: str) -> list[dict]:
  """{study, folder, refused} for every study folder of ``root`` (`convert.discover`).

  ``study`` is the folder's name, a DICOM UID (it names the output folder and the submission
  rows, as Kaggle's layout does), or for any other name the converter's position-based stand-in,
  with ``refused`` saying why; the name itself is never kept.
  """
  jobs = []
  for job in convert.discover(root):
    refused = job['refused']
    if refused:  # discover's text names the folder of studies as its own flag
      refused = refused.replace(' of --input (', ' of --dicom (')
    jobs.append({'study': job['uid'], 'folder': None if refused else job['folder'],
                 'refused': refused})
  return jobs


def converted_jobs(data: str) -> list[dict]:
  """{study, record, refused} for every study of DATA/manifest.jsonl (a study the converter
  failed is a failure here too, with its reason)."""
  jobs = []
  for r in store.read_manifest(data):
    status = r.get('status', 'ok')
    refused = None
    if status != 'ok':
      refused = 'not converted: ' + (status[len('error: '):] if status.startswith('error: ')
                                     else status)
    jobs.append({'study': r['uid'], 'record': r, 'refused': refused})
  return jobs


def _lock(output: str):
  """OUT for this command alone (its temporaries are cleaned at start); keep the file open."""
  f = store.try_lock(os.path.join(output, LOCK))
  if f is None:
    raise cli.Failure(f'--output {output} is being written by another cspine_jax.predict (it '
                      f'holds {os.path.join(output, LOCK)}); wait for it to finish')
  return f


def submission_row(result: dict) -> list[float]:
  """The 8 submission probabilities of a prediction: nulls -> SUBMISSION_FALLBACK."""
  p = result['probabilities']
  return [SUBMISSION_FALLBACK[t] if p.get(t) is None else float(p[t]) for t in constants.TARGETS]


def _write_failures(output: str, failures: dict[str, tuple[int, str]]) -> None:
  """OUT/failures.jsonl from {study: (position in the input, error)}, in the input's order."""
  store.atomic_write(os.path.join(output, FAILURES), ''.join(
      json.dumps({'study': k, 'error': v}) + '\n'
      for k, (_, v) in sorted(failures.items(), key=lambda kv: kv[1][0])))


@dataclasses.dataclass
class BatchSummary:
  studies: int  # every study of the input
  predicted: list[str]  # this run
  skipped: list[str]  # finished by an earlier run
  failures: dict[str, str]  # study -> error
  filled: int  # studies with a null probability (SUBMISSION_FALLBACK in the submission)
  elapsed_s: float  # the predicted studies' time (after the models were loaded)

  @property
  def per_minute(self) -> float:
    return 60.0 * len(self.predicted) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def run_batch(predictor: Predictor, jobs: list[dict], output: str, source: str,
              data: str | None = None, write_dicom: bool = False, threshold: float = 0.5,
              progress: bool = False) -> BatchSummary:
  """Predicts every job not already done into OUT/<study>/; writes submission.csv and
  failures.jsonl. ``source``: 'dicom' (jobs of `dicom_jobs`) or 'data' (`converted_jobs` of
  ``data``); ``write_dicom``: also the SEG and SR (--dicom_outputs, 'dicom' only). Returns what
  happened; raises only for OUT itself (busy, not writable)."""
  os.makedirs(output, exist_ok=True)
  lock = _lock(output)
  try:
    store.clean_temporaries(output, (RECORDS,))
    records = store.JobRecords(output, RECORDS)
    # What a finished study was made with: a rerun with another model or option redoes it.
    tag = {'source': source, 'classifier': os.path.abspath(predictor.classifier.workdir),
           'localizer': os.path.abspath(predictor.localizer.workdir), **{
               f'{k}_step': v for k, v in predictor.checkpoints.items()},
           'dicom_outputs': bool(write_dicom),
           'threshold': float(threshold) if write_dicom else None}
    results, failures, todo, skipped, queued = {}, {}, [], [], set()
    for i, job in enumerate(jobs):
      study = job['study']  # failures: (position in the input, error), listed in that order
      if job['refused']:
        failures[study] = (i, job['refused'])
      elif study in results or study in queued:
        # train_images/ and test_images/ both hold it: one output folder, one set of rows.
        failures[study + ' (second folder)'] = (i, (
            'a study folder of the same name was met earlier in this input; this one is not '
            'predicted (each study needs a name of its own in OUT and the submission)'))
      else:
        saved = _finished(output, records, study, tag)
        if saved is not None:
          results[study] = saved
          skipped.append(study)
        else:
          todo.append((i, job))
          queued.add(study)
    _write_failures(output, failures)
    bar = tqdm(total=len(todo), unit='study', desc='predict', file=sys.stderr,
               disable=not progress)
    predicted = []

    def read(job):
      t0 = time.perf_counter()
      if source == 'dicom':
        return dicom.read_series(job['folder']), time.perf_counter() - t0
      return read_volume(data, job['record']), time.perf_counter() - t0

    t_start = time.perf_counter()
    # The next study is read (DICOM decoding: file I/O and C decoders, which release the GIL)
    # in a thread while the models work on this one; each study's timings still give its own
    # read time. Two volumes in memory at most.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='predict-read') as pool:
      ahead = pool.submit(read, todo[0][1]) if todo else None
      for k, (i, job) in enumerate(todo):
        study, current = job['study'], ahead
        ahead = pool.submit(read, todo[k + 1][1]) if k + 1 < len(todo) else None
        final = os.path.join(output, store.check_uid(study))
        try:
          volume, read_s = current.result()  # the read's own error (StudyError) surfaces here
          del current
          if source == 'dicom':
            prediction = predictor.from_series(volume, {'read_dicom': read_s},
                                               time.perf_counter() - read_s)
          else:
            prediction = predictor.from_converted(data, job['record'], volume, read_s)
          del volume
          tmp = store.new_temp_dir(output, study, create=True)
          try:
            files = write_study(tmp, prediction, job['folder'] if write_dicom else None,
                                threshold)
            store.place(tmp, final)  # the study's folder appears complete, or not at all
          finally:
            if os.path.exists(tmp):
              shutil.rmtree(tmp, ignore_errors=True)
          records.save({'uid': study, 'tag': tag, 'files': files})  # last: "done"
          results[study] = prediction.result
          predicted.append(study)
        except Exception as e:  # pylint: disable=broad-except
          # One bad study is recorded and the batch goes on; an older run's folder of it goes
          # too, so OUT holds no result for a study failures.jsonl lists.
          if isinstance(e, dicom.StudyError):
            failures[study] = (i, str(e))
          else:
            failures[study] = (i, f'internal error ({type(e).__name__}: {e})')
          if os.path.exists(final):
            shutil.rmtree(final)
          if os.path.exists(records.path(study)):
            os.remove(records.path(study))
          _write_failures(output, failures)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t_start
    done = [s for s in dict.fromkeys(j['study'] for j in jobs) if s in results]
    rows = np.array([submission_row(results[s]) for s in done], float).reshape(
        -1, len(constants.TARGETS))
    metrics.write_submission(os.path.join(output, SUBMISSION), done, rows)  # temp + rename
    _write_failures(output, failures)
    filled = sum(None in results[s]['probabilities'].values() for s in done)
    failed = {k: v for k, (_, v) in sorted(failures.items(), key=lambda kv: kv[1][0])}
    return BatchSummary(studies=len(jobs), predicted=predicted, skipped=skipped,
                        failures=failed, filled=filled, elapsed_s=elapsed)
  finally:
    lock.close()


def _finished(output: str, records: store.JobRecords, study: str, tag: dict) -> dict | None:
  """The saved prediction of a study an earlier run finished with ``tag`` (its record, written
  last, lists the files it wrote: all still there), else None."""
  record = records.load(study)
  if not record or record.get('tag') != tag or PREDICTION not in (record.get('files') or []):
    return None
  folder = os.path.join(output, study)
  if not all(os.path.isfile(os.path.join(folder, str(f))) for f in record['files']):
    return None
  try:
    with open(os.path.join(folder, PREDICTION)) as f:
      result = json.load(f)
    submission_row(result)
    return result
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None
