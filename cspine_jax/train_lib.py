"""Training state, optimizer and the pure train step (jitted once by train_loop.py).

The model is a Flax NNX module; steps are pure functions over its `nnx.split` state (no
`nnx.jit` graph traversal per call, Flax performance guide). Parameters stay float32; the compute
dtype is the model's (`config.model.dtype`). Randomness (dropout, drop path) comes from the
state's key folded with the step, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from cspine_jax import device_crop
from cspine_jax import losses
from cspine_jax.models import factory


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of every other model variable (e.g. batch-norm statistics)
  opt_state: Any
  ema: Any  # nnx.State like params (EMA of the weights), or an empty dict when off
  rng: jax.Array  # uint32 key data; per-step keys are fold_in(rng, step)


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up to optimizer.lr, then cosine decay to 0 at total_steps (or constant)."""
  opt = config.optimizer
  warmup = int(opt.get('warmup_steps', 0))
  total = int(config.total_steps)
  kind = opt.get('schedule', 'cosine')
  if kind == 'constant':
    after = optax.constant_schedule(opt.lr)
  elif kind == 'cosine':
    after = optax.cosine_decay_schedule(opt.lr, max(1, total - warmup))
  else:
    raise ValueError(f'optimizer.schedule={kind!r}: expected "cosine" or "constant"')
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), after], [warmup])


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = config.optimizer
  if opt.name != 'adamw':
    raise ValueError(f'optimizer.name={opt.name!r}: only "adamw" is implemented')
  schedule = learning_rate_schedule(config)
  parts = []
  if opt.get('grad_clip_norm', 0.0) and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.get('b1', 0.9), b2=opt.get('b2', 0.999),
                           weight_decay=opt.get('weight_decay', 0.0)))
  return optax.chain(*parts), schedule


def init_state(config, model: nnx.Module) -> tuple[nnx.GraphDef, TrainState]:
  """Splits the model and builds the initial TrainState (step 0)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, _ = make_optimizer(config)
  ema = jax.tree.map(jnp.copy, params) if config.get('ema_decay', 0.0) else {}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                     opt_state=tx.init(params), ema=ema,
                     rng=jax.random.key_data(jax.random.key(int(config.seed) + 1)))
  return graphdef, state


def init_fn(config) -> Callable[[], TrainState]:
  """() -> the initial TrainState, model built inside: jit it with ``out_shardings`` and the
  parameters are born sharded (big_vision), never gathered on one device first."""

  def init() -> TrainState:
    return init_state(config, factory.build_model(config, int(config.seed)))[1]

  return init


def _loss_mask(batch) -> jax.Array:
  mask = batch['mask'].astype(bool)
  if 'labelled' in batch:
    mask = mask & batch['labelled'].astype(bool)
  return mask


def _segmentation_mask(batch) -> jax.Array:
  """Only examples whose study has a true mask carry a per-voxel label."""
  return batch['mask'].astype(bool) & batch['has_segmentation'].astype(bool)


def _feature_mask(batch, per_crop: bool) -> jax.Array:
  """What feature distillation averages over: real examples (padding and, per vertebra,
  absent vertebrae do not count; labels are not needed)."""
  mask = batch['mask'].astype(bool)
  if per_crop and 'vertebra_mask' in batch:
    mask = mask[:, None] & batch['vertebra_mask'].astype(bool)
  return mask


def mixup(batch: dict, key: jax.Array, alpha: float) -> dict:
  """Mixes each study with another of the batch: x = l x_i + (1 - l) x_j, same for the labels.

  l ~ Beta(alpha, alpha) per example, j a random permutation; an example counts only if both of
  its sources do (mask, labelled, vertebra_mask). For distillation (DeiT's recipe): on a mixed
  crop the teacher's output says how much fracture is left in view, which the labels of a few
  dozen memorised studies cannot.
  """
  k_perm, k_lam = jax.random.split(key)
  b = batch['image'].shape[0]
  perm = jax.random.permutation(k_perm, b)
  lam = jax.random.beta(k_lam, alpha, alpha, (b,))
  out = dict(batch)
  shape = (b,) + (1,) * (batch['image'].ndim - 1)
  x = batch['image'].astype(jnp.float32)
  out['image'] = (lam.reshape(shape) * x + (1 - lam.reshape(shape)) * x[perm]).astype(
      batch['image'].dtype)
  y = batch['labels'].astype(jnp.float32)
  out['labels'] = lam[:, None] * y + (1 - lam[:, None]) * y[perm]
  for k in ('mask', 'labelled', 'vertebra_mask'):
    if k in batch:
      out[k] = batch[k].astype(bool) & batch[k][perm].astype(bool)
  return out


def make_train_step(config, graphdef: nnx.GraphDef, teacher: Callable | None = None
                    ) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict]]:
  """The pure train step: (state, batch, teacher_weights) -> (new state, metrics).

  ``teacher`` (distillation): a pure function (teacher_weights, images) -> its outputs ('logits',
  and 'feature_map' for a CNN; `restore.make_teacher_fn`), evaluated in the same jitted step
  without gradients. ``metrics['finite']`` is False when the loss or the gradient norm is not
  finite: the loop checks it on the device state it saves, without a host sync per step.
  """
  tx, schedule = make_optimizer(config)
  segment = factory.task_of(config).segmentation
  loss_fn = None if segment else losses.get_loss(config.loss)
  accum = int(config.get('grad_accum_steps', 1))
  ema_decay = float(config.get('ema_decay', 0.0))
  distill = config.get('distill', None)
  use_distill = bool(distill and distill.get('teacher_workdir'))
  smoothing = float(config.get('label_smoothing', 0.0))
  mix_alpha = float(config.get('mixup_alpha', 0.0))
  feature_weight = float(distill.get('feature_weight', 0.0)) if use_distill else 0.0
  # data.crop_on='device': the batch holds level blocks, made into images here, on the device.
  make_images = device_crop.for_config(config)

  def counts(batch):
    """(examples, crops) that the loss terms average over: the weights of micro-batches."""
    ex = _segmentation_mask(batch) if segment else _loss_mask(batch)
    return (ex.sum().astype(jnp.float32),
            _feature_mask(batch, True).sum().astype(jnp.float32))

  def compute_loss(params, rest, micro, key, teacher_params, scales=(1.0, 1.0)):
    """The micro-batch's loss, each term scaled by its share of the full batch's count
    (``scales``: examples, crops), so that the micro-batches' gradients sum to the full
    batch's; (1, 1) without accumulation."""
    ex_scale, crop_scale = scales
    if mix_alpha:
      key, k_mix = jax.random.split(key)
      micro = mixup(micro, k_mix, mix_alpha)
    # copy=True: fresh Variables at this trace level, so batch statistics can be updated here.
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = model.outputs(micro['image'], deterministic=False, rng=key)
    mask = _loss_mask(micro)
    labels = micro['labels']
    if smoothing:
      labels = losses.smooth_labels(labels, smoothing)
    aux = {}
    feature = None
    if segment:
      mask = _segmentation_mask(micro)
      loss, parts = losses.segmentation_loss(out['logits'], micro['segmentation'], mask,
                                             dice_weight=float(config.get('dice_weight', 1.0)))
      token_weight = float(config.get('token_loss_weight', 0.0))
      if token_weight:
        tok = losses.token_label_loss(out['token_logits'], micro['segmentation'],
                                      tuple(config.model.patch_size), mask)
        loss = loss + token_weight * tok
        parts = {**parts, 'token': tok}
      aux.update({f'loss_{k}': v for k, v in parts.items()})
    elif use_distill:
      t_out = teacher(teacher_params, micro['image'])
      loss, parts = losses.distillation_loss(
          out['logits_cls'] if 'logits_cls' in out else out['logits'],
          out['logits_dist'] if 'logits_dist' in out else out['logits'],
          labels, t_out['logits'], alpha=float(distill.alpha), kind=distill.kind,
          temperature=float(distill.get('temperature', 1.0)), loss=config.loss, mask=mask)
      if feature_weight:
        if 'hint' not in out or 'feature_map' not in t_out:
          raise ValueError('config.distill.feature_weight > 0 needs a student with '
                           'config.model.hint_dim > 0 and a CNN teacher (its feature_map)')
        feature = losses.feature_distillation_loss(
            out['hint'], t_out['feature_map'], _feature_mask(micro, out['hint'].ndim == 6))
      aux.update({f'loss_{k}': v for k, v in parts.items()})
    else:
      loss = loss_fn(out['logits'], labels, mask)
    aux = {k: v * ex_scale for k, v in aux.items()}
    loss = loss * ex_scale
    if feature is not None:
      aux['loss_feature'] = feature * crop_scale
      loss = loss + feature_weight * aux['loss_feature']
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    return loss, (aux, new_rest)

  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict, teacher_params=None):
    if make_images is not None:
      batch = make_images(batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum == 1:
      (loss, (aux, rest)), grads = grad_fn(state.params, state.rest, batch, key, teacher_params)
    else:
      # Gradient accumulation: the batch in `accum` micro-batches, summed in a scan. Each
      # micro-batch's terms are weighted by its share of the batch's valid examples (crops for
      # the feature term): a plain mean of micro-batch means would over-weight a micro-batch
      # with padding or unlabelled studies. With mixup the shares are the counts before mixing.
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]),
                           batch)
      n_ex, n_crop = counts(batch)

      def body(carry, xs):
        g_sum, l_sum, rest, i = carry
        m_ex, m_crop = counts(xs)
        scales = (m_ex / jnp.maximum(n_ex, 1.0), m_crop / jnp.maximum(n_crop, 1.0))
        (l, (aux, rest)), g = grad_fn(state.params, rest, xs, jax.random.fold_in(key, i),
                                      teacher_params, scales)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, rest, i + 1), aux

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss, rest, _), aux = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), state.rest, 0), micro)
      aux = jax.tree.map(lambda v: v.sum(0), aux)  # already weighted: the sum is the batch's
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, params)
    grad_norm = optax.tree.norm(grads)
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'param_norm': optax.tree.norm(params),
               'learning_rate': schedule(state.step), **aux,
               'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new_state = state.replace(step=state.step + 1, params=params, rest=rest,
                              opt_state=opt_state, ema=ema)
    return new_state, metrics

  return train_step
