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
  flags.mark_flags_as_required(['workdir', 'data'])


def run(workdir: str, data: str, checkpoint: str, output: str, threshold: float = 0.5,
        split: str = 'all') -> dict:
  data = store.dataset(data, '--data')
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    raise cli.UsageError(f'--workdir={workdir}: not a training workdir (no config.json)')
  if split not in SPLITS:
    raise cli.UsageError(f'--split={split!r}: expected one of {", ".join(SPLITS)}')
  mesh = parallel.make_mesh()
  model = restore.InferenceModel(workdir, checkpoint, mesh, expect='classifier')
  config, step = model.config, model.step
  config.data.root = data
  uids = None
  if split == 'labelled_with_boxes':
    uids = [s.uid for s in manifest.load_manifest(config.data.root)
            if s.labels is not None and s.split != 'test' and s.boxes]
    if not uids:
      raise cli.UsageError(f'--data={data}: no labelled study with vertebra boxes')
    split = 'all'
  elif not pipeline.split_studies(config, split):
    # Caught before any model runs (an empty split used to end in a numpy traceback).
    raise cli.UsageError(f'--data={data}: no converted study in --split={split} (the manifest '
                         f'lists {len(manifest.load_manifest(config.data.root))} ok studies)')
  result = evaluate.evaluate(config, lambda x: model('probs', x), mesh, split=split, uids=uids)
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
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  summary = run(FLAGS.workdir, FLAGS.data, FLAGS.checkpoint, FLAGS.output, FLAGS.threshold,
                FLAGS.split)
  for k, v in summary.items():
    print(f'{k}: {v:.4f}' if isinstance(v, float) else f'{k}: {v}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
