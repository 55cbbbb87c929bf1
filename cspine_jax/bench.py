"""Benchmarks, one subcommand each; the last line printed is a JSON object.

  python -m cspine_jax.bench pipeline --config=configs/bench_cpu.py \
      [--config.data.root=DIR] [--compare_monai] [--workers=2] [--batches=12] [--repeats=2]

``pipeline``: training crops/s, batches/s and peak memory of ``cspine_jax.data`` (threads over
TensorStore), and with ``--compare_monai`` of the loader a PyTorch user would write today
(MONAI ``LoadImaged`` of NIfTI copies of the same volumes, crop around the same box, resize,
the same augmentations and windows, ``torch.utils.data.DataLoader`` with ``--workers``
worker processes; ours gets ``--workers`` reader threads: equal cores). Without a
``data.root`` a synthetic converted dataset of CT-sized volumes is written to ``--bench_dir``
first (reused on later runs). Each loader runs in its own spawned process; memory is sampled
over that process and its children (sum of RSS, and of PSS, which counts shared pages once).
The benchmark itself: ``cspine_jax/benchmarks/pipeline.py``.

``step``: the jitted train step of the config against vit-pytorch
(``cspine_jax/benchmarks/step.py``; ``--steps``, ``--warmup``, ``--compare_torch``).

``accelerator``: per config (``--accelerator_configs``, default vit_b2, vertebra, localizer) the
train step on the devices alone and fed by the input pipeline (input-bound or not), MFU against
the chip's peak, peak device memory, and the host's crops/s on all its cores
(``cspine_jax/benchmarks/accelerator.py``; ``--tiny`` for a CPU check; ``--batches`` host
batches, ``--steps``, ``--warmup``; ``--config.data.root`` or synthetic real-sized studies).

  python -m cspine_jax.bench accelerator

This module is only the command. Spawned benchmark processes re-run it as ``__mp_main__``, so it
imports each benchmark inside its subcommand: a pipeline loader process must not load JAX and
the models, nor the torch process of ``step`` TensorStore.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from cspine_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'data', 'config.py') + ':experiment'
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config (the pipeline uses .data; default: the data '
    'defaults alone).', lock_config=True)
_BATCHES = flags.DEFINE_integer('batches', 12, 'Timed batches per loader (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed batches (pipeline) or steps (step) first.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Cores per loader: our reader threads and the '
                                'DataLoader worker processes (default: data.num_threads).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Batch size (default: the config\'s).')
_CACHE = flags.DEFINE_integer('cache_mb', None, 'TensorStore cache (default: data.cache_mb). '
                              'Keep it below the bench studies\' total crop size, or repeated '
                              'visits of a few studies hit a cache that 2,000 would not.')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Alternating rounds over the loaders; reports the '
                                'best crops/s (and median CPU-s/crop) of each.')
_COMPARE = flags.DEFINE_bool('compare_monai', False, 'Also run the MONAI/PyTorch loader.')
_COMPARE_PATHS = flags.DEFINE_bool(
    'compare_paths', False, 'pipeline: also read the same crops from the full-resolution volume '
    '(data.levels=False, the path before derived levels), from the levels on the host, and, for '
    "region crops, as device blocks (data.crop_on='device'); CPU-s per crop side by side.")
_FORMATS = flags.DEFINE_list('monai_formats', ['nii.gz', 'nii'], 'NIfTI copies to compare on.')
_BENCH_DIR = flags.DEFINE_string('bench_dir', '/tmp/cspine_bench', 'Synthetic data and NIfTIs.')
_STUDIES = flags.DEFINE_integer('bench_studies', 8, 'Synthetic studies (no data.root).')
_SHAPE = flags.DEFINE_list('bench_shape', ['300', '512', '512'], 'Synthetic volume (z,y,x).')
_SPACING = flags.DEFINE_list('bench_spacing', ['0.7', '0.35', '0.35'], 'Synthetic mm (z,y,x).')
_STEPS = flags.DEFINE_integer('steps', 10, 'step: timed train steps (after --warmup).')
_COMPARE_TORCH = flags.DEFINE_bool('compare_torch', False, 'step: also time vit-pytorch.')
_ACCEL_CONFIGS = flags.DEFINE_list('accelerator_configs', ['vit_b2', 'vertebra', 'localizer'],
                                   'accelerator: the configs/ to measure.')
_TINY = flags.DEFINE_bool('tiny', False, 'accelerator: tiny models and crops (a CPU check).')


def _pipeline(config) -> str:
  from cspine_jax.benchmarks import pipeline  # deferred: spawned processes re-run this module
  result = pipeline.bench_pipeline(
      config, batches=_BATCHES.value, warmup=_WARMUP.value, workers=_WORKERS.value,
      batch_size=_BATCH.value, cache_mb=_CACHE.value, repeats=_REPEATS.value,
      compare_monai=_COMPARE.value, monai_formats=_FORMATS.value,
      compare_paths=_COMPARE_PATHS.value, bench_dir=_BENCH_DIR.value,
      bench_studies=_STUDIES.value, bench_shape=_SHAPE.value, bench_spacing=_SPACING.value)
  return json.dumps(result)


def _step(config) -> str:
  from cspine_jax.benchmarks import step  # deferred: spawned processes re-run this module
  result = step.run(config, steps=_STEPS.value, warmup=_WARMUP.value,
                    compare_torch=_COMPARE_TORCH.value)
  return step.report(result)  # human lines, JSON on the last line


def _accelerator(config) -> str:
  from cspine_jax.benchmarks import accelerator  # deferred: as above
  result = accelerator.run(
      _ACCEL_CONFIGS.value, steps=_STEPS.value, warmup=_WARMUP.value, tiny=_TINY.value,
      root=config.data.get('root', ''), bench_dir=_BENCH_DIR.value, bench_studies=_STUDIES.value,
      bench_shape=_SHAPE.value, bench_spacing=_SPACING.value, host_batches=_BATCHES.value,
      batch_size=_BATCH.value)
  return accelerator.report(result)  # human lines, JSON on the last line


_COMMANDS = {'pipeline': _pipeline, 'step': _step, 'accelerator': _accelerator}


def main(argv):
  if len(argv) != 2 or argv[1] not in _COMMANDS:
    raise app.UsageError('usage: python -m cspine_jax.bench {pipeline|step|accelerator} '
                         '--config=...')
  print(_COMMANDS[argv[1]](_CONFIG.value), flush=True)


if __name__ == '__main__':
  cli.run(main)
