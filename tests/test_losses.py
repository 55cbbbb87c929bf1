"""Losses against hand-computed values and the RSNA metric's definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cspine_jax import losses
from cspine_jax import train_lib

LOG2 = math.log(2.0)


def test_sigmoid_bce_hand_values():
  z = jnp.array([0.0, 0.0, 2.0, 2.0, -3.0, 0.0])
  y = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.25])
  want = [LOG2, LOG2, math.log1p(math.exp(-2.0)), 2.0 + math.log1p(
      math.exp(-2.0)), 3.0 + math.log1p(math.exp(-3.0)), LOG2]
  np.testing.assert_allclose(losses.sigmoid_bce(z, y), want, rtol=1e-6)
  # Large logits stay finite (log-sigmoid, not log of a rounded sigmoid).
  assert float(losses.sigmoid_bce(jnp.array(200.0), jnp.array(0.0))) == 200.0


def test_bce_loss_mean_and_mask():
  logits = jnp.zeros((3, 8)).at[1].set(2.0)
  labels = jnp.ones((3, 8))
  per = np.array([LOG2, math.log1p(math.exp(-2.0)), LOG2])
  np.testing.assert_allclose(losses.bce_loss(logits, labels), per.mean(),
                             rtol=1e-6)
  mask = jnp.array([1.0, 1.0, 0.0])
  np.testing.assert_allclose(losses.bce_loss(logits, labels, mask),
                             per[:2].mean(), rtol=1e-6)


def test_rsna_weighted_hand_values():
  very_sure = -30.0  # bce of a negative label at -30 is ~1e-13
  logits = jnp.full((2, 8), very_sure).at[:, 0].set(0.0)
  # Study 0: all negative -> only patient_overall (weight 7 of 14) costs log 2.
  # Study 1: patient positive (weight 14), C1..C7 negative (7 x 1): 14/21.
  labels = jnp.zeros((2, 8)).at[1, 0].set(1.0)
  per_study = [7 * LOG2 / 14, 14 * LOG2 / 21]
  got = losses.rsna_weighted_bce(logits, labels)
  np.testing.assert_allclose(got, np.mean(per_study), rtol=1e-5)
  np.testing.assert_allclose(
      losses.rsna_weighted_bce(logits, labels, jnp.array([0.0, 1.0])),
      per_study[1], rtol=1e-5)


def test_rsna_weighted_equals_competition_metric():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, size=(5, 8))
  labels = (rng.uniform(size=(5, 8)) < 0.4).astype(np.float64)
  p = np.clip(1 / (1 + np.exp(-logits)), 1e-15, 1 - 1e-15)
  w = np.where(labels == 1, [14, 2, 2, 2, 2, 2, 2, 2], [7, 1, 1, 1, 1, 1, 1, 1])
  ll = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  metric = np.mean((w * ll).sum(1) / w.sum(1))
  got = losses.get_loss('rsna_weighted')(jnp.asarray(logits, jnp.float32),
                                         jnp.asarray(labels))
  np.testing.assert_allclose(got, metric, rtol=1e-5)
  # And it is not the plain mean BCE on these labels.
  assert abs(float(losses.get_loss('bce')(jnp.asarray(logits),
                                          jnp.asarray(labels))) - metric) > 1e-3


def _np_bce(z, y):
  return -(y * np.log(1 / (1 + np.exp(-z))) +
           (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))


def test_distillation_hard():
  cls = jnp.array([[0.5, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
  dist = jnp.array([[1.0, 1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
  labels = jnp.array([[1.0, 0, 1, 0, 0, 0, 0, 0]])
  teacher = jnp.array([[3.0, 0.2, -0.1, -4.0, 5.0, -1.0, 0.0, 1.0]])
  hard = np.array([1.0, 1, 0, 0, 1, 0, 0, 1])  # logit > 0 (0.0 -> 0)
  task = _np_bce(np.asarray(cls[0]), np.asarray(labels[0])).mean()
  distill = _np_bce(np.asarray(dist[0]), hard).mean()
  total, parts = losses.distillation_loss(cls, dist, labels, teacher,
                                          alpha=0.3, kind='hard')
  np.testing.assert_allclose(parts['task'], task, rtol=1e-5)
  np.testing.assert_allclose(parts['distill'], distill, rtol=1e-5)
  np.testing.assert_allclose(total, 0.7 * task + 0.3 * distill, rtol=1e-5)


def test_distillation_soft_temperature():
  rng = np.random.default_rng(1)
  cls, dist, teacher = (rng.normal(size=(4, 8)).astype(np.float32)
                        for _ in range(3))
  labels = (rng.uniform(size=(4, 8)) < 0.5).astype(np.float32)
  t = 2.0
  soft = 1 / (1 + np.exp(-teacher / t))
  distill = t * t * _np_bce(dist / t, soft).mean()
  total, parts = losses.distillation_loss(
      jnp.asarray(cls), jnp.asarray(dist), jnp.asarray(labels),
      jnp.asarray(teacher), alpha=0.5, kind='soft', temperature=t)
  np.testing.assert_allclose(parts['distill'], distill, rtol=1e-5)
  np.testing.assert_allclose(
      total, 0.5 * _np_bce(cls, labels).mean() + 0.5 * distill, rtol=1e-5)


def test_soft_distillation_gradient_vanishes_at_teacher_and_not_through_it():
  teacher = jnp.array([[1.5, -0.5, 0.2, -3.0, 0.0, 2.0, -1.0, 0.7]])
  labels = jnp.zeros((1, 8))

  def distill(dist, teach):
    return losses.distillation_loss(dist, dist, labels, teach, alpha=1.0,
                                    kind='soft', temperature=3.0,
                                    loss='rsna_weighted')[0]

  g_student, g_teacher = jax.grad(distill, argnums=(0, 1))(teacher, teacher)
  np.testing.assert_allclose(g_student, 0.0, atol=1e-7)
  np.testing.assert_array_equal(g_teacher, 0.0)
  g_away = jax.grad(distill)(teacher + 1.0, teacher)
  assert np.all(np.asarray(g_away) > 0)


def test_distillation_rsna_weights_follow_true_labels():
  dist = jnp.zeros((1, 8))
  teacher = jnp.full((1, 8), -5.0)  # hard targets all 0
  labels = jnp.zeros((1, 8)).at[0, 0].set(1.0)
  _, parts = losses.distillation_loss(dist, dist, labels, teacher, alpha=1.0,
                                      kind='hard', loss='rsna_weighted')
  # Every term costs log 2; weights from the labels: 14 + 7 = 21 -> log 2.
  np.testing.assert_allclose(parts['distill'], LOG2, rtol=1e-6)
  dist2 = dist.at[0, 0].set(-2.0)  # cheaper patient term, weight 14 of 21
  _, parts2 = losses.distillation_loss(dist2, dist2, labels, teacher,
                                       alpha=1.0, kind='hard',
                                       loss='rsna_weighted')
  want = (14 * math.log1p(math.exp(-2.0)) + 7 * LOG2) / 21
  np.testing.assert_allclose(parts2['distill'], want, rtol=1e-5)


def test_label_smoothing_hand_values_and_loss_floor():
  y = jnp.array([[0.0, 1.0, 0.5]])
  np.testing.assert_allclose(losses.smooth_labels(y, 0.1), [[0.05, 0.95, 0.5]], atol=1e-7)
  # With smoothed targets the BCE is smallest at p = 0.95, not at an infinite logit.
  t = losses.smooth_labels(jnp.ones((1, 1)), 0.1)
  z = jnp.linspace(0.0, 8.0, 801)[:, None]
  best = float(z[jnp.argmin(losses.sigmoid_bce(z, t)[:, 0])][0])
  assert best == pytest.approx(math.log(0.95 / 0.05), abs=0.01)


def test_unknown_names_raise():
  with pytest.raises(ValueError):
    losses.get_loss('focal')
  with pytest.raises(ValueError):
    losses.distill_targets(jnp.zeros(8), 'medium')


def test_mixup_mixes_images_and_labels_with_the_same_weight():
  rng = np.random.default_rng(0)
  y = rng.random((6, 8)).astype(np.float32)
  # Each image is filled with its study's first label: after mixing, the image's value must
  # still equal the mixed label if (and only if) both were mixed with the same l and partner.
  x = np.broadcast_to(y[:, :1, None, None, None, None], (6, 7, 2, 2, 2, 1)).copy()
  mask = np.array([1, 1, 1, 1, 1, 0], bool)
  out = train_lib.mixup({'image': jnp.asarray(x), 'labels': jnp.asarray(y),
                         'mask': jnp.asarray(mask)}, jax.random.key(3), 0.4)
  img = np.asarray(out['image'])
  np.testing.assert_allclose(img[:, 0, 0, 0, 0, 0], np.asarray(out['labels'])[:, 0], rtol=1e-6)
  assert not np.allclose(img[:, 0, 0, 0, 0, 0], y[:, 0])  # something was mixed
  # The padded study (mask 0) invalidates itself and whichever study it was mixed into.
  assert np.asarray(out['mask']).sum() in (4, 5) and not np.asarray(out['mask'])[5]


def test_feature_distillation_pools_standardises_and_masks_by_hand():
  rng = np.random.default_rng(3)
  # Student hint on a 2x2x2 grid, teacher map on 1x1x1 (so the student is pooled), 2 examples.
  hint = rng.normal(size=(2, 2, 2, 2, 3)).astype(np.float32)
  teacher = rng.normal(size=(2, 1, 1, 1, 3)).astype(np.float32) * 5 + 2
  pooled = hint.mean(axis=(1, 2, 3))  # (2, 3)
  t = teacher.reshape(2, 3)
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
  per = ((pooled - t) ** 2).mean(-1)
  got = losses.feature_distillation_loss(jnp.asarray(hint), jnp.asarray(teacher))
  np.testing.assert_allclose(got, per.mean(), rtol=1e-5)
  got = losses.feature_distillation_loss(jnp.asarray(hint), jnp.asarray(teacher),
                                         jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(got, per[1], rtol=1e-5)
  # The other way round: a finer teacher map is pooled to the student's grid.
  got = losses.feature_distillation_loss(jnp.asarray(teacher), jnp.asarray(hint))
  h = hint.mean(axis=(1, 2, 3))
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(got, ((teacher.reshape(2, 3) - h) ** 2).mean(), rtol=1e-5)


def test_feature_distillation_is_zero_at_the_target_and_stops_at_the_teacher():
  rng = np.random.default_rng(4)
  teacher = jnp.asarray(rng.normal(size=(3, 7, 1, 2, 2, 4)).astype(np.float32) * 3 - 1)
  t = (teacher - teacher.mean(-1, keepdims=True)) / jnp.sqrt(
      teacher.var(-1, keepdims=True) + 1e-5)
  hint = jnp.repeat(t, 2, axis=2)  # (3, 7, 2, 2, 2, 4): pools back to t
  mask = jnp.ones((3, 7), bool).at[0, 3].set(False)
  assert float(losses.feature_distillation_loss(hint, teacher, mask)) < 1e-10
  g_s, g_t = jax.grad(lambda h, tm: losses.feature_distillation_loss(h + 0.5, tm, mask),
                      argnums=(0, 1))(hint, teacher)
  np.testing.assert_array_equal(g_t, 0.0)
  assert float(jnp.abs(g_s).max()) > 0
  np.testing.assert_array_equal(g_s[0, 3], 0.0)  # a masked-out vertebra gets no gradient


def test_feature_distillation_says_what_does_not_fit():
  with pytest.raises(ValueError, match='hint_dim'):
    losses.feature_distillation_loss(jnp.zeros((2, 1, 1, 1, 8)), jnp.zeros((2, 1, 1, 1, 4)))
  with pytest.raises(ValueError, match='not a multiple'):
    losses.feature_distillation_loss(jnp.zeros((2, 3, 2, 2, 4)), jnp.zeros((2, 2, 2, 2, 4)))
