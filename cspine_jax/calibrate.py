r"""Fits per-target temperatures on a run's validation fold and writes WORKDIR/calibration.json.

  python -m cspine_jax.calibrate --workdir=runs/demo [--checkpoint=latest] [--boxes=auto]

The validation fold is the run's own ``config.data.fold`` of ``config.data.num_folds`` on its
training data (``config.data.root``; ``--data`` if the converted dataset moved): studies the
model did not train on, and never the held-out set whose score is reported. A run trained with
``data.fold=-1`` (every labelled study) has no validation fold and is refused: train with
``--config.data.fold=0`` (configs/demo.py does). The model predicts the fold once, at
``--boxes`` (eval's meaning: use 'predicted' when the scores that matter are the two-stage ones),
`calibration.fit_temperatures` fits one temperature per target, and
``calibration.json`` records them with the checkpoint step (eval applies them to that step only),
the split and the uids they were fitted on (eval warns if it scores any of them), and the fold's
RSNA score and ECE before and after. `python -m cspine_jax.eval` then applies it by default.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags

from cspine_jax import calibration
from cspine_jax import cli
from cspine_jax import constants
from cspine_jax import evaluate
from cspine_jax import metrics
from cspine_jax import parallel
from cspine_jax import restore
from cspine_jax.data import manifest
from cspine_jax.data import pipeline
from cspine_jax.data import store

FLAGS = flags.FLAGS
# Below this there is nothing to fit. Thin folds are otherwise handled per target (a target
# needs 2 positives and 2 negatives for a temperature of its own; `calibration.fit_temperatures`)
# and the record says, per target, which temperatures were fitted.
MIN_STUDIES = 2


def define_flags():
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best or a step (eval applies the '
                      'temperatures to this step only).')
  flags.DEFINE_enum('boxes', 'auto', manifest.BOX_SOURCES, 'Vertebra boxes of the validation '
                    'crops (as eval --boxes).')
  flags.DEFINE_string('data', None, 'The run\'s converted training data, if it moved (default: '
                      'config.data.root of the workdir).')
  flags.mark_flags_as_required(['workdir'])


def run(workdir: str, checkpoint: str = 'latest', boxes: str = 'auto',
        data: str | None = None) -> dict:
  """Fits and writes WORKDIR/calibration.json; returns its record."""
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    raise cli.UsageError(f'--workdir={workdir}: not a training workdir (no config.json)')
  if boxes not in manifest.BOX_SOURCES:
    raise cli.UsageError(f'--boxes={boxes!r}: expected one of {", ".join(manifest.BOX_SOURCES)}')
  config = restore.load_config(workdir)
  d = config.data
  d.root = store.dataset(data or d.root, '--data' if data else 'the run\'s config.data.root')
  if int(d.fold) < 0:
    raise cli.UsageError(
        f'{workdir} trained with config.data.fold={d.fold}: on every labelled study, so there '
        'is no validation fold to fit on (fitting on the training studies would learn the '
        'model\'s over-confidence on what it saw; on the held-out set, the score it reports). '
        'Train with --config.data.fold=0 (configs/demo.py does)')
  chosen = pipeline.split_studies(config, 'eval')
  studies = manifest.use_boxes(chosen, boxes)
  if len(studies) < MIN_STUDIES:
    raise cli.UsageError(
        f'the validation fold (data.fold={d.fold} of {d.num_folds}) of {d.root} holds '
        f'{len(studies)} studies{"" if boxes == "auto" else " with " + boxes + " boxes"}; at '
        f'least {MIN_STUDIES} are needed (fewer folds make each larger: '
        '--config.data.num_folds)')
  mesh = parallel.make_mesh()
  model = restore.InferenceModel(workdir, checkpoint, mesh, expect='classifier')
  model.config.data.root = d.root
  result = evaluate.evaluate(model.config, lambda x: model('probs', x), mesh, studies=studies)
  keep = result['labelled']
  labels, raw = result['labels'][keep], result['probs'][keep]
  temps, sources = calibration.fit_temperatures(calibration.logits_from_probs(raw), labels)
  calibrated = calibration.apply_temperatures(raw, temps)
  positives = labels.sum(0).astype(int)
  record = {
      'method': 'temperature scaling per target, Platt\'s targets (cspine_jax/calibration.py)',
      'temperatures': {n: float(t) for n, t in zip(constants.TARGETS, temps)},
      'sources': dict(zip(constants.TARGETS, sources)),
      'patient_rule': calibration.PATIENT_RULE,
      'checkpoint_step': int(model.step),
      'fitted_on': {
          'data': d.root, 'split': f'validation fold (data.fold={d.fold} of '
                                    f'{d.num_folds}, fold_seed {d.get("fold_seed", 0)})',
          'fold': int(d.fold), 'num_folds': int(d.num_folds), 'boxes': boxes,
          'studies': len(labels),
          'positives': {n: int(p) for n, p in zip(constants.TARGETS, positives)},
          'uids': [u for u, k in zip(result['uids'], keep) if k]},
      'validation': {
          'rsna_score_before': metrics.rsna_score(labels, raw),
          'rsna_score_after': metrics.rsna_score(labels, calibrated),
          'ece_before': calibration.expected_calibration_error(raw, labels),
          'ece_after': calibration.expected_calibration_error(calibrated, labels),
          'ece_per_target_before': _per_target(raw, labels),
          'ece_per_target_after': _per_target(calibrated, labels)},
  }
  record['path'] = calibration.save(workdir, record)
  return record


def _per_target(probs, labels) -> dict:
  rep = calibration.ece_report(probs, labels)
  return {n: rep[f'ece_{n}'] for n in constants.TARGETS}


def describe(record: dict) -> str:
  """Two lines for a console: where it was fitted, the temperatures, the fold's before/after."""
  f, v = record['fitted_on'], record['validation']
  temps = ', '.join(f'{("patient" if n == "patient_overall" else n)} {t:.2f}'
                    + ('*' if record['sources'][n] != 'own' else '')
                    for n, t in record['temperatures'].items())
  return (f'calibration fitted on the {f["split"]} of the training studies: {f["studies"]} '
          f'studies, {f["boxes"]} boxes, step {record["checkpoint_step"]}\n'
          f'   temperatures {temps} (* pooled or none: too few of a class); validation RSNA '
          f'{v["rsna_score_before"]:.4f} -> {v["rsna_score_after"]:.4f}, ECE '
          f'{v["ece_before"]:.3f} -> {v["ece_after"]:.3f}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  record = run(FLAGS.workdir, FLAGS.checkpoint, FLAGS.boxes, FLAGS.data)
  print(describe(record))
  print(f'-> {record["path"]}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
