r"""The main job end to end on the built-in synthetic data (the README's first command).

  python -m cspine_jax.demo --workdir=demo_out

Stages (each resumable; rerunning skips what is done):
  1. data_tools.synthetic: RSNA-shaped training studies and a held-out set (another seed)
  2. data_tools.convert:   both into TensorStore volumes + manifest
  3. summary of the converted datasets
"""
from __future__ import annotations

import collections
import json
import os
import sys

from absl import app
from absl import flags

from cspine_jax import constants

FLAGS = flags.FLAGS


def summarize(converted: str) -> dict:
  """A few lines a user can check at a glance."""
  with open(os.path.join(converted, 'manifest.jsonl')) as f:
    records = [json.loads(line) for line in f]
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
  from data_tools import convert  # pylint: disable=g-import-not-at-top
  from data_tools import synthetic  # pylint: disable=g-import-not-at-top
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


def main(argv):
  del argv
  workers = FLAGS.workers or os.cpu_count() or 1
  os.makedirs(FLAGS.workdir, exist_ok=True)
  roots = prepare_data(FLAGS.workdir, FLAGS.studies, FLAGS.heldout, FLAGS.size, FLAGS.seed,
                       workers)
  for name, root in roots.items():
    _print_summary(name, summarize(root))
  sys.stdout.flush()


if __name__ == '__main__':
  define_flags()
  app.run(main)
