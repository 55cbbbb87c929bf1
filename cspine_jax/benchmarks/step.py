"""`python -m cspine_jax.bench step --config=configs/bench_cpu.py [--compare_torch]`.

Times the real jitted train step of a config (the one `cspine_jax.train` runs: forward, loss,
backward, clipping, AdamW, donated state) on random inputs of the configured shape, over all local
devices. Reports samples/s, step time, FLOPs per step (XLA's cost analysis of that compiled step;
the closed-form count beside it), MFU against the machine's measured matmul peak (same dtype as the
model's compute), and peak RSS. With ``--compare_torch``, vit-pytorch's `vit_3d.ViT` of the same
shape (same batch, BCE, AdamW, all cores) is timed in a spawned process in the same run, and the
ratio is reported: the machine is shared and noisy, so only side-by-side ratios mean much.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import resource
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cspine_jax import device_crop
from cspine_jax import parallel
from cspine_jax import train_lib
from cspine_jax.benchmarks import flops
from cspine_jax.data import config as data_config
from cspine_jax.data import device_blocks
from cspine_jax.models import factory


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_step(config, steps: int = 10, warmup: int = 2) -> dict:
  mesh = parallel.make_mesh()
  task = factory.check(config)
  graphdef = nnx.graphdef(factory.abstract_model(config))
  state = jax.jit(train_lib.init_fn(config), out_shardings=parallel.replicated(mesh))()
  step_fn = jax.jit(train_lib.make_train_step(config, graphdef), donate_argnums=(0,))
  b = int(config.batch_size)
  shape = factory.crop_shape(config)
  channels = int(config.model.get('in_channels', 1))
  if task.crops > 1:
    shape = (task.crops,) + shape
  rng = np.random.default_rng(0)
  host = {'image': rng.random((b,) + shape + (channels,), np.float32),
          'labels': (rng.random((b, 8)) < 0.3).astype(np.float32),
          'mask': np.ones((b,), bool)}
  if device_crop.for_config(config) is not None:
    host.update(_device_block_batch(config, b, rng))  # the step makes the images itself
    del host['image']
  if task.segmentation:  # the localizer: a label per voxel
    host['segmentation'] = rng.integers(0, 8, (b,) + shape, dtype=np.uint8)
    host['has_segmentation'] = np.ones((b,), bool)
  batch = jax.device_put(host, parallel.batch_sharding(mesh))
  compiled = step_fn.lower(state, batch, None).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', 0.0)) if cost else 0.0
  try:
    analytic = float(flops.analytic_train_flops(config.model, b))
  except Exception:  # pylint: disable=broad-except  (e.g. a model the formula does not cover)
    analytic = float('nan')
  # scan_layers: XLA counts a loop body once, so the closed form is the honest number.
  step_flops = analytic if config.model.get('scan_layers') else xla_flops
  for _ in range(warmup):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  dtype = jnp.dtype(config.model.get('dtype', 'float32'))
  peak = flops.measure_matmul_peak(dtype)
  return {
      'samples_per_s': b / step_s,
      'step_s': step_s,
      'step_s_min': float(np.min(times)),
      'flops_per_step': step_flops,
      'flops_per_step_xla': xla_flops,
      'flops_per_step_analytic': analytic,
      'matmul_peak_flops': peak,
      'mfu': step_flops / step_s / peak,
      'peak_rss_mib': _peak_rss_mib(),
      'devices': jax.device_count(),
      'platform': jax.devices()[0].platform,
      'batch_size': b,
      'dtype': str(dtype),
  }


def _device_block_batch(config, b: int, rng: np.random.Generator) -> dict:
  """data.crop_on='device' inputs: random int16 blocks, each crop centred in its block."""
  cfg = data_config.resolve(config)
  block = device_blocks.block_shape(cfg)
  out = np.asarray(cfg.input_shape, float)
  affine = np.zeros((3, 4), np.float32)
  affine[:, :3] = np.diag(np.asarray(cfg.spacing_mm) / device_blocks.level_mm())
  affine[:, 3] = (np.asarray(block) - 1) / 2 - affine[:, :3] @ ((out - 1) / 2)
  return {'block': rng.integers(-1000, 1500, (b,) + block, dtype=np.int16),
          'affine': np.repeat(affine[None], b, 0),
          'intensity': np.tile(np.float32([1.0, 0.0, 10.0]), (b, 1)),
          'noise_seed': np.arange(b, dtype=np.uint32)}


def _vit_pytorch_3d():
  """vit_pytorch/vit_3d.py loaded by path: the package __init__ imports torchvision."""
  spec = importlib.util.find_spec('vit_pytorch')
  path = os.path.join(spec.submodule_search_locations[0], 'vit_3d.py')
  module_spec = importlib.util.spec_from_file_location('vit_pytorch_vit_3d', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _torch_worker(model_cfg: dict, batch: int, lr: float, steps: int, warmup: int, queue):
  import torch  # deferred: optional heavy dependency (bench only), in the torch process only
  torch.set_num_threads(os.cpu_count() or 1)
  z, y, x = model_cfg['input_shape']
  pz, py, px = model_cfg['patch_size']
  if y != x or py != px:
    raise ValueError('vit_pytorch ViT 3D needs square slices and patches')
  vit = _vit_pytorch_3d().ViT(
      image_size=y, image_patch_size=py, frames=z, frame_patch_size=pz, num_classes=8,
      dim=model_cfg['width'], depth=model_cfg['depth'], heads=model_cfg['num_heads'],
      mlp_dim=model_cfg['mlp_dim'], channels=model_cfg.get('in_channels', 1),
      dim_head=model_cfg.get('head_dim') or model_cfg['width'] // model_cfg['num_heads'])
  opt = torch.optim.AdamW(vit.parameters(), lr=lr)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  images = torch.rand(batch, model_cfg.get('in_channels', 1), z, y, x)  # (B, C, frames, H, W)
  labels = (torch.rand(batch, 8) < 0.3).float()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(vit(images), labels)
    loss.backward()
    opt.step()
    return float(loss)

  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  queue.put({'torch_step_s': float(np.median(times)), 'torch_version': torch.__version__,
             'torch_threads': torch.get_num_threads(), 'torch_peak_rss_mib': _peak_rss_mib()})


def bench_torch(config, steps: int = 10, warmup: int = 2) -> dict:
  model_cfg = config.model.to_dict()
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  proc = ctx.Process(target=_torch_worker, args=(model_cfg, int(config.batch_size),
                                                 float(config.optimizer.lr), steps, warmup,
                                                 queue))
  proc.start()
  result = queue.get(timeout=3600)
  proc.join()
  result['torch_samples_per_s'] = int(config.batch_size) / result['torch_step_s']
  return result


def run(config, steps: int, warmup: int, compare_torch: bool) -> dict:
  result = {}
  if compare_torch:  # first, in its own process, before JAX takes the cores
    result.update(bench_torch(config, steps, warmup))
  result.update(bench_step(config, steps, warmup))
  if compare_torch:
    result['speedup_vs_torch'] = result['samples_per_s'] / result['torch_samples_per_s']
  return result


def report(result: dict) -> str:
  lines = [f'jax step: {result["step_s"] * 1e3:.1f} ms, {result["samples_per_s"]:.2f} samples/s, '
           f'{result["flops_per_step"] / 1e9:.1f} GFLOP/step, MFU {result["mfu"]:.1%} of '
           f'{result["matmul_peak_flops"] / 1e9:.0f} GFLOP/s measured {result["dtype"]} matmul '
           f'peak, peak RSS {result["peak_rss_mib"]:.0f} MiB']
  if 'torch_step_s' in result:
    lines.append(f'vit-pytorch ViT 3D (torch {result["torch_version"]}, '
                 f'{result["torch_threads"]} threads): {result["torch_step_s"] * 1e3:.1f} ms, '
                 f'{result["torch_samples_per_s"]:.2f} samples/s -> jax/torch = '
                 f'{result["speedup_vs_torch"]:.2f}x')
  lines.append(json.dumps(result))
  return '\n'.join(lines)
