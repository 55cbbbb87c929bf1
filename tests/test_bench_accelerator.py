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
