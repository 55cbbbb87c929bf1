r"""Localizer: segments C1-C7 around the spine at a fixed 2.5 mm (stage 1 of the two-stage flow).

  python -m cspine_jax.train --config=configs/localizer_coarse.py --workdir=WC \
      --config.data.root=CONVERTED                                   # pass 1, ~24 min on 2 cores
  python -m cspine_jax.train --config=configs/localizer.py --workdir=W \
      --config.data.root=CONVERTED --config.localizer.coarse_workdir=WC   # pass 2, ~20 min
  python -m data_tools.localize --workdir=W --data=CONVERTED    # predicted masks + boxes

Coarse to fine. The coarse pass (configs/localizer_coarse.py) finds the spine in the whole scan
(stretched onto 64^3); this pass crops an 80 x 48 x 48 grid of 2.5 mm voxels (200 x 120 x 120 mm: the
C1-C7 column is at most ~145 x 70 x 60 mm, with room for the coarse pass's error) centred on the
centre of the coarse C1-C7 labels, then once more on the centre of its own labels, and segments
it. Training crops centre on the true masks' C1-C7 box, moved by up to 20 mm along z (6 mm across),
zoomed +-12% and rotated 10 degrees; half the time each end of the scan is cut shorter
(augment.fov_cut_prob: up to 25 mm off the top, 60 mm off the bottom); HU scale +-10%, shift +-40,
noise up to 25 HU. Its own grid has one physical spacing whatever the scan's field of view and
slice spacing. Two HU windows, a small 3D ViT (4x8x8 patches, 720 tokens) and the per-voxel
decoder of cspine_jax/models/segmenter.py (each voxel's 3^3 neighbourhood of intensities + 16
features unshuffled from its token); softmax cross-entropy + 3 x soft Dice + a token-level loss
(each token predicts its patch's label histogram). Trains on the studies with true masks
(data.require_segmentation), fold 0 of 5 held out for the periodic eval (Dice per vertebra on
this crop, centred on the true boxes). `data_tools.localize` interpolates the
class probabilities linearly onto each volume's own grid. ~20 min alone on 2 cores (3000 steps).

Why the large z shift: the levels must be counted from the anatomy (the skull base, the C1 ring
around the dens, the tall C2), not from where the crop puts them. Trained with 6 mm of shift, this
pass learned that the column sits in the middle of its crop and labelled by position: where the
coarse centre was 9-22 mm off (long or wide scans, unseen proportions) every level came out one
too high or too low. With 20 mm of shift it reads C1-C3 right on those scans; what it still gets
wrong is the middle of the column on unseen proportions (discs 0.6-1.4x, other heights): a level
skipped or doubled around C4-C6.

Chosen on validation studies only: fold 0 of the demo's training studies (6 with masks,
"standard") and `data_tools.synthetic --variant=shifted --seed=12` (12 studies, "shifted"); the
reported held-out sets (the demo's, and shifted seed 11) chose nothing. Full-grid Dice,
standard / shifted, each with configs/localizer_coarse.py as the coarse pass unless noted:
  - the first localizer alone (whole scan stretched onto 64^3, 1200 steps):  0.884 / 0.394
  - jitter 6 mm, zoom 12%, 1500 steps (the previous config):                  0.926 / 0.504
      the same with a fixed-6 mm coarse pass (volume_spacing_mm):             0.813 / 0.452
  - jitter 16/10/10, zoom 20%, 1200 steps, + fixed-6 mm coarse 500 steps:     0.741 / 0.494
  - jitter 10/6/6, zoom 15% + 20% along z (augment.scale_z), 1500 steps:      0.843 / 0.449
      the same with a fixed-6 mm coarse pass with the z zoom:                 0.787 / 0.602
  - jitter 6 mm + the scan cut shorter (fov_cut_prob 0.5), 1500 steps:        0.815 / 0.533
      the same with a coarse pass trained with the cut and 15% zooms:         0.595 / 0.492
  - jitter 20/6/6 + the cut, 1500 steps:                                      0.743 / 0.513
  - jitter 20/6/6 + the cut, 3000 steps (this config):                        0.887 / 0.617
      the same, seed 1:                                                       0.803 / 0.528
It gives up 0.04-0.12 on the standard studies for 0.02-0.11 on the shifted ones (seeds 0-1; on the
reported held-out sets: 0.78-0.85 against 0.916 on the demo's, 0.58-0.66 against 0.283 on shifted
seed 11): the trade the localizer of a new scanner needs. Its eval Dice was still rising at 3000
steps. Averaging the last pass over crops moved -15/0/+15 mm added 0.012 on the
shifted studies (not adopted). Issue 18's 0.92 on unseen variants is not reached.
"""
from configs import common


def get_config():
  config = common.localizer(common.get_config())
  d = config.data
  d.crop_mode = 'region'  # a fixed-spacing crop centred on the C1-C7 box ...
  d.with_segmentation = True  # ... with its true labels
  d.fit_to_box = False
  d.input_shape = (80, 48, 48)
  d.spacing_mm = (2.5, 2.5, 2.5)
  # 20 mm along z: more than a level's height, so the levels are counted from the anatomy and
  # not from the crop's centre (6 mm taught it to label by position: see the docstring).
  d.augment.jitter_mm = (20.0, 6.0, 6.0)
  d.augment.rotate_deg = 10.0
  d.augment.scale = 0.12
  d.augment.intensity_scale = 0.1
  d.augment.intensity_shift_hu = 40.0
  d.augment.noise_hu = 25.0
  d.augment.fov_cut_prob = 0.5  # scans that stop anywhere from the skull to C1 and C7 to T2
  config.batch_size = 2
  config.total_steps = 3000  # 1500 was not enough with the 20 mm shift (0.743 / 0.513)
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  # The coarse pass (configs/localizer_coarse.py) whose labels place this one's crop; read by
  # data_tools.localize and predict, checked when training starts.
  config.localizer.coarse_workdir = ''
  return config
