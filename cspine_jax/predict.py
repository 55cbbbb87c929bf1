r"""Fracture probabilities for one raw DICOM series: localize the vertebrae, classify each one.

  python -m cspine_jax.predict --classifier=RUNS/demo --localizer=RUNS/localizer \
      --dicom=/data/rsna/test_images/1.2.826... --output=OUT

Writes
  OUT/prediction.json  {"assessable": true, "not_assessable_reason": null,
                        "probabilities": {"patient_overall": p, "C1": p, ... "C7": p},
                        "not_assessed": {"C7": "the localizer found no C7"},
                        "vertebrae": {"C1": {"box_voxel": [z0, y0, x0, z1, y1, x1],
                                             "box_lps_mm": [[min L, P, S], [max L, P, S]],
                                             "center_lps_mm": [...], "probability": p}, ...},
                        "volume": {shape, spacing_mm, origin, direction, slices},
                        "checkpoints": {"classifier": step, "localizer": step},
                        "timings_s": {stage: seconds, ..., "total": s}, "warnings": [...]}
  OUT/overlay.png      sagittal and coronal views through the spine, vertebrae coloured and
                       labelled with their probabilities, the patient probability in the title

Vertebrae the localizer does not find. A vertebra without a box was never seen by the classifier
(its crop would be empty), so it gets no probability: ``probabilities[name]`` is null and
``not_assessed[name]`` says why; every null in ``probabilities`` has its reason there, and
``vertebrae`` lists the found ones only. A radiologist reading "C7 0.03" takes it as "C7 looked
at, no fracture"; a number for a level nobody looked at (C7 behind the shoulders and C1 at a cut
skull base are the usual ones) would be a false reassurance, and an imputed prior is a number
the scan did not give. So:
- some found: the found vertebrae keep their probabilities; ``patient_overall`` is still the
  model's patient output (what a worklist is sorted by) and is reported, with a warning that it
  rests on the vertebrae found only, naming the ones not assessed, which the reader has to
  review; the console line and the overlay name them too. (With a noisy-OR or max patient head
  the empty crops still enter that combination at the model's answer to an empty crop, near the
  training prior: one more reason to read it as "of the levels seen".)
- none found (not a neck CT, the neck outside the field of view, or a localizer failure): the
  study is not assessable: ``"assessable": false``, ``not_assessable_reason`` says why, every
  probability is null (``patient_overall`` too: a patient score with no vertebra seen is the
  model's answer to empty crops) and the classifier is not run (no ``classify`` timing), though
  both models are loaded (a bad checkpoint still fails). The overlay is still rendered
  (a reader sees what was in the series) and says "NOT ASSESSABLE"; the console says so; the exit
  code is 0: it is a result, written like any other, not a failure of the command (scripts read
  ``assessable``; exit 1 stays for input that cannot be read).

The DICOM folder is read with the converter's reader (`data_tools.dicom.read_series`: every real-
data quirk, the same error policy), so a bad folder (not CT, corrupt file, gap in z, ...) fails
with `error: <folder>: <why, naming the file>` and exit 1, before anything is written; a flag
naming a folder that is not there is a usage error (exit 2; `cspine_jax.cli`). Outputs are
written under temporary names and renamed, so OUT never holds a half-written file. No patient or
institution tag (not even the StudyInstanceUID) reaches the outputs. The vertebra crops are made by
the training pipeline's code (`transforms.make_vertebra_crops`) from the localizer's boxes.
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from cspine_jax import cli
from cspine_jax import constants
from cspine_jax import localize_lib
from cspine_jax import overlay
from cspine_jax import parallel
from cspine_jax import restore
from cspine_jax.data import store
from cspine_jax.data import transforms
from data_tools import dicom

FLAGS = flags.FLAGS
UID = 'study'  # the in-memory volume's key; never the StudyInstanceUID (no identifiers out)
NONE_FOUND = ('the localizer found no vertebra C1-C7 in this series (not a cervical spine CT, '
              'the neck outside the field of view, or a localizer failure)')


def define_flags():
  flags.DEFINE_string('classifier', None, 'Fracture classifier workdir (e.g. configs/demo.py).')
  flags.DEFINE_string('localizer', None, 'Localizer workdir (configs/localizer.py).')
  flags.DEFINE_string('dicom', None, 'Folder of one CT series (.dcm slices).')
  flags.DEFINE_string('output', None, 'Output folder (prediction.json, overlay.png).')
  flags.DEFINE_string('classifier_checkpoint', 'latest', 'latest, best or a step.')
  flags.DEFINE_string('localizer_checkpoint', 'latest', 'latest or a step.')
  flags.mark_flags_as_required(['classifier', 'localizer', 'dicom', 'output'])


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


def predict(classifier_dir: str, localizer_dir: str, dicom_dir: str,
            classifier_checkpoint: str = 'latest', localizer_checkpoint: str = 'latest'
            ) -> tuple[dict, bytes]:
  """Runs everything in memory; returns (prediction dict, overlay PNG bytes). Writes nothing."""
  timings = {}
  t_all = time.perf_counter()
  t0 = time.perf_counter()
  series = dicom.read_series(dicom_dir)  # StudyError (naming the file) on bad input
  timings['read_dicom'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  mesh = parallel.make_mesh()
  localizer = localize_lib.load(localizer_dir, localizer_checkpoint, mesh)
  classifier = restore.InferenceModel(classifier_dir, classifier_checkpoint, mesh,
                                      expect='classifier')
  timings['load_models'] = time.perf_counter() - t0

  reader = localize_lib.ArrayReader({store.VOLUMES: {UID: series.hu}})
  study = localize_lib.study_from_geometry(UID, series.hu.shape, series.spacing,
                                           series.direction, series.origin)
  t0 = time.perf_counter()
  loc = localize_lib.localize(localizer, reader, study)
  timings['localize'] = time.perf_counter() - t0
  timings.update({f'localize_{k[:-2]}': v for k, v in loc.timings.items()})

  found = [v for v in constants.VERTEBRAE if v in loc.boxes]
  missing = [v for v in constants.VERTEBRAE if v not in loc.boxes]
  not_assessed = {v: f'the localizer found no {v}' for v in missing}
  warnings = list(series.warnings)
  probabilities = dict.fromkeys(constants.TARGETS)
  if found:
    t0 = time.perf_counter()
    located = localize_lib.study_from_geometry(UID, series.hu.shape, series.spacing,
                                               series.direction, series.origin, loc.boxes)
    probs = classify(classifier, reader, located)
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
  affine = series.voxel_to_lps()
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
  png = overlay.render(series.hu, loc.mask, series.spacing,
                       {v: probabilities[v] for v in constants.VERTEBRAE},
                       probabilities['patient_overall'], notes)
  timings['overlay'] = time.perf_counter() - t0
  timings['total'] = time.perf_counter() - t_all
  result = {
      'assessable': bool(found),
      'not_assessable_reason': None if found else NONE_FOUND,
      'probabilities': probabilities,
      'not_assessed': {k: not_assessed[k] for k in constants.TARGETS if k in not_assessed},
      'vertebrae': vertebrae,
      'volume': {'shape': list(series.hu.shape), 'spacing_mm': list(series.spacing),
                 'origin': list(series.origin), 'direction': [list(r) for r in series.direction],
                 'slices': len(series.slice_files), 'frame': 'LPS; voxel (z, y, x)'},
      'checkpoints': {'classifier': int(classifier.step), 'localizer': int(localizer.step)},
      'timings_s': {k: round(v, 3) for k, v in timings.items()},
      'warnings': warnings,
  }
  return result, png


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
  store.atomic_write(os.path.join(output, 'overlay.png'), png)
  store.atomic_write(os.path.join(output, 'prediction.json'), json.dumps(result, indent=2) + '\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('dicom', 'classifier', 'localizer'):
    if not os.path.isdir(FLAGS[name].value):
      raise cli.UsageError(f'--{name}={FLAGS[name].value} is not a folder')
  try:
    result, png = predict(FLAGS.classifier, FLAGS.localizer, FLAGS.dicom,
                          FLAGS.classifier_checkpoint, FLAGS.localizer_checkpoint)
  except dicom.StudyError as e:
    raise cli.Failure(f'{FLAGS.dicom}: {e}') from e
  write_outputs(FLAGS.output, result, png)
  print(summary(result))
  print(f'{result["timings_s"]["total"]:.2f} s -> {FLAGS.output}/prediction.json, '
        f'{FLAGS.output}/overlay.png')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
