"""`python -m cspine_jax.bench accelerator`: is the step fed, and how fast is it, per config?

For each config (default: vit_b2 with device crops, the per-vertebra ViT, the localizer) on one
host, all its devices, a converted dataset of real-sized studies (``--config.data.root``, else
synthetic 300x512x512 volumes at 0.7 x 0.35 x 0.35 mm written once to ``--bench_dir``):

  device   the real jitted train step (device crops included) on one batch that stays on the
           devices: samples/s, step time, FLOPs (XLA's count of the compiled step), MFU against
           the device's dense peak for the model's compute dtype (``PEAK_FLOPS``, a table of known
           chips; elsewhere a measured matmul), peak device memory.
  fed      the same step fed by the input pipeline through ``DevicePrefetch``, as training runs:
           samples/s; ``input_bound`` when it is below 90% of ``device``.
  host     the input pipeline alone with every core of the host: crops/s and CPU ms per crop.

``--tiny`` shrinks every model and crop (the test runs it on CPU). JSON on the last line.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import time

from flax import nnx
import jax
import jax.numpy as jnp

from cspine_jax import parallel
from cspine_jax import train_lib
from cspine_jax.benchmarks import flops
from cspine_jax.benchmarks import pipeline as pipeline_bench
from cspine_jax.data import config as data_config
from cspine_jax.data import pipeline
from cspine_jax.models import factory

# Dense peak FLOP/s per chip, (bf16, f32), from the vendors' data sheets (SXM parts; f32 without
# TF32). Matched by substring of ``device_kind``, first match wins; None: measure a matmul.
PEAK_FLOPS = (
    ('H200', (989e12, 67e12)),
    ('H100 PCIe', (756e12, 51e12)),
    ('H100', (989e12, 67e12)),
    ('A100', (312e12, 19.5e12)),
    ('TPU v4', (275e12, None)),
    ('TPU v5 lite', (197e12, None)),
    ('TPU v5e', (197e12, None)),
    ('TPU v5p', (459e12, None)),
    ('TPU v5', (459e12, None)),
)

DEFAULT_CONFIGS = ('vit_b2', 'vertebra', 'localizer')


def device_peak(dtype) -> tuple[float, str]:
  """(peak FLOP/s of one device for ``dtype``, where it comes from)."""
  kind = jax.devices()[0].device_kind
  bf16 = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  for name, (p16, p32) in PEAK_FLOPS:
    if name in kind:
      peak = p16 if bf16 else p32
      if peak:
        return peak, f'{kind} data sheet'
  return flops.measure_matmul_peak(dtype), f'measured {jnp.dtype(dtype).name} matmul on {kind}'


def _peak_device_bytes() -> int | None:
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get('peak_bytes_in_use') for s in stats if s.get('peak_bytes_in_use') is not None]
  return max(peaks) if peaks else None


def load_config(name: str):
  """configs/<name>.py's config."""
  return importlib.import_module(f'configs.{name}').get_config()


def shrink(config):
  """A tiny version of ``config`` (CPU test): few small layers, small crops, batch 2."""
  task = factory.task_of(config)
  m = config.model
  for key, value in (('width', 32), ('depth', 1), ('num_heads', 2), ('mlp_dim', 64),
                     ('head_dim', 16)):
    if key in m and m[key] is not None:
      m[key] = value
  shape_key = task.shape_key
  small = (16, 16, 16) if task.crops == 1 else (8, 8, 8)
  config.data[shape_key] = small
  if 'patch_size' in m:
    m.patch_size = (4, 4, 4)
  if task.crops == 1 and 'spacing_mm' in config.data:
    config.data.spacing_mm = (1.25, 1.0, 1.0)
  config.batch_size = 2
  return config


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def bench_one(name: str, root: str, steps: int, warmup: int, tiny: bool,
              host_batches: int, batch_size: int | None = None) -> dict:
  config = load_config(name)
  if tiny:
    config = shrink(config)
  if batch_size:
    config.batch_size = int(batch_size)
  config.data.root = root
  config.data.fold = -1
  config.data.require_segmentation = False  # every study: the benchmark is about speed
  config.data.num_threads = os.cpu_count() or 1
  mesh = parallel.make_mesh()
  factory.check(config)  # the config is one this step can run
  graphdef = nnx.graphdef(factory.abstract_model(config))
  state = jax.jit(train_lib.init_fn(config), out_shardings=parallel.replicated(mesh))()
  step_fn = jax.jit(train_lib.make_train_step(config, graphdef), donate_argnums=(0,))
  sharding = parallel.batch_sharding(mesh)
  b = int(config.batch_size)
  out = {'config': name, 'batch_size': b, 'crop_on': data_config.resolve(config).crop_on,
         'dtype': str(jnp.dtype(config.model.get('dtype', 'float32')))}

  # Host: the pipeline alone, every core.
  it, _ = pipeline.make_train_iterator(config, 0, 1)
  first = next(it)
  cpu, t0 = _cpu_seconds(), time.perf_counter()
  for _ in range(host_batches):
    next(it)
  host_s, host_cpu = time.perf_counter() - t0, _cpu_seconds() - cpu
  # A sample is a study: one crop, seven per-vertebra crops, or the localizer's whole volume.
  out['host_samples_per_s'] = host_batches * b / host_s
  out['host_cpu_ms_per_sample'] = 1e3 * host_cpu / (host_batches * b)
  out['host_cores'] = os.cpu_count()

  # Device: one batch resident on the devices.
  batch = {k: v for k, v in pipeline.to_global(first, sharding).items()
           if isinstance(v, jax.Array)}
  compiled = step_fn.lower(state, batch, None).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step_flops = float(cost.get('flops', 0.0)) if cost else 0.0
  for _ in range(warmup):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  device_s = (time.perf_counter() - t0) / steps

  # Fed: the same step, batches from the pipeline, prefetched to the devices.
  fed_iter = pipeline.DevicePrefetch(it, sharding, int(config.data.get('device_prefetch', 2)))
  for _ in range(warmup):
    state, m = step_fn(state, next(fed_iter))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step_fn(state, next(fed_iter))
  jax.block_until_ready(m)
  fed_s = (time.perf_counter() - t0) / steps
  fed_iter.close()

  peak, peak_source = device_peak(config.model.get('dtype', 'float32'))
  devices = jax.device_count()
  out.update({
      'step_s': device_s, 'samples_per_s': b / device_s,
      'fed_step_s': fed_s, 'fed_samples_per_s': b / fed_s,
      'input_bound': bool(b / fed_s < 0.9 * b / device_s),
      'flops_per_step': step_flops,
      'mfu': step_flops / device_s / (peak * devices) if step_flops else None,
      'peak_flops_per_device': peak, 'peak_source': peak_source,
      'peak_device_memory_gib': (None if _peak_device_bytes() is None
                                 else _peak_device_bytes() / 2**30),
  })
  return out


def run(configs=DEFAULT_CONFIGS, *, steps: int = 10, warmup: int = 2, tiny: bool = False,
        root: str = '', bench_dir: str = '/tmp/cspine_bench', bench_studies: int = 8,
        bench_shape=(300, 512, 512), bench_spacing=(0.7, 0.35, 0.35),
        host_batches: int = 4, batch_size: int | None = None) -> dict:
  if not root:
    root = pipeline_bench.synthetic_root(bench_dir, bench_studies,
                                         [int(v) for v in bench_shape],
                                         [float(v) for v in bench_spacing])
  result = {'benchmark': 'accelerator', 'root': root, 'platform': jax.devices()[0].platform,
            'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count(),
            'configs': {}}
  for name in configs:
    result['configs'][name] = bench_one(name, root, steps, warmup, tiny, host_batches,
                                        batch_size)
  return result


def report(result: dict) -> str:
  lines = [f'{result["devices"]} x {result["device_kind"]} ({result["platform"]}), data '
           f'{result["root"]}']
  for name, r in result['configs'].items():
    mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else 'n/a'
    mem = (f'{r["peak_device_memory_gib"]:.1f} GiB' if r['peak_device_memory_gib'] is not None
           else 'n/a')
    lines.append(
        f'{name} ({r["dtype"]}, batch {r["batch_size"]}, crops on {r["crop_on"]}): step '
        f'{r["step_s"] * 1e3:.1f} ms, {r["samples_per_s"]:.1f} samples/s, MFU {mfu} of '
        f'{r["peak_flops_per_device"] / 1e12:.1f} TFLOP/s ({r["peak_source"]}), peak device '
        f'memory {mem}; fed by the pipeline {r["fed_samples_per_s"]:.1f} samples/s'
        f'{" (INPUT-BOUND)" if r["input_bound"] else ""}; host alone '
        f'{r["host_samples_per_s"]:.1f} samples/s on {r["host_cores"]} cores, '
        f'{r["host_cpu_ms_per_sample"]:.1f} CPU ms/sample')
  lines.append(json.dumps(result))
  return '\n'.join(lines)
