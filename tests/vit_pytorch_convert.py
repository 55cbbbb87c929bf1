"""Weights of vit_pytorch's `vit_3d.ViT` -> ViT3D (numpy in, no torch import).

vit_pytorch's 3D ViT is the seed's model; mirroring it lets the Flax model be
checked against it weight for weight (tests/test_vit_reference.py; a test
helper, so it lives under tests/). The mirrored layout:

  Rearrange 'b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)'  = patchify
  LayerNorm(patch_dim), Linear, LayerNorm(dim)        patch_embed_norm=True
  pos_embedding (1, n + 1, dim), cls_token            pos_embedding="learned"
  per layer: LN, to_qkv (no bias), to_out; LN, Linear, GELU (erf), Linear
                                                      qkv_bias=False,
                                                      gelu_approximate=False
  mlp_head = LayerNorm + Linear                        final_norm + head
  LayerNorm eps 1e-5                                   norm_epsilon=1e-5

ViT3D adds no position code to the CLS token, so the converter folds
vit_pytorch's `pos_embedding[:, 0]` into the CLS token (ViT3D therefore has
`dim` fewer parameters). vit_pytorch skips the attention output projection
when heads == 1 and dim_head == dim; that case is not supported here.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def mirror_config(*, image_size, image_patch_size, frames, frame_patch_size,
                  num_classes, dim, depth, heads, mlp_dim, pool='cls',
                  channels=3, dim_head=64, **unused) -> dict[str, Any]:
  """ViT3D kwargs (a `config.model` dict) for vit_pytorch ViT(**kwargs)."""
  del unused  # dropout rates: inference only
  pair = lambda t: tuple(t) if isinstance(t, (tuple, list)) else (t, t)  # noqa: E731
  if num_classes != 8:
    raise ValueError('the mirror has the 8-logit head (patient_head="logit")')
  if heads == 1 and dim_head == dim:
    raise ValueError('vit_pytorch drops to_out for heads=1, dim_head=dim')
  return dict(
      name='vit3d', input_shape=(frames,) + pair(image_size),
      patch_size=(frame_patch_size,) + pair(image_patch_size),
      in_channels=channels, width=dim, depth=depth, num_heads=heads,
      head_dim=dim_head, mlp_dim=mlp_dim, pool=pool,
      pos_embedding='learned', patch_embed_norm=True, qkv_bias=False,
      norm_epsilon=1e-5, gelu_approximate=False, patient_head='logit',
      attention='full')


def _linear(sd, prefix):
  out = {'kernel': sd[prefix + '.weight'].T}
  if prefix + '.bias' in sd:
    out['bias'] = sd[prefix + '.bias']
  return out


def _norm(sd, prefix):
  return {'scale': sd[prefix + '.weight'], 'bias': sd[prefix + '.bias']}


def load_vit_pytorch(model: nnx.Module,
                     state_dict: Mapping[str, np.ndarray]) -> None:
  """Copies a vit_pytorch vit_3d.ViT state dict (numpy arrays) into `model`.

  `model` must be built from `mirror_config(...)` of the same ViT. Every
  parameter of `model` is written; any shape mismatch raises.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  depth = model.depth

  def layer(i):
    a, f = f'transformer.layers.{i}.0', f'transformer.layers.{i}.1'
    return {
        'norm1': _norm(sd, a + '.norm'),
        'attn': {'qkv': _linear(sd, a + '.to_qkv'),
                 'out': _linear(sd, a + '.to_out.0')},
        'norm2': _norm(sd, f + '.net.0'),
        'mlp': {'fc1': _linear(sd, f + '.net.1'),
                'fc2': _linear(sd, f + '.net.4')},
    }

  layers = [layer(i) for i in range(depth)]
  # Stack per leaf: the encoder keeps one array per parameter with a
  # leading layer axis.
  stack = lambda *xs: np.stack(xs)  # noqa: E731
  stacked = jax.tree.map(stack, *layers)
  pos = sd['pos_embedding'][0]
  new = {
      'patch_embed': {'pre_norm': _norm(sd, 'to_patch_embedding.1'),
                      'proj': _linear(sd, 'to_patch_embedding.2'),
                      'post_norm': _norm(sd, 'to_patch_embedding.3')},
      'pos': pos[1:],
      'cls': sd['cls_token'][0, 0] + pos[0],
      'encoder': {'segments': {0: stacked}},
      'final_norm': _norm(sd, 'mlp_head.0'),
      'head': {'dense': _linear(sd, 'mlp_head.1')},
  }
  if len(model.encoder.segments) != 1 or set(model.kinds) != {'full'}:
    raise ValueError('the mirror has full attention in every layer')
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  flat_old = dict(_flatten(pure))
  flat_new = dict(_flatten(new))
  if flat_old.keys() != flat_new.keys():
    raise ValueError(f'parameter sets differ: only in model '
                     f'{sorted(flat_old.keys() - flat_new.keys())}, only in '
                     f'state dict {sorted(flat_new.keys() - flat_old.keys())}')
  for k, v in flat_new.items():
    if tuple(flat_old[k].shape) != v.shape:
      raise ValueError(f'{k}: model {flat_old[k].shape} vs {v.shape}')
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, new))
  nnx.update(model, params)


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree
