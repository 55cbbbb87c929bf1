"""The device's half of ``data.crop_on='device'``: block + affine -> windowed, augmented image.

The input pipeline ships, per example, an int16 block of the 1 mm level and the affine from
output voxel to block voxel (cspine_jax/data/device_blocks.py), plus the intensity draws. Here,
inside the jitted step, every output voxel is sampled trilinearly (models/sampling.py, the
sampler checked against map_coordinates and grid_sample), outside the block as the pad value
(``grid-constant``, like the host path: the block is sampled minus pad, zero outside, plus pad),
then HU * a + b + sigma * N(0, 1) and the HU windows, exactly the host transforms' arithmetic.
The noise is drawn from the example's own seed, so an example never depends on the batch it is
in, its row, or the number of devices.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from cspine_jax.data import config as data_config
from cspine_jax.models import sampling

# Batch keys the pipeline adds for device crops; the step replaces them with "image".
BLOCK_KEYS = ('block', 'affine', 'intensity', 'noise_seed')


def materialize(batch: dict, *, out_shape: tuple[int, int, int], windows: tuple,
                pad_hu: float) -> dict:
  """``batch`` with "image" (B, z, y, x, C) float32 in place of BLOCK_KEYS (pure, jittable)."""
  block = batch['block'].astype(jnp.float32) - pad_hu  # (B, Bz, By, Bx)
  affine = batch['affine']  # (B, 3, 4)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in out_shape],
                                indexing='ij'), axis=-1)  # (z, y, x, 3)
  coords = (jnp.einsum('bij,zyxj->bzyxi', affine[:, :, :3], grid)
            + affine[:, None, None, None, :, 3])
  hu = sampling.batched_trilinear_sample(block[..., None], coords)[..., 0] + pad_hu
  if 'intensity' in batch:
    a, b, sigma = (batch['intensity'][:, k, None, None, None] for k in range(3))
    noise = jax.vmap(lambda seed: jax.random.normal(jax.random.key(seed), out_shape))(
        batch['noise_seed'])
    hu = hu * a + b + sigma * noise
  channels = [jnp.clip((hu - (c - w / 2.0)) * (1.0 / w), 0.0, 1.0) for c, w in windows]
  image = jnp.stack(channels, axis=-1)
  mask = batch['mask'].astype(bool).reshape((-1,) + (1,) * 4)
  out = {k: v for k, v in batch.items() if k not in BLOCK_KEYS}
  out['image'] = jnp.where(mask, image, 0.0)  # padding rows: all zero, as the host path
  return out


def for_config(config) -> Callable[[dict], dict] | None:
  """``materialize`` bound to the config's crop, or None when crops are made on the host."""
  cfg = data_config.resolve(config)
  if cfg.get('crop_on', 'host') != 'device':
    return None
  return _bound(tuple(int(n) for n in cfg.input_shape),
                tuple(tuple(float(v) for v in w) for w in cfg.windows), float(cfg.pad_hu))


@functools.lru_cache(maxsize=None)
def _bound(out_shape, windows, pad_hu) -> Callable[[dict], dict]:
  return functools.partial(materialize, out_shape=out_shape, windows=windows, pad_hu=pad_hu)


@functools.lru_cache(maxsize=None)
def _jitted(fn):
  return jax.jit(fn)


def images_fn(config) -> Callable[[dict], jax.Array]:
  """global batch -> its images: "image" as it is, or made from the blocks by one compiled
  function per crop shape, built once (evaluation loops call it every batch)."""
  fn = for_config(config)
  if fn is None:
    return lambda batch: batch['image']
  jitted = _jitted(fn)
  return lambda batch: jitted({k: v for k, v in batch.items() if isinstance(v, jax.Array)})[
      'image']
