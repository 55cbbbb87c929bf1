r"""Restores a checkpoint, predicts every study of a converted dataset, writes a Kaggle submission.

  python -m cspine_jax.eval --workdir=runs/demo --data=/data/cspine_heldout \
      [--checkpoint=latest|best|STEP] --output=submission.csv

Where the dataset has labels, also prints and saves (beside --output) the RSNA weighted log loss,
per-target ROC AUC, patient-level sensitivity and specificity at --threshold, the constant-
prevalence baseline on the same studies, and ROC curves (PNG).
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import numpy as np

from cspine_jax import constants
from cspine_jax import metrics as metrics_lib

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('data', None, 'Converted dataset (python -m data_tools.convert).')
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best (lowest eval RSNA score) or a step.')
  flags.DEFINE_string('output', 'submission.csv', 'Kaggle submission CSV to write.')
  flags.DEFINE_float('threshold', 0.5, 'Patient-level decision threshold for sens./spec.')
  flags.DEFINE_string('split', 'all', 'Which studies: all, test, labelled, eval, train, or '
                      'labelled_with_boxes (labelled studies with true or predicted vertebra '
                      'boxes: what a per-vertebra model can crop without a localizer).')
  flags.mark_flags_as_required(['workdir', 'data'])


def run(workdir: str, data: str, checkpoint: str, output: str, threshold: float = 0.5,
        split: str = 'all') -> dict:
  from cspine_jax import parallel  # pylint: disable=g-import-not-at-top
  from cspine_jax import plots  # pylint: disable=g-import-not-at-top
  from cspine_jax import train_loop  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(data, 'manifest.jsonl')):
    raise FileNotFoundError(f'--data={data}: no manifest.jsonl (run python -m data_tools.convert)')
  mesh = parallel.make_mesh()
  config, graphdef, state, step = train_loop.load_frozen_model(workdir, checkpoint, mesh)
  config.data.root = os.path.abspath(data)
  uids = None
  if split == 'labelled_with_boxes':
    from cspine_jax.data import manifest  # pylint: disable=g-import-not-at-top
    uids = [s.uid for s in manifest.load_manifest(config.data.root)
            if s.labels is not None and s.split != 'test' and s.boxes]
    if not uids:
      raise ValueError(f'--data={data}: no labelled study with vertebra boxes')
    split = 'all'
  result = train_loop.evaluate(config, graphdef, state, mesh, split=split, uids=uids)
  out_dir = os.path.dirname(os.path.abspath(output))
  os.makedirs(out_dir, exist_ok=True)
  metrics_lib.write_submission(output, result['uids'], result['probs'])
  summary = {'checkpoint_step': int(step), 'predicted_studies': len(result['uids']),
             'output': output}
  keep = result['labelled']
  if keep.any():
    labels, probs = result['labels'][keep], result['probs'][keep]
    summary.update(metrics_lib.report(labels, probs, threshold))
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
  del argv
  summary = run(FLAGS.workdir, FLAGS.data, FLAGS.checkpoint, FLAGS.output, FLAGS.threshold,
                FLAGS.split)
  for k, v in summary.items():
    print(f'{k}: {v:.4f}' if isinstance(v, float) else f'{k}: {v}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
