"""`python -m cspine_jax.bench pipeline` runs end to end and ends with its JSON line.

MONAI is in the test extra (setup.cfg), so the comparison branch is required here, not skipped
when MONAI is missing: a skip would let a broken test install pass with the PyTorch-side loader
never run (the README's pipeline comparison rests on it). Without the test extra this test
fails and says what to install.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_pipeline_json(tmp_path):
  for module in ('monai', 'torch'):
    if importlib.util.find_spec(module) is None:
      pytest.fail(f'{module} is not installed: it is in the test extra (pip install -e ".[test]")')
  cmd = [sys.executable, '-m', 'cspine_jax.bench', 'pipeline', f'--bench_dir={tmp_path}',
         '--bench_studies=2', '--bench_shape=24,40,40', '--bench_spacing=2,1,1', '--batches=2',
         '--warmup=1', '--workers=1', '--batch_size=2', '--config.data.input_shape=(8,12,12)',
         '--config.data.spacing_mm=(4.0,4.0,4.0)', '--compare_monai', '--monai_formats=nii']
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['studies'] == 2 and result['workers'] == 1
  ours = result['ours']
  assert ours['crops_per_s'] > 0 and ours['peak_rss_mb'] > 50
  assert ours['batch_shape'] == [2, 8, 12, 12, 2]
  monai = result['monai_nii']
  assert monai['batch_shape'] == [2, 2, 12, 12, 8]  # torch layout: (batch, channel, x, y, z)
  assert monai['crops_per_s'] > 0 and monai['peak_rss_mb'] > 50
  assert result['monai_nii_speedup'] == pytest.approx(
      ours['crops_per_s'] / monai['crops_per_s'], rel=0.01, abs=0.01)
