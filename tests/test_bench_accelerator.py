"""`python -m cspine_jax.bench accelerator --tiny` on CPU: every figure is there and plausible."""
import json
import subprocess
import sys

import numpy as np

from cspine_jax.data import fixtures
from tests.conftest import repo_root


def test_accelerator_benchmark_runs_tiny_on_cpu(tmp_path):
  root = str(tmp_path / 'data')
  fixtures.write_synthetic_dataset(root, 4, shape=(48, 64, 64), spacing_mm=(1.0, 0.8, 0.8),
                                   seed=0)
  proc = subprocess.run(
      [sys.executable, '-m', 'cspine_jax.bench', 'accelerator', '--tiny', '--steps=2',
       '--warmup=1', '--batches=1', '--config=cspine_jax/data/config.py:experiment',
       f'--config.data.root={root}'],
      capture_output=True, text=True, check=False, cwd=repo_root())
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['benchmark'] == 'accelerator' and result['platform'] == 'cpu'
  assert set(result['configs']) == {'vit_b2', 'vertebra', 'localizer'}
  vit = result['configs']['vit_b2']
  assert vit['crop_on'] == 'device' and vit['dtype'] == 'bfloat16'
  for name, r in result['configs'].items():
    for key in ('samples_per_s', 'fed_samples_per_s', 'host_samples_per_s', 'step_s',
                'flops_per_step', 'mfu', 'host_cpu_ms_per_sample'):
      assert np.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
    assert r['peak_source'].startswith('measured')  # no data-sheet peak for a CPU
    assert isinstance(r['input_bound'], bool)
  assert 'MFU' in proc.stdout and 'samples/s' in proc.stdout


def test_step_benchmark_feeds_device_crop_configs_their_blocks():
  from cspine_jax.benchmarks import accelerator  # pylint: disable=import-outside-toplevel
  from cspine_jax.benchmarks import step  # pylint: disable=import-outside-toplevel
  config = accelerator.shrink(accelerator.load_config('vit_b2'))
  assert config.data.crop_on == 'device'
  result = step.bench_step(config, steps=1, warmup=1)
  assert result['flops_per_step'] > 0 and np.isfinite(result['step_s'])
