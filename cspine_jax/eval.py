r"""Restores a checkpoint, predicts every study of a converted dataset, writes a Kaggle submission.

  python -m cspine_jax.eval --workdir=runs/demo --data=/data/cspine_heldout \
      [--checkpoint=latest|best|STEP] --output=submission.csv

Where the dataset has labels, also prints and saves (beside --output) the RSNA weighted log loss,
per-target ROC AUC, patient-level sensitivity and specificity at --threshold, the constant-
prevalence baseline on the same studies, the expected calibration error (``ece`` pooled over the
8 targets, ``ece_<target>`` each; 10 equal-width bins) and ROC curves (PNG).

Calibration: where the workdir holds ``calibration.json`` (`python -m cspine_jax.calibrate`:
per-target temperatures fitted on the run's validation fold) and it was fitted on the checkpoint
evaluated here, the probabilities are calibrated before anything is written or scored
(``--nocalibrate``: the model's own); the summary then also gives ``uncalibrated_rsna_score`` and
``uncalibrated_ece``, and warns if any scored study is one the calibration was fitted on.

Boxes (``--boxes``): 'auto' crops at the true vertebra boxes where a study has a mask, else at
the localizer's; 'predicted' at the localizer's only (the two-stage score: what a new scan gets);
'true' only the studies with masks, at their true boxes (the classifier without the localizer's
errors). ``box_sources`` counts the studies by the boxes they were cropped at.
"""
from __future__ import annotations

import collections
import json
import os

from absl import app
from absl import flags
import numpy as np

from cspine_jax import calibration
from cspine_jax import cli
from cspine_jax import constants
from cspine_jax import evaluate
from cspine_jax import metrics as metrics_lib
from cspine_jax import parallel
from cspine_jax import plots
from cspine_jax import restore
from cspine_jax.data import manifest
from cspine_jax.data import pipeline
from cspine_jax.data import store

FLAGS = flags.FLAGS
SPLITS = ('all', 'test', 'labelled', 'eval', 'train', 'labelled_with_boxes')


def define_flags():
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('data', None, 'Converted dataset (python -m data_tools.convert).')
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best (lowest eval RSNA score) or a step.')
  flags.DEFINE_string('output', 'submission.csv', 'Kaggle submission CSV to write.')
  flags.DEFINE_float('threshold', 0.5, 'Patient-level decision threshold for sens./spec.')
  flags.DEFINE_string('split', 'all', 'Which studies: all, test, labelled, eval, train, or '
                      'labelled_with_boxes (labelled studies with true or predicted vertebra '
                      'boxes: what a per-vertebra model can crop without a localizer).')
  flags.DEFINE_enum('boxes', 'auto', manifest.BOX_SOURCES, 'Vertebra boxes to crop at: auto '
                    '(true where a mask exists, else predicted), predicted (the localizer\'s '
                    'only: the two-stage score) or true (only the studies with masks).')
  flags.DEFINE_bool('calibrate', True, 'Apply WORKDIR/calibration.json (python -m '
                    'cspine_jax.calibrate) when there is one for this checkpoint.')
  flags.mark_flags_as_required(['workdir', 'data'])


def select_studies(config, split: str, boxes: str) -> list:
  """The studies of ``split`` of config.data.root as cropped at ``boxes`` (UsageError if none)."""
  root = config.data.root
  if split == 'labelled_with_boxes':
    labelled = [s for s in manifest.load_manifest(root) if s.labels is not None and
                s.split != 'test']
    studies = [s for s in manifest.use_boxes(labelled, boxes) if s.boxes]
    if not studies:
      raise cli.UsageError(f'--data={root}: no labelled study with '
                           f'{"" if boxes == "auto" else boxes + " "}vertebra boxes')
    return studies
  chosen = pipeline.split_studies(config, split)
  if not chosen:
    # Caught before any model runs (an empty split used to end in a numpy traceback).
    raise cli.UsageError(f'--data={root}: no converted study in --split={split} (the manifest '
                         f'lists {len(manifest.load_manifest(root))} ok studies)')
  studies = manifest.use_boxes(chosen, boxes)
  if not studies:
    raise cli.UsageError(f'--boxes={boxes}: none of the {len(chosen)} studies of --split={split} '
                         'has a true vertebra mask')
  return studies


def run(workdir: str, data: str, checkpoint: str, output: str, threshold: float = 0.5,
        split: str = 'all', boxes: str = 'auto', calibrate: bool = True) -> dict:
  data = store.dataset(data, '--data')
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    raise cli.UsageError(f'--workdir={workdir}: not a training workdir (no config.json)')
  if split not in SPLITS:
    raise cli.UsageError(f'--split={split!r}: expected one of {", ".join(SPLITS)}')
  if boxes not in manifest.BOX_SOURCES:
    raise cli.UsageError(f'--boxes={boxes!r}: expected one of {", ".join(manifest.BOX_SOURCES)}')
  mesh = parallel.make_mesh()
  model = restore.InferenceModel(workdir, checkpoint, mesh, expect='classifier')
  config, step = model.config, model.step
  config.data.root = data
  studies = select_studies(config, split, boxes)
  record, calibration_note = calibration.for_step(workdir, int(step), calibrate)
  result = evaluate.evaluate(config, lambda x: model('probs', x), mesh, studies=studies)
  raw = result['probs']
  probs_all = (calibration.apply_temperatures(raw, calibration.temperatures_of(record))
               if record else raw)
  out_dir = os.path.dirname(os.path.abspath(output))
  os.makedirs(out_dir, exist_ok=True)
  metrics_lib.write_submission(output, result['uids'], probs_all)
  sources = collections.Counter(s.box_source for s in studies)
  summary = {'checkpoint_step': int(step), 'predicted_studies': len(result['uids']),
             'output': output, 'boxes': boxes,
             'box_sources': {k: sources[k] for k in ('true', 'predicted', 'none') if sources[k]},
             'calibration': calibration_note}
  if boxes == 'predicted' and sources['none']:
    cli.warn(f'--boxes=predicted: the localizer found no vertebra in {sources["none"]} of the '
             f'{len(studies)} studies; they are scored on the classifier\'s answer to empty crops')
  keep = result['labelled']
  if keep.any():
    labels, probs = result['labels'][keep], probs_all[keep]
    summary.update(metrics_lib.report(labels, probs, threshold))
    if record:
      summary['uncalibrated_rsna_score'] = metrics_lib.rsna_score(labels, raw[keep])
      summary['uncalibrated_ece'] = calibration.expected_calibration_error(raw[keep], labels)
      fitted = set(record.get('fitted_on', {}).get('uids') or ())
      scored = [u for u, k in zip(result['uids'], keep) if k]
      overlap = sum(u in fitted for u in scored)
      summary['calibration_fitted_on_scored_studies'] = overlap
      if overlap:
        cli.warn(f'{overlap} of the {len(scored)} scored studies are ones {calibration.FILE} was '
                 'fitted on: this is not a held-out score')
    curves = []
    for i, name in enumerate(constants.TARGETS):
      fpr, tpr = metrics_lib.roc_curve(labels[:, i], probs[:, i])
      curves.append((name, fpr, tpr, summary[f'auc_{name}']))
    stem = os.path.splitext(os.path.abspath(output))[0]
    plots.roc_png(stem + '_roc.png', curves,
                  title=f'{os.path.basename(workdir.rstrip("/"))} step {step}: '
                        f'RSNA {summary["rsna_score"]:.4f}')
    summary['roc_png'] = stem + '_roc.png'
    with open(stem + '_metrics.json', 'w') as f:
      json.dump({k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                 for k, v in summary.items()}, f, indent=2)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  summary = run(FLAGS.workdir, FLAGS.data, FLAGS.checkpoint, FLAGS.output, FLAGS.threshold,
                FLAGS.split, FLAGS.boxes, FLAGS.calibrate)
  for k, v in summary.items():
    print(f'{k}: {v:.4f}' if isinstance(v, float) else f'{k}: {v}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
