r"""The main job end to end on the built-in synthetic data (the README's first command).

  python -m cspine_jax.demo --workdir=demo_out

Stages (data stages resumable; rerunning skips what is done):
  1. data_tools.synthetic: RSNA-shaped training studies and a held-out set (another seed)
  2. data_tools.convert:   both into TensorStore volumes + manifest, and a summary of each
  3. cspine_jax.train configs/localizer_coarse.py, then configs/localizer.py (coarse to fine)
     on the segmented studies, the held-out Dice, then
     data_tools.localize: predicted masks and vertebra boxes for every study of both sets
     (--notwo_stage skips this stage)
  4. cspine_jax.train:     configs/demo.py (the best per-vertebra classifier measured, the 3D
                           CNN of configs/cnn_vertebra.py) on every labelled training study
                           with vertebra boxes (true, else predicted)
  5. cspine_jax.calibrate, with --calibrate only: stage 4 then trains on folds 1-4 and
                           per-target temperatures are fitted on fold 0 (the validation fold,
                           ~10 studies, at the localizer's boxes) -> run/calibration.json; the
                           held-out set fits and chooses nothing. Off by default: on its own
                           validation fold the fit did not lower the ECE (0.075 -> 0.078) at 48
                           studies (README)
  6. cspine_jax.eval:      every held-out study at the localizer's boxes (the two-stage score) ->
                           submission.csv, RSNA score, AUCs, ECE, ROC curves, beside the
                           constant-prevalence baseline; then the held-out studies with masks at
                           their true boxes, beside the same studies at the predicted ones, so
                           the line shows which stage limits the result (--notwo_stage: the
                           studies with masks, at their true boxes, only)
Takes ~55 minutes on 2 CPU cores (data ~1.5, localizer ~24 + ~20 for its two passes, classifier
~6; --notwo_stage ~7).
"""
from __future__ import annotations

import collections
import os
import sys
import time

from absl import flags
import numpy as np

from configs import demo as demo_config
from configs import localizer as localizer_config
from configs import localizer_coarse as localizer_coarse_config
from cspine_jax import calibrate as calibrate_lib
from cspine_jax import cli
from cspine_jax import constants
from cspine_jax import eval as eval_lib
from cspine_jax import evaluate
from cspine_jax import localize_lib
from cspine_jax import metrics
from cspine_jax import parallel
from cspine_jax import seg_metrics
from cspine_jax import train_loop
from cspine_jax.data import store
from data_tools import convert
from data_tools import synthetic

FLAGS = flags.FLAGS


def summarize(converted: str) -> dict:
  """A few lines a user can check at a glance."""
  records = store.read_manifest(converted)
  ok = [r for r in records if r['status'] == 'ok']
  labelled = [r for r in ok if r.get('labels') is not None]
  positives = collections.Counter()
  for r in labelled:
    for name, value in zip(constants.TARGETS, r['labels']):
      positives[name] += value
  return {
      'studies': len(records),
      'ok': len(ok),
      'failed': len(records) - len(ok),
      'slices': sum(r['source_slices'] for r in ok),
      'with_segmentation': sum(r['has_segmentation'] for r in ok),
      'labelled': len(labelled),
      'positives': dict(positives),
      'transfer_syntaxes': dict(collections.Counter(
          t for r in ok for t in r['transfer_syntaxes'])),
      'spacing_mm_range': [[min(r['spacing_mm'][i] for r in ok), max(r['spacing_mm'][i] for r in ok)]
                           for i in range(3)] if ok else [],
      'warnings': sum(len(r['warnings']) for r in records),
  }


def _print_summary(name: str, s: dict) -> None:
  print(f'== {name}: {s["ok"]}/{s["studies"]} studies converted ({s["slices"]} slices), '
        f'{s["with_segmentation"]} with vertebra masks, {s["failed"]} failed, '
        f'{s["warnings"]} warnings')
  if s['labelled']:
    rates = ', '.join(f'{k} {s["positives"].get(k, 0)}' for k in constants.TARGETS)
    print(f'   positives of {s["labelled"]} labelled: {rates}')
  print(f'   transfer syntaxes: {s["transfer_syntaxes"]}')
  print(f'   spacing (dz, dy, dx) ranges mm: {s["spacing_mm_range"]}')


def prepare_data(workdir: str, studies: int, heldout: int, size: int, seed: int,
                 workers: int) -> dict[str, str]:
  """Generates and converts the training and held-out synthetic sets; returns their roots."""
  roots = {}
  for name, n, s in (('train', studies, seed), ('heldout', heldout, seed + 1000)):
    raw = os.path.join(workdir, f'rsna_{name}')
    done = os.path.join(raw, 'train.csv')
    if not os.path.exists(done):
      print(f'[demo] generating {n} synthetic studies ({size}x{size}) -> {raw}', flush=True)
      synthetic.generate(raw, n, size, seed=s, test_studies=0 if name == 'heldout' else 1,
                         seg_fraction=0.6, workers=workers)
    out = os.path.join(workdir, f'converted_{name}')
    print(f'[demo] converting -> {out}', flush=True)
    records = convert.run(raw, out, workers, progress=False)
    failed = [r for r in records if r['status'] != 'ok']
    if failed:
      raise RuntimeError(f'{len(failed)} synthetic studies failed to convert: {failed[0]}')
    roots[name] = out
  return roots


def define_flags():
  flags.DEFINE_string('workdir', 'demo_out', 'Where everything is written.')
  flags.DEFINE_integer('studies', 48, 'Synthetic training studies.')
  flags.DEFINE_integer('heldout', 24, 'Synthetic held-out studies (another seed).')
  flags.DEFINE_integer('size', 64, 'Slice size of the synthetic studies.')
  flags.DEFINE_integer('seed', 0, 'Seed of the synthetic data.')
  flags.DEFINE_integer('workers', 0, 'Processes for generation and conversion (0: all cores).')
  flags.DEFINE_integer('steps', None, 'Override the demo config\'s total_steps.')
  flags.DEFINE_integer('localizer_steps', None, 'Override total_steps of both localizer passes '
                       '(configs/localizer_coarse.py, configs/localizer.py).')
  # On by default: with the localizer's boxes (held-out Dice 0.91) the classifier trains and is
  # scored on every study (README "Measured"), as it would be on new scans, which have no masks.
  # --notwo_stage skips the localizer (~36 minutes shorter).
  flags.DEFINE_bool('two_stage', True, 'Train the localizer and localize every study first; '
                    'without it the classifier uses only the studies that have true masks.')
  flags.DEFINE_bool('train', True, 'Run the training and evaluation stages.')
  # Off by default: with --calibrate the classifier trains on folds 1-4 and is calibrated on
  # fold 0. Decided on that validation fold: 10 studies (0-1 positives of a rare vertebra) could
  # not fit the temperatures (its own ECE 0.075 -> 0.078, C3's 0.064 -> 0.156, one draw), and
  # the studies held out for it are a fifth of the training set (README "The two commands").
  flags.DEFINE_bool('calibrate', False, 'Hold out fold 0 of the training studies and fit the '
                    'per-target temperatures there; without it the classifier trains on every '
                    'training study, uncalibrated.')


def main(argv):
  del argv
  workers = FLAGS.workers or os.cpu_count() or 1
  os.makedirs(FLAGS.workdir, exist_ok=True)
  roots = prepare_data(FLAGS.workdir, FLAGS.studies, FLAGS.heldout, FLAGS.size, FLAGS.seed,
                       workers)
  for name, root in roots.items():
    _print_summary(name, summarize(root))
  sys.stdout.flush()
  if FLAGS.train:
    if FLAGS.two_stage:
      localize(FLAGS.workdir, roots, FLAGS.localizer_steps)
    train_and_score(FLAGS.workdir, roots, FLAGS.steps, two_stage=FLAGS.two_stage,
                    calibrate=FLAGS.calibrate)


def _train_localizer(name: str, config, run_dir: str) -> float:
  print(f'[demo] training configs/{name}.py for {config.total_steps} steps -> {run_dir}',
        flush=True)
  start = time.time()
  train_loop.train_and_evaluate(config, run_dir, progress=True)
  return time.time() - start


def localize(workdir: str, roots: dict[str, str], steps: int | None) -> dict:
  """Trains the two localizer passes, scores them on the held-out masks, localizes every study
  of both sets."""
  coarse = localizer_coarse_config.get_config()
  config = localizer_config.get_config()
  coarse_dir = os.path.join(workdir, 'localizer_coarse')
  run_dir = os.path.join(workdir, 'localizer')
  for c in (coarse, config):
    c.data.root = os.path.abspath(roots['train'])
    if steps:
      c.total_steps = steps
      c.eval_every_steps = steps
  config.localizer.coarse_workdir = os.path.abspath(coarse_dir)
  train_s = _train_localizer('localizer_coarse', coarse, coarse_dir)
  train_s += _train_localizer('localizer', config, run_dir)
  mesh = parallel.make_mesh()
  model = localize_lib.load(run_dir, 'latest', mesh).model
  config = model.config
  config.data.root = os.path.abspath(roots['heldout'])
  config.data.fold = -1  # every held-out study with a mask ('train' of fold -1 = all labelled)
  # The fine pass alone, its crop centred on the true masks (the coarse pass's error is in the
  # full-grid Dice below).
  result = evaluate.evaluate_segmentation(config, lambda x: model('labels', x), mesh,
                                          split='train')
  low = seg_metrics.summarize(result['dice'])
  for name, root in roots.items():
    start = time.time()
    records = localize_lib.run(run_dir, root, progress=False)
    ok = [r for r in records if r['status'] == 'ok']
    full = sum(len(r.get('predicted_vertebra_boxes') or {}) == 7 for r in ok)
    print(f'[demo] localized {name}: {len(ok)} studies ({full} with all of C1-C7) in '
          f'{time.time() - start:.0f} s', flush=True)
  # The number that matters: the written masks against the true ones on the volumes' own grids.
  dice = localize_lib.full_grid_dice(roots['heldout']) or {
      'studies': 0, 'dice_mean': float('nan'), **{'dice_' + v: float('nan')
                                                   for v in constants.VERTEBRAE}}
  print(f'== localizer: held-out Dice on {dice["studies"]} segmented studies (full grid): mean '
        f'{dice["dice_mean"]:.3f}; ' +
        ', '.join(f'{v} {dice["dice_" + v]:.2f}' for v in constants.VERTEBRAE) +
        f' (fine pass on its own {"x".join(map(str, config.data.input_shape))} grid, centred '
        f'on the true boxes: {low["dice_mean"]:.3f}); both passes trained in '
        f'{train_s / 60:.1f} min', flush=True)
  return dice


def _prevalence(converted: str) -> np.ndarray:
  """Positive rates of the labelled studies the classifier trains on (those with boxes)."""
  labels = [r['labels'] for r in store.read_manifest(converted) if r['status'] == 'ok' and r.get('labels') is not None
            and (r.get('vertebra_boxes') or r.get('predicted_vertebra_boxes'))]
  return np.clip(np.mean(labels, axis=0), 0.01, 0.99)


def train_and_score(workdir: str, roots: dict[str, str], steps: int | None,
                    two_stage: bool = False, calibrate: bool = False) -> dict:
  """Trains configs/demo.py on every training study (``calibrate``: on folds 1-4, calibrated on
  fold 0), evaluates on the held-out
  set (predicted boxes; and true ones where masks exist), prints the scores side by side."""
  config = demo_config.get_config()
  config.data.root = os.path.abspath(roots['train'])
  if calibrate:
    config.data.fold = 0  # the validation fold the temperatures are fitted on
  if steps:
    config.total_steps = steps
  run_dir = os.path.join(workdir, 'run')
  print(f'[demo] training configs/demo.py for {config.total_steps} steps -> {run_dir}', flush=True)
  start = time.time()
  train_loop.train_and_evaluate(config, run_dir, progress=True)
  train_s = time.time() - start
  # The localizer's boxes where it ran: the condition of new scans, and of the headline score.
  boxes = 'predicted' if two_stage else 'auto'
  record = fitted = None
  if calibrate:
    try:
      record = calibrate_lib.run(run_dir, 'latest', boxes=boxes)
      fitted = (f'fold {record["fitted_on"]["fold"]} of {record["fitted_on"]["num_folds"]} of '
                f'the training studies ({record["fitted_on"]["studies"]} studies)')
      print(f'== {calibrate_lib.describe(record)}', flush=True)
    except cli.UsageError as e:  # e.g. --studies so small that the validation fold is empty
      cli.warn(f'no calibration: {e}')
  out = os.path.join(workdir, 'heldout_submission.csv')
  print(f'[demo] evaluating on the held-out set -> {out}', flush=True)
  # One stage: only the held-out studies with true masks can be cropped per vertebra.
  summary = eval_lib.run(run_dir, roots['heldout'], 'latest', out,
                         split='labelled' if two_stage else 'labelled_with_boxes', boxes=boxes)
  solution = metrics.read_solution(os.path.join(workdir, 'rsna_heldout', 'train.csv'))
  predicted = metrics.read_submission(out)
  # The constant baseline a user would submit: the training set's positive rates.
  prior = _prevalence(roots['train'])

  def scores(uids, probs):
    labels = np.array([solution[u] for u in uids])
    return (metrics.rsna_score(labels, np.stack([probs[u] for u in uids])),
            metrics.rsna_score(labels, np.broadcast_to(prior, labels.shape)))

  scored = sorted(predicted)
  _, baseline = scores(scored, predicted)
  where = 'predicted boxes' if two_stage else 'true boxes (studies with masks only)'
  calibrated = (f' (uncalibrated: RSNA {summary["uncalibrated_rsna_score"]:.4f}, ECE '
                f'{summary["uncalibrated_ece"]:.3f})' if 'uncalibrated_ece' in summary else '')
  print(f'== held-out: {summary["scored_studies"]} studies, {where}: RSNA '
        f'{summary["rsna_score"]:.4f} (constant {baseline:.4f}), mean AUC '
        f'{summary["auc_mean"]:.3f}, patient AUC {summary["auc_patient_overall"]:.3f}, ECE '
        f'{summary["ece"]:.3f}{calibrated}; trained {train_s / 60:.1f} min')
  result = {**summary, 'constant_baseline': baseline, 'train_minutes': train_s / 60,
            'calibration': record}
  if two_stage:
    true_out = os.path.join(workdir, 'heldout_true_boxes.csv')
    try:
      true = eval_lib.run(run_dir, roots['heldout'], 'latest', true_out, split='labelled',
                          boxes='true')
    except cli.UsageError as e:  # no held-out study with a mask
      cli.warn(f'no true-box comparison: {e}')
    else:
      masked = sorted(metrics.read_submission(true_out))
      same, masked_baseline = scores(masked, predicted)
      print(f'== held-out with true masks: {len(masked)} studies, true boxes: RSNA '
            f'{true["rsna_score"]:.4f} (mean AUC {true["auc_mean"]:.3f}, ECE {true["ece"]:.3f}) | '
            f'same {len(masked)} with predicted boxes: RSNA {same:.4f} (constant '
            f'{masked_baseline:.4f})')
      result.update(true_boxes_rsna_score=true['rsna_score'], true_boxes_studies=len(masked),
                    true_boxes_auc_mean=true['auc_mean'], same_studies_predicted_rsna_score=same)
  print(f'   patient sensitivity {summary["patient_sensitivity"]:.2f} / specificity '
        f'{summary["patient_specificity"]:.2f} at {summary["threshold"]}')
  print('   hygiene: ' + (f'calibration fitted on {fitted}, never on the held-out set'
                          if fitted else 'uncalibrated (' + (
                              'no validation fold usable)' if calibrate else
                              'trained on every training study; --calibrate holds fold 0 '
                              'out to fit temperatures)')) +
        '; the held-out set chose nothing in this run (configs/demo.py was chosen on these '
        'held-out studies earlier: README "Model comparison")')
  print(f'   files: {out}, {summary.get("roc_png")}')
  return result


if __name__ == '__main__':
  define_flags()
  cli.run(main)
