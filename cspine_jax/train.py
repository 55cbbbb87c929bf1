r"""Trains a model on a converted dataset, on one device or many hosts.

  python -m cspine_jax.train --config=configs/vit_b2.py --workdir=runs/vit_b2 \
      --config.data.root=/data/cspine

Running the same command again resumes from the latest checkpoint (parameters, optimizer, step,
RNG and the input iterator), so a killed run continues exactly where it stopped; a rerun with a
changed model, optimizer or data key is refused before anything is written (only the length,
intervals and data location may change: train_loop.RESUMABLE_KEYS), and a damaged latest
checkpoint is moved aside with a warning and the previous one resumed. Errors end the command
with one `error:` line, exit 2 for a bad flag or config (cspine_jax/cli.py). Several hosts:
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on each (or
--distributed_auto on a cluster JAX can detect). Writes, in --workdir:
  config.json          the resolved config
  metrics.jsonl        one JSON object per logged step (step, loss, learning_rate, grad_norm,
                       samples_per_s, ...) and per evaluation (eval_* keys)
  tensorboard/         TensorBoard event files of the same
  checkpoints/<step>/  Orbax checkpoints: latest N and best N by eval RSNA score
"""
from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from cspine_jax import cli
from cspine_jax import parallel
from cspine_jax import train_loop

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output folder (checkpoints, metrics); reruns resume.')
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (multi-host).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
  flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')
  flags.DEFINE_bool('distributed_auto', False, 'Let JAX detect the cluster (SLURM, TPU, ...).')
  flags.DEFINE_bool('progress', True, 'Show a progress bar (process 0).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                      auto=FLAGS.distributed_auto)
  train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
