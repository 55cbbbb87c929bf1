"""The seed's 3D Vision Transformer in Flax NNX, with DAT layers and a DeiT token.

Layout (pre-LN, as ViT / vit_pytorch's vit_3d):

  (B, Z, Y, X, C) -> [conv stem] -> patch embedding (kernel = stride = patch, anisotropic
  allowed) -> + position code (3D sin-cos, fixed; or learned) -> [CLS,
  (DIST), patches] -> dropout -> depth x [x + DropPath(Drop(Attn(LN(x)))),
  x + DropPath(Drop(MLP(LN(x))))] -> pool (CLS token, or mean over the
  non-distillation tokens) -> LayerNorm -> Linear head -> 8 logits
  (patient_overall, C1..C7).

`hint_dim=C` adds a linear map from each final patch token (after the final
LayerNorm) to C channels, output as "hint" (B, gz, gy, gx, C): the student's
side of feature distillation from a CNN's last feature map (losses.py,
configs/vertebra_distill.py). Training only; prediction does not read it.

`conv_stem=(c1, c2, ...)` puts 3^3 convolutions (stride 1, GroupNorm, GELU)
before the patch embedding: a hybrid embedding, the small-data remedy of
"Early convolutions help transformers see better" (Xiao et al. 2021): the
tokens start from local edge features instead of raw voxels.

The final LayerNorm is applied after pooling, as in vit_pytorch's
`mlp_head = LayerNorm + Linear` (for CLS pooling the order does not matter;
for mean pooling it does). Prefix tokens get no position code: a learned
constant added to a learned token is the same parameter, which is how the
vit_pytorch weights (which do add one to CLS) are converted.

Calling convention (the train/eval loops rely on it):

  model = factory.build_model(config, seed)   # cspine_jax/models/factory.py
  logits = model(x)                                   # eval: (B, 8) float32
  logits = model(x, deterministic=False, rng=key)     # train: dropout etc.
  out = model.outputs(x, deterministic=..., rng=...)  # dict, see `outputs`

All randomness (dropout, attention dropout, stochastic depth) comes from
the `rng` key of the call; the module holds parameters only.

Layers are stored stacked per run of equal layers ("segments": e.g. layers
0-7 full attention, 8-11 deformable), with a leading layer axis on every
parameter. `scan_layers` only changes how a segment is executed
(`jax.lax.scan` over the stacked parameters, or an unrolled Python loop over
slices of them), so checkpoints are interchangeable between the two.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cspine_jax.models import cnn3d
from cspine_jax.models import deformable
from cspine_jax.models import heads
from cspine_jax.models import layers

ATTENTION_KINDS = ('full', 'deformable')


def _dtype(d) -> jnp.dtype:
  return jnp.dtype(d) if d is not None else jnp.dtype(jnp.float32)


class Block(nnx.Module):
  """Pre-LN transformer block with full or deformable attention."""

  def __init__(self, *, width: int, num_heads: int, head_dim: int,
               mlp_dim: int, attention: str, dropout: float,
               attention_dropout: float, qkv_bias: bool, norm_epsilon: float,
               gelu_approximate: bool, grid: Sequence[int], num_prefix: int,
               deformable_kwargs: dict[str, Any], attention_impl: str, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = dropout
    self.norm1 = nnx.LayerNorm(width, epsilon=norm_epsilon, **kw)
    if attention == 'full':
      self.attn = layers.Attention(width, num_heads, head_dim,
                                   qkv_bias=qkv_bias,
                                   attention_dropout=attention_dropout,
                                   attention_impl=attention_impl, **kw)
    elif attention == 'deformable':
      self.attn = deformable.DeformableAttention(
          width, num_heads, head_dim, grid=grid, num_prefix=num_prefix,
          qkv_bias=qkv_bias, attention_dropout=attention_dropout,
          norm_epsilon=norm_epsilon, gelu_approximate=gelu_approximate,
          attention_impl=attention_impl, **deformable_kwargs, **kw)
    else:
      raise ValueError(f'attention {attention!r} not in {ATTENTION_KINDS}')
    self.norm2 = nnx.LayerNorm(width, epsilon=norm_epsilon, **kw)
    self.mlp = layers.Mlp(width, mlp_dim, dropout_rate=dropout,
                          gelu_approximate=gelu_approximate, **kw)

  def __call__(self, x: jax.Array, *, key: jax.Array | None,
               drop_path_rate: jax.Array | float,
               deterministic: bool) -> jax.Array:
    k_attn, k_drop1, k_path1, k_mlp, k_drop2, k_path2 = layers.split_key(
        key, 6)
    h = self.attn(self.norm1(x), key=k_attn, deterministic=deterministic)
    h = layers.dropout(h, self.dropout, k_drop1, deterministic)
    x = x + layers.drop_path(h, drop_path_rate, k_path1, deterministic)
    h = self.mlp(self.norm2(x), key=k_mlp, deterministic=deterministic)
    h = layers.dropout(h, self.dropout, k_drop2, deterministic)
    return x + layers.drop_path(h, drop_path_rate, k_path2, deterministic)


def layer_kinds(depth: int, attention: str,
                deformable_layers: Sequence[int] | None) -> tuple[str, ...]:
  """Attention kind of each layer.

  attention="full": all full. attention="deformable": the layers listed in
  `deformable_layers` (all layers when it is None) are deformable, the others
  full.
  """
  if attention == 'full':
    return ('full',) * depth
  if attention != 'deformable':
    raise ValueError(f'attention {attention!r} not in {ATTENTION_KINDS}')
  chosen = range(depth) if deformable_layers is None else deformable_layers
  chosen = set(int(i) for i in chosen)
  if not chosen <= set(range(depth)):
    raise ValueError(f'deformable_layers {sorted(chosen)} outside depth {depth}')
  return tuple('deformable' if i in chosen else 'full' for i in range(depth))


def segments_of(kinds: Sequence[str]) -> list[tuple[str, int, int]]:
  """Runs of equal kinds as (kind, first layer, length)."""
  runs = []
  for i, kind in enumerate(kinds):
    if runs and runs[-1][0] == kind:
      runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
    else:
      runs.append((kind, i, 1))
  return runs


def _stacked_blocks(kind: str, length: int, rngs: nnx.Rngs,
                    block_kwargs: dict[str, Any]) -> Block:
  """`length` independently initialised blocks as one Block of stacked params."""

  @nnx.split_rngs(splits=length)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(r):
    return Block(attention=kind, rngs=r, **block_kwargs)

  return make(rngs)


class Encoder(nnx.Module):
  """Stack of blocks, stored stacked per segment, scanned or unrolled."""

  def __init__(self, *, depth: int, kinds: Sequence[str], drop_path: float,
               remat: bool, remat_policy: str, scan_layers: bool,
               rngs: nnx.Rngs, **block_kwargs):
    self.depth = depth
    self.segments_spec = tuple(segments_of(kinds))
    self.scan_layers = scan_layers
    self.remat = remat
    self.remat_policy = remat_policy
    # Stochastic depth grows linearly with depth (Huang et al.; DeiT).
    self.drop_path_rates = tuple(
        float(r) for r in np.linspace(0.0, drop_path, depth)) if depth else ()
    self.segments = nnx.List([
        _stacked_blocks(kind, length, rngs, block_kwargs)
        for kind, _, length in self.segments_spec])

  def __call__(self, x: jax.Array, *, keys: jax.Array | None,
               deterministic: bool) -> jax.Array:
    use_path = not deterministic and max(self.drop_path_rates, default=0) > 0
    rates = jnp.asarray(self.drop_path_rates, jnp.float32) if use_path else None
    for stacked, (_, start, length) in zip(self.segments, self.segments_spec):
      graphdef, params = nnx.split(stacked)

      def body(h, inp, graphdef=graphdef):
        p, k, r = inp
        block = nnx.merge(graphdef, p)
        return block(h, key=k, drop_path_rate=0.0 if r is None else r,
                     deterministic=deterministic), None

      if self.remat:
        body = jax.checkpoint(
            body, prevent_cse=not self.scan_layers,
            policy=getattr(jax.checkpoint_policies, self.remat_policy))
      sl = lambda a, s=start, n=length: None if a is None else a[s:s + n]  # noqa: E731
      xs = (params, sl(keys), sl(rates))
      if self.scan_layers:
        x, _ = jax.lax.scan(body, x, xs)
      else:
        for i in range(length):
          x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
    return x


class ConvStem(nnx.Module):
  """3^3 convolutions at full resolution, each GroupNorm + GELU (the hybrid embedding)."""

  def __init__(self, in_channels: int, widths: Sequence[int], *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.convs = nnx.List()
    self.norms = nnx.List()
    cin = in_channels
    for c in widths:
      self.convs.append(nnx.Conv(cin, c, (3, 3, 3), padding='SAME', dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs))
      self.norms.append(nnx.GroupNorm(c, num_groups=min(8, c), dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs))
      cin = c

  def __call__(self, x: jax.Array) -> jax.Array:
    # Shifted views + one matmul: XLA's CPU 3D convolutions are several times slower.
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.gelu(norm(cnn3d.im2col_conv(conv, x)))
    return x


class ViT3D(nnx.Module):
  """3D ViT classifier; see the module docstring for layout and calls."""

  def __init__(
      self,
      *,
      input_shape: Sequence[int],
      in_channels: int = 1,
      patch_size: Sequence[int] = (16, 16, 16),
      width: int = 384,
      depth: int = 6,
      num_heads: int = 6,
      mlp_dim: int = 1536,
      head_dim: int | None = None,
      pos_embedding: str = 'sincos',
      pool: str = 'cls',
      patient_head: str = 'logit',
      distill_token: bool = False,
      hint_dim: int = 0,
      patch_embed_norm: bool = False,
      conv_stem: Sequence[int] = (),
      qkv_bias: bool = True,
      dropout: float = 0.0,
      attention_dropout: float = 0.0,
      emb_dropout: float = 0.0,
      drop_path: float = 0.0,
      norm_epsilon: float = 1e-6,
      gelu_approximate: bool = False,
      head_zero_init: bool = True,
      head_bias_init: str = 'prior',
      attention: str = 'full',
      attention_impl: str = 'xla',
      deformable_layers: Sequence[int] | None = None,
      deformable: dict[str, Any] | None = None,
      dtype: str | Any = 'float32',
      param_dtype: str | Any = 'float32',
      remat: bool = False,
      remat_policy: str = 'nothing_saveable',
      scan_layers: bool = False,
      rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(int(n) for n in input_shape)
    self.patch_size = tuple(int(p) for p in patch_size)
    if len(self.input_shape) != 3 or len(self.patch_size) != 3:
      raise ValueError('input_shape and patch_size are (z, y, x) triples')
    if any(n % p for n, p in zip(self.input_shape, self.patch_size)):
      raise ValueError(f'input {self.input_shape} not divisible by patch '
                       f'{self.patch_size}')
    if pool not in ('cls', 'mean'):
      raise ValueError(f'pool {pool!r} not in (cls, mean)')
    if pos_embedding not in ('sincos', 'learned'):
      raise ValueError(f'pos_embedding {pos_embedding!r} not in '
                       '(sincos, learned)')
    self.grid = tuple(n // p for n, p in zip(self.input_shape,
                                             self.patch_size))
    self.width = width
    self.pool = pool
    self.pos_embedding = pos_embedding
    self.distill_token = distill_token
    self.emb_dropout = emb_dropout
    self.depth = depth
    self.num_prefix = 2 if distill_token else 1
    self.dtype = _dtype(dtype)
    param_dtype = _dtype(param_dtype)
    head_dim = head_dim or width // num_heads
    self.kinds = layer_kinds(depth, attention, deformable_layers)
    # Training mode needs a key only if something is stochastic.
    self.max_rate = max(dropout, attention_dropout, emb_dropout, drop_path)

    self.stem = ConvStem(in_channels, tuple(conv_stem), dtype=self.dtype,
                         param_dtype=param_dtype, rngs=rngs) if conv_stem else None
    self.patch_embed = layers.PatchEmbed(
        self.patch_size, conv_stem[-1] if conv_stem else in_channels, width,
        patch_norm=patch_embed_norm,
        norm_epsilon=norm_epsilon, dtype=self.dtype, param_dtype=param_dtype,
        rngs=rngs)
    num_patches = int(np.prod(self.grid))
    token_init = nnx.initializers.normal(0.02)
    if pos_embedding == 'learned':
      self.pos = nnx.Param(token_init(rngs.params(), (num_patches, width),
                                      param_dtype))
    # Random (not zero) tokens so that CLS and DIST do not start identical.
    self.cls = nnx.Param(token_init(rngs.params(), (width,), param_dtype))
    if distill_token:
      self.dist = nnx.Param(token_init(rngs.params(), (width,), param_dtype))

    self.encoder = Encoder(
        depth=depth, kinds=self.kinds, drop_path=drop_path, remat=remat,
        remat_policy=remat_policy, scan_layers=scan_layers, rngs=rngs,
        width=width, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
        dropout=dropout, attention_dropout=attention_dropout,
        qkv_bias=qkv_bias, norm_epsilon=norm_epsilon,
        gelu_approximate=gelu_approximate, grid=self.grid,
        num_prefix=self.num_prefix,
        deformable_kwargs=dict(deformable or {}),
        attention_impl=attention_impl, dtype=self.dtype,
        param_dtype=param_dtype)
    # Final norm and heads in float32: cheap, and they feed a log loss.
    self.final_norm = nnx.LayerNorm(width, epsilon=norm_epsilon,
                                    dtype=jnp.float32,
                                    param_dtype=param_dtype, rngs=rngs)
    head_kw = dict(patient_head=patient_head, zero_init=head_zero_init,
                   bias_init=head_bias_init, param_dtype=param_dtype,
                   rngs=rngs)
    self.head = heads.ClassifierHead(width, **head_kw)
    if distill_token:
      self.head_dist = heads.ClassifierHead(width, **head_kw)
    self.hint = (nnx.Linear(width, int(hint_dim), dtype=jnp.float32, param_dtype=param_dtype,
                            rngs=rngs) if hint_dim else None)

  def _check_input(self, x: jax.Array):
    if x.ndim != 5:
      raise ValueError(f'expected (batch, z, y, x, channels), got {x.shape}')
    fixed = self.pos_embedding == 'learned' or 'deformable' in self.kinds
    if fixed and tuple(x.shape[1:4]) != self.input_shape:
      raise ValueError(f'input {x.shape[1:4]} != configured '
                       f'{self.input_shape} (learned position code or '
                       'deformable layers fix the token grid)')

  def encode(self, x: jax.Array, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> jax.Array:
    """(B, Z, Y, X, C) -> (B, prefix + tokens, width) encoder output.

    No final norm here; prefix = [CLS] or [CLS, DIST].
    """
    self._check_input(x)
    if not deterministic and rng is None and self.max_rate > 0:
      raise ValueError('deterministic=False needs rng= (a jax.random key)')
    k_emb, k_layers = layers.split_key(rng, 2)
    x = x.astype(self.dtype)
    if self.stem is not None:
      x = self.stem(x)
    tokens = self.patch_embed(x)
    b = tokens.shape[0]
    if self.pos_embedding == 'learned':
      pos = self.pos[...]
    else:
      grid = tuple(n // p for n, p in zip(x.shape[1:4], self.patch_size))
      pos = layers.posemb_sincos_3d(grid, self.width)
    tokens = tokens + pos.astype(self.dtype)[None]
    prefix = [self.cls[...]] + ([self.dist[...]] if self.distill_token
                                 else [])
    prefix = jnp.broadcast_to(jnp.stack(prefix).astype(self.dtype),
                              (b, self.num_prefix, self.width))
    tokens = jnp.concatenate([prefix, tokens], axis=1)
    tokens = layers.dropout(tokens, self.emb_dropout, k_emb, deterministic)
    keys = None if k_layers is None else jax.random.split(k_layers,
                                                          self.depth)
    return self.encoder(tokens, keys=keys, deterministic=deterministic)

  def outputs(self, x: jax.Array, *, deterministic: bool = True,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """All outputs, float32.

    Keys: "features" (B, width), the pooled, normalised vector the head
    reads; "logits" (B, 8), the logits to use for prediction. With a
    distillation token also "logits_cls" and "logits_dist" (each head's 8
    logits, for the two loss terms) and "features_dist"; then "logits" is
    their mean (DeiT averages the two heads' logits at inference).
    """
    h = self.encode(x, deterministic=deterministic, rng=rng)
    if self.pool == 'cls':
      pooled = h[:, 0]
    else:  # mean over CLS and patches (vit_pytorch), not over DIST
      keep = jnp.concatenate([h[:, :1], h[:, self.num_prefix:]], axis=1)
      pooled = keep.astype(jnp.float32).mean(axis=1)
    features = self.final_norm(pooled.astype(jnp.float32))
    out = {'features': features}
    if self.hint is not None:
      grid = tuple(n // p for n, p in zip(x.shape[1:4], self.patch_size))
      tokens = self.final_norm(h[:, self.num_prefix:].astype(jnp.float32))
      out['hint'] = self.hint(tokens).reshape((h.shape[0],) + grid + (-1,))
    logits = self.head(features)
    if self.distill_token:
      features_dist = self.final_norm(h[:, 1].astype(jnp.float32))
      logits_dist = self.head_dist(features_dist)
      out.update(features_dist=features_dist, logits_cls=logits,
                 logits_dist=logits_dist)
      logits = 0.5 * (logits + logits_dist)
    out['logits'] = logits
    return out

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    """(B, Z, Y, X, C) -> (B, 8) float32 logits in TARGETS order."""
    return self.outputs(x, deterministic=deterministic, rng=rng)['logits']
