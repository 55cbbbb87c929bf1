"""Iterator state: get/set_state and an Orbax CheckpointManager round trip resume exactly."""
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cspine_jax.data import config as data_config
from cspine_jax.data import fixtures
from cspine_jax.data import pipeline


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('converted'))
  fixtures.write_synthetic_dataset(root, 7, seed=1)
  c = data_config.get_config()
  c.root = root
  c.fold = -1  # all 7 studies train: batches of 2 straddle epoch boundaries
  c.input_shape = (8, 12, 12)
  c.spacing_mm = (4.0, 4.0, 4.0)
  c.batch_size = 2
  c.num_threads = 2
  c.prefetch = 2
  return c


def _assert_same(a, b):
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_get_set_state_resumes_exactly(cfg):
  ref_it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  ref = [next(ref_it) for _ in range(9)]
  it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  fresh, _ = pipeline.make_train_iterator(cfg, 0, 1)
  fresh.set_state(state)
  for k in range(5, 9):
    _assert_same(next(fresh), ref[k])


def test_orbax_checkpoint_manager_round_trip(cfg, tmp_path):
  ref_it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  ref = [next(ref_it) for _ in range(7)]

  it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  params = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mgr:
    for step in range(4):
      next(it)
    mgr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                        data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    _assert_same(next(it), ref[4])  # saving does not disturb the running iterator

  restored_it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mgr:
    assert mgr.latest_step() == 4
    out = mgr.restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params),
        data=grain.checkpoint.CheckpointRestore(restored_it)))
  np.testing.assert_array_equal(out.state['w'], params['w'])
  for k in range(4, 7):
    _assert_same(next(out.data), ref[k])


def test_worker_processes_give_the_same_batches_and_state(cfg):
  # num_workers > 0: spawned Grain workers open TensorStore themselves (nothing is forked).
  ref_it, _ = pipeline.make_train_iterator(cfg, 0, 1)
  ref = [next(ref_it) for _ in range(5)]
  mp_cfg = cfg.copy_and_resolve_references()
  mp_cfg.num_workers = 2
  mp_cfg.num_threads = 1
  it, _ = pipeline.make_train_iterator(mp_cfg, 0, 1)
  try:
    for k in range(3):
      _assert_same(next(it), ref[k])
    state = it.get_state()
  finally:
    it.close()
  it, _ = pipeline.make_train_iterator(mp_cfg, 0, 1)
  try:
    it.set_state(state)
    for k in range(3, 5):
      _assert_same(next(it), ref[k])
  finally:
    it.close()
