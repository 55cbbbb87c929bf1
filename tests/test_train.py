"""Training: metrics and checkpoints, exact resume after kill -9, one vs two processes, the NaN
guard, config errors, eval on a checkpoint."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cspine_jax import calibrate
from cspine_jax import calibration
from cspine_jax import constants
from cspine_jax import eval as eval_lib
from cspine_jax import metrics
from cspine_jax import train_loop
from cspine_jax.data import pipeline
from tests.conftest import repo_root


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'loss' in rec:
        out[rec['step']] = rec['loss']
  return out


def _train_cmd(root, workdir, *extra):
  return [sys.executable, '-m', 'cspine_jax.train', '--config=configs/smoke.py',
          f'--workdir={workdir}', f'--config.data.root={root}', '--noprogress', *extra]


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = repo_root()
  return env


def test_smoke_run_writes_metrics_checkpoints_and_eval(smoke_config, tmp_path):
  workdir = str(tmp_path / 'w')
  last = train_loop.train_and_evaluate(smoke_config, workdir, progress=False)
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [l['step'] for l in lines if 'loss' in l]
  assert steps == [1, 2, 3, 4, 5, 6]
  for l in lines:
    if 'loss' in l:
      assert {'loss', 'learning_rate', 'grad_norm', 'samples_per_s'} <= set(l)
      assert np.isfinite(l['loss']) and l['loss'] > 0
  assert any('eval_rsna_score' in l for l in lines)
  assert 'eval_rsna_score' in last
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['total_steps'] == 6 and saved['data']['root'] == smoke_config.data.root
  # Warm-up then cosine: lr rises, then falls.
  lrs = [l['learning_rate'] for l in lines if 'loss' in l]
  assert lrs[0] == 0 and lrs[2] == pytest.approx(3e-4) and lrs[-1] < lrs[2]

  out = str(tmp_path / 'sub.csv')
  summary = eval_lib.run(workdir, smoke_config.data.root, 'latest', out)
  rows = open(out).read().splitlines()
  assert rows[0] == 'row_id,fractured'
  assert len(rows) == 1 + 8 * 11  # every study (10 train + 1 test), 8 targets each
  assert summary['checkpoint_step'] == 6 and summary['scored_studies'] == 10
  assert os.path.exists(summary['roc_png'])
  # The file scorer agrees with the in-memory report.
  raw = os.path.dirname(smoke_config.data.root) + '/rsna'
  assert metrics.score_files(os.path.join(raw, 'train.csv'), out)['rsna_score'] == pytest.approx(
      summary['rsna_score'], abs=1e-5)
  assert 0 <= summary['ece'] <= 1 and summary['calibration'].startswith('none')

  # Calibration, fitted on the run's validation fold (data.fold=0 of 4: 3 of the 10 studies)...
  record = calibrate.run(workdir)
  fitted = record['fitted_on']
  assert fitted['studies'] == 3 and fitted['fold'] == 0 and record['checkpoint_step'] == 6
  assert set(fitted['uids']) == {s.uid for s in pipeline.split_studies(smoke_config, 'eval')}
  assert all(t > 0 for t in record['temperatures'].values())
  # ... and applied by eval: with temperatures set by hand, the written probabilities are the
  # uncalibrated ones scaled, and the summary reports both scores and the ECE.
  temps = dict(zip(constants.TARGETS, [0.5, 2.0, 1.0, 3.0, 1.0, 1.0, 0.25, 1.0]))
  calibration.save(workdir, {**record, 'temperatures': temps})
  out_cal = str(tmp_path / 'sub_cal.csv')
  cal = eval_lib.run(workdir, smoke_config.data.root, 'latest', out_cal)
  before, after = metrics.read_submission(out), metrics.read_submission(out_cal)
  uids = sorted(before)
  want = calibration.apply_temperatures(np.stack([before[u] for u in uids]), list(temps.values()))
  np.testing.assert_allclose(np.stack([after[u] for u in uids]), want, atol=2e-5)
  assert cal['calibration'] == calibration.path(workdir)
  assert cal['uncalibrated_rsna_score'] == pytest.approx(summary['rsna_score'], abs=1e-6)
  assert cal['uncalibrated_ece'] == pytest.approx(summary['ece'], abs=1e-6)
  assert cal['rsna_score'] == pytest.approx(metrics.score_files(os.path.join(raw, 'train.csv'),
                                                                out_cal)['rsna_score'], abs=1e-5)
  # The 3 validation studies are among the 10 scored here: said, not hidden.
  assert cal['calibration_fitted_on_scored_studies'] == 3
  saved = json.load(open(str(tmp_path / 'sub_cal_metrics.json')))
  assert saved['ece'] == pytest.approx(cal['ece']) and 'ece_patient_overall' in saved
  # Fitted on another checkpoint: not applied.
  calibration.save(workdir, {**record, 'temperatures': temps, 'checkpoint_step': 3})
  only_true = eval_lib.run(workdir, smoke_config.data.root, 'latest', out_cal, split='labelled',
                           boxes='true')
  assert only_true['calibration'].startswith('not applied')
  # --boxes=true: the studies with masks only (6 of the 10), at their true boxes.
  assert only_true['scored_studies'] == 6 and only_true['box_sources'] == {'true': 6}


def test_resume_after_kill_matches_uninterrupted(synthetic_converted, tmp_path):
  root = synthetic_converted[1]
  extra = ['--config.total_steps=8', '--config.checkpoint_every_steps=2',
           '--config.eval_every_steps=0']
  ref = str(tmp_path / 'ref')
  subprocess.run(_train_cmd(root, ref, *extra), check=True, cwd=repo_root(), env=_env(),
                 capture_output=True)
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(_train_cmd(root, killed, *extra), cwd=repo_root(), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  ckpt = os.path.join(killed, 'checkpoints', '4')
  while time.time() < deadline and not os.path.isdir(ckpt) and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = _losses(killed)
  assert max(done_before) < 8, 'the run finished before it could be killed'
  out = subprocess.run(_train_cmd(root, killed, *extra), check=True, cwd=repo_root(),
                       env=_env(), capture_output=True, text=True)
  assert 'resuming from step' in out.stdout
  resumed, reference = _losses(killed), _losses(ref)
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _step_metrics(workdir, keys=('loss', 'grad_norm', 'param_norm')):
  """{step: {key: value}} of the training lines of metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'loss' in rec:
        out[rec['step']] = {k: rec[k] for k in keys}
  return out


def test_two_processes_match_one_process(synthetic_converted, tmp_path):
  """One process with 2 devices and two processes with 1 each take the same steps.

  The smoke config alone would prove little: its zero-init head makes the first losses a
  function of the head bias only, its warm-up starts at lr 0 (step 1 moves nothing), and Adam
  divides out any constant factor on the gradient (a mean over one process's half of the batch
  instead of the global batch would train the same). So: no warm-up, a random head, an lr that
  moves the loss, and the gradient and parameter norms compared too.
  """
  root = synthetic_converted[1]
  extra = ['--config.total_steps=3', '--config.eval_every_steps=0',
           '--config.checkpoint_every_steps=3', '--config.optimizer.warmup_steps=0',
           '--config.optimizer.lr=0.01', '--config.optimizer.schedule=constant',
           '--config.model.head_zero_init=False']
  one = str(tmp_path / 'one')
  subprocess.run(_train_cmd(root, one, *extra), check=True, cwd=repo_root(), env=_env(2),
                 capture_output=True)
  two = str(tmp_path / 'two')
  addr = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen(
      _train_cmd(root, two, *extra, f'--coordinator_address={addr}', '--num_processes=2',
                 f'--process_id={i}'), cwd=repo_root(), env=_env(1),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  a, b = _step_metrics(one), _step_metrics(two)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  # The run is not trivial: the parameters move and the loss with them; the gradient is not 0.
  assert all(a[s]['grad_norm'] > 1e-3 for s in a)
  assert abs(a[3]['param_norm'] - a[1]['param_norm']) > 1e-3
  assert abs(a[3]['loss'] - a[1]['loss']) > 1e-3 * abs(a[1]['loss']), a
  for step in a:
    for key in ('loss', 'grad_norm', 'param_norm'):
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (step, key, a, b)


def test_nan_guard_stops_before_a_bad_checkpoint(smoke_config, tmp_path, monkeypatch):
  real = pipeline.to_global
  calls = []

  def poisoned(batch, sharding):
    calls.append(1)
    if len(calls) == 3:  # the third training batch is all NaN
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return real(batch, sharding)

  monkeypatch.setattr(pipeline, 'to_global', poisoned)
  smoke_config.checkpoint_every_steps = 1
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='step 3'):
    train_loop.train_and_evaluate(smoke_config, workdir, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']


@pytest.mark.parametrize('key,value,message', [
    ('batch_size', 0, 'config.batch_size=0'),
    ('total_steps', -1, 'config.total_steps=-1'),
    ('loss', 'mse', "config.loss='mse'"),
    ('label_smoothing', 1.5, 'config.label_smoothing=1.5'),
    ('mixup_alpha', -0.2, 'config.mixup_alpha=-0.2'),
])
def test_bad_config_values_name_the_key(smoke_config, tmp_path, key, value, message):
  smoke_config[key] = value
  with pytest.raises(train_loop.ConfigError, match=message.replace('(', r'\(')):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_bad_predicted_box_rate_names_the_key(smoke_config, tmp_path):
  smoke_config.data.vertebra_predicted_box_prob = 1.5
  with pytest.raises(train_loop.ConfigError, match=r'config.data.vertebra_predicted_box_prob=1.5'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_negative_box_jitter_names_the_key(smoke_config, tmp_path):
  smoke_config.data.vertebra_box_jitter_mm = -1.0
  with pytest.raises(train_loop.ConfigError, match=r'config.data.vertebra_box_jitter_mm=-1.0'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_missing_dataset_is_a_clear_error(smoke_config, tmp_path):
  smoke_config.data.root = str(tmp_path / 'nothing')
  with pytest.raises(train_loop.ConfigError, match='no manifest.jsonl'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_negative_fov_cut_names_the_key(smoke_config, tmp_path):
  smoke_config.data.augment.fov_cut_mm = (10.0, -5.0)
  with pytest.raises(train_loop.ConfigError, match=r'config.data.augment.fov_cut_mm'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)
