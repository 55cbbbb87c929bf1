r"""Fracture probabilities for one raw DICOM series: localize the vertebrae, classify each one.

  python -m cspine_jax.predict --classifier=RUNS/demo --localizer=RUNS/localizer \
      --dicom=/data/rsna/test_images/1.2.826... --output=OUT

Writes
  OUT/prediction.json  {"probabilities": {"patient_overall": p, "C1": p, ...},
                        "vertebrae": {"C1": {"box_voxel": [z0, y0, x0, z1, y1, x1],
                                             "box_lps_mm": [[min L, P, S], [max L, P, S]],
                                             "center_lps_mm": [...], "probability": p}, ...},
                        "volume": {shape, spacing_mm, origin, direction, slices},
                        "checkpoints": {"classifier": step, "localizer": step},
                        "timings_s": {stage: seconds, ..., "total": s}, "warnings": [...]}
  OUT/overlay.png      sagittal and coronal views through the spine, vertebrae coloured and
                       labelled with their probabilities, the patient probability in the title

The DICOM folder is read with the converter's reader (`data_tools.dicom.read_series`: every real-
data quirk, the same error policy), so a bad folder (not CT, corrupt file, gap in z, ...) fails
with a message naming the file and a non-zero exit, before anything is written. Outputs are
written under temporary names and renamed, so OUT never holds a half-written file. No patient or
institution tag (not even the StudyInstanceUID) reaches the outputs. The vertebra crops are made by
the training pipeline's code (`transforms.make_vertebra_crops`) from the localizer's boxes.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

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

  t0 = time.perf_counter()
  located = localize_lib.study_from_geometry(UID, series.hu.shape, series.spacing,
                                             series.direction, series.origin, loc.boxes)
  probs = classify(classifier, reader, located)
  timings['classify'] = time.perf_counter() - t0

  warnings = list(series.warnings)
  missing = [v for v in constants.VERTEBRAE if v not in loc.boxes]
  if missing:
    warnings.append(f'the localizer found no {", ".join(missing)} (crops of those are empty)')
  affine = series.voxel_to_lps()
  vertebrae = {}
  for i, name in enumerate(constants.VERTEBRAE):
    if name in loc.boxes:
      extent, center = box_lps(loc.boxes[name], affine)
      vertebrae[name] = {'box_voxel': loc.boxes[name], 'box_lps_mm': extent,
                         'center_lps_mm': center, 'probability': float(probs[i + 1])}
  t0 = time.perf_counter()
  png = overlay.render(series.hu, loc.mask, series.spacing,
                       {name: float(probs[i + 1]) for i, name in enumerate(constants.VERTEBRAE)},
                       float(probs[0]))
  timings['overlay'] = time.perf_counter() - t0
  timings['total'] = time.perf_counter() - t_all
  result = {
      'probabilities': {name: float(p) for name, p in zip(constants.TARGETS, probs)},
      'vertebrae': vertebrae,
      'volume': {'shape': list(series.hu.shape), 'spacing_mm': list(series.spacing),
                 'origin': list(series.origin), 'direction': [list(r) for r in series.direction],
                 'slices': len(series.slice_files), 'frame': 'LPS; voxel (z, y, x)'},
      'checkpoints': {'classifier': int(classifier.step), 'localizer': int(localizer.step)},
      'timings_s': {k: round(v, 3) for k, v in timings.items()},
      'warnings': warnings,
  }
  return result, png


def write_outputs(output: str, result: dict, png: bytes) -> None:
  """OUT/prediction.json and OUT/overlay.png, each via a temporary file and a rename."""
  os.makedirs(output, exist_ok=True)
  store.atomic_write(os.path.join(output, 'overlay.png'), png)
  store.atomic_write(os.path.join(output, 'prediction.json'), json.dumps(result, indent=2) + '\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not os.path.isdir(FLAGS.dicom):
    print(f'error: --dicom={FLAGS.dicom} is not a folder', file=sys.stderr)
    sys.exit(2)
  try:
    result, png = predict(FLAGS.classifier, FLAGS.localizer, FLAGS.dicom,
                          FLAGS.classifier_checkpoint, FLAGS.localizer_checkpoint)
  except dicom.StudyError as e:
    print(f'error: {FLAGS.dicom}: {e}', file=sys.stderr)
    sys.exit(1)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  write_outputs(FLAGS.output, result, png)
  p = result['probabilities']
  print(f'patient_overall {p["patient_overall"]:.3f}; ' +
        ', '.join(f'{v} {p[v]:.3f}' for v in constants.VERTEBRAE))
  print(f'{result["timings_s"]["total"]:.2f} s -> {FLAGS.output}/prediction.json, '
        f'{FLAGS.output}/overlay.png')


if __name__ == '__main__':
  define_flags()
  app.run(main)
