"""CT-like phantoms of the neck: air, skin and fat, muscle, airway, occiput, C1-C7 and T1-T4.

Every vertebra has a cortical shell around cancellous bone, a posterior arch around the spinal
canal, a spinous process and transverse processes; C1 is a ring around the dens of C2; discs lie
between the bodies. Fractures are thin planes of soft-tissue density cut through the bone of one
vertebra ("fracture lines"), oriented mostly vertically so they cross many axial slices.

Everything is analytic in patient (LPS) millimetres and rendered slice by slice on the real DICOM
pixel grid, so the same phantom can be drawn at any resolution and any in-plane orientation.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Hounsfield units of the tissues (means; noise is added on top).
HU_AIR = -1000
HU_FAT = -100
HU_MUSCLE = 45
HU_CORD = 30
HU_DISC = 85
HU_CANCELLOUS = 260
HU_CORTICAL = 1100
HU_ARCH = 750
HU_FRACTURE = 20  # haematoma/soft tissue filling the fracture gap

# Body sizes (mm) of C1..C7, T1..T4: height, lateral and AP semi-axes (C1: ring only).
_LEVELS = (
    # name, label, body height, rx, ry
    ('C1', 1, 9.0, 0.0, 0.0),
    ('C2', 2, 17.0, 8.5, 7.5),
    ('C3', 3, 12.5, 8.5, 7.5),
    ('C4', 4, 12.5, 9.0, 7.5),
    ('C5', 5, 12.5, 9.5, 8.0),
    ('C6', 6, 13.0, 10.0, 8.0),
    ('C7', 7, 14.0, 10.5, 8.5),
    ('T1', 8, 16.0, 11.5, 9.5),
    ('T2', 9, 17.0, 12.5, 10.0),
    ('T3', 10, 18.0, 13.0, 10.5),
    ('T4', 11, 18.5, 13.5, 11.0),
)
DISC_MM = 4.5


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """The uniform ranges a phantom's anatomy is drawn from (mm, or factors)."""
  scale: tuple = (0.9, 1.1)  # every size of the spine
  level_jitter: tuple = (0.95, 1.05)  # each body's height, on top of the scale
  disc_scale: tuple | None = None  # each disc's height factor; None: the scale alone
  neck_ax: tuple = (52, 66)  # the neck's lateral and AP semi-axes
  neck_ay: tuple = (46, 56)
  lordosis: tuple = (0, 8)  # anterior bow of the mid-neck (negative: a kyphosis)
  tilt: float = 0.05  # lateral drift of the spine per mm of z, +-


# 'standard': what every demo, test and tuning run draws from. 'shifted': other proportions
# (a wider size range, discs 0.6-1.4x, slimmer and thicker necks, straightened or kyphotic and
# more tilted spines), for measuring how a model tuned on 'standard' holds on anatomy it was
# never tuned on (data_tools.synthetic --variant=shifted; issue 18).
ANATOMIES = {
    'standard': Anatomy(),
    'shifted': Anatomy(scale=(0.8, 1.25), level_jitter=(0.88, 1.12), disc_scale=(0.6, 1.4),
                       neck_ax=(44, 76), neck_ay=(38, 64), lordosis=(-6, 16), tilt=0.12),
}


@dataclasses.dataclass
class Vertebra:
  name: str
  label: int
  z_top: float  # LPS z of the superior endplate (mm; larger = more superior)
  z_bot: float
  rx: float
  ry: float
  fractures: list  # list of (point (3,), unit normal (3,), half-thickness mm)


@dataclasses.dataclass
class Phantom:
  """A neck, in patient LPS millimetres."""
  neck_center: tuple  # (x, y)
  neck_axes: tuple  # (ax, ay) semi-axes
  fat_mm: float
  spine_x: float
  spine_y: float
  lordosis_mm: float
  tilt_x: float  # lateral drift of the spine per mm of z
  z_occiput: float  # bottom of the occiput plate
  vertebrae: list
  z_mid: float
  z_len: float

  def spine_center(self, z: float) -> tuple[float, float]:
    """Centre of the vertebral bodies at height z: lordosis bows the mid-neck anteriorly."""
    t = (z - self.z_mid) / (0.5 * self.z_len)
    y = self.spine_y - self.lordosis_mm * (1.0 - np.clip(t, -1, 1) ** 2)
    x = self.spine_x + self.tilt_x * (z - self.z_mid)
    return x, y


def make_phantom(rng: np.random.Generator, z_top_of_c1: float, fractured: set[str],
                 anatomy: Anatomy = ANATOMIES['standard']) -> Phantom:
  """Random anatomy; vertebrae in ``fractured`` (names C1..C7) get 1-2 fracture lines each.

  The 'standard' anatomy draws exactly the numbers it always drew (datasets stay the same).
  """
  a = anatomy
  scale = rng.uniform(*a.scale)
  vertebrae = []
  z = z_top_of_c1
  for name, label, height, rx, ry in _LEVELS:
    h = height * scale * rng.uniform(*a.level_jitter)
    vertebrae.append(Vertebra(name, label, z, z - h, rx * scale, ry * scale, []))
    # C1 sits on the C2 lateral masses with no disc; below C2 each body has a disc under it.
    disc = DISC_MM * scale * (rng.uniform(*a.disc_scale) if a.disc_scale else 1.0)
    z = z - h - (1.5 if name == 'C1' else disc)
  z_len = vertebrae[0].z_top - vertebrae[6].z_bot
  phantom = Phantom(
      neck_center=(rng.uniform(-6, 6), rng.uniform(-8, 4)),
      neck_axes=(rng.uniform(*a.neck_ax), rng.uniform(*a.neck_ay)),
      fat_mm=rng.uniform(4, 10),
      spine_x=rng.uniform(-4, 4),
      spine_y=rng.uniform(4, 12),
      lordosis_mm=rng.uniform(*a.lordosis),
      tilt_x=rng.uniform(-a.tilt, a.tilt),
      z_occiput=z_top_of_c1 + rng.uniform(3, 5),
      vertebrae=vertebrae,
      z_mid=z_top_of_c1 - 0.5 * z_len,
      z_len=z_len,
  )
  for v in vertebrae:
    if v.name in fractured:
      for _ in range(rng.integers(1, 3)):
        v.fractures.append(_random_fracture(rng, phantom, v))
  return phantom


def _random_fracture(rng, phantom: Phantom, v: Vertebra):
  """A fracture plane through the vertebra's bone: through the body or the posterior arch."""
  zc = rng.uniform(v.z_bot + 0.25 * (v.z_top - v.z_bot), v.z_top - 0.25 * (v.z_top - v.z_bot))
  cx, cy = phantom.spine_center(zc)
  if v.name == 'C1' or rng.random() < 0.35:
    # Through the ring/arch: a point on the arch, behind (or, for C1, around) the canal.
    angle = rng.uniform(0, 2 * np.pi) if v.name == 'C1' else rng.uniform(0.2 * np.pi, 0.8 * np.pi)
    rad = _canal_radius(v) + 2.0
    ccy = cy + _canal_offset(v)
    point = np.array([cx + rad * np.cos(angle), ccy + rad * np.sin(angle), zc])
  else:
    point = np.array([cx + rng.uniform(-0.4, 0.4) * v.rx, cy + rng.uniform(-0.4, 0.4) * v.ry, zc])
  # Mostly vertical planes (normal close to the axial plane) so the line shows on axial slices.
  theta = rng.uniform(0, np.pi)
  nz = rng.uniform(-0.35, 0.35)
  normal = np.array([np.cos(theta), np.sin(theta), nz])
  normal /= np.linalg.norm(normal)
  half = rng.uniform(0.8, 1.2)
  return point, normal, half


def _canal_radius(v: Vertebra) -> float:
  return 8.0 if v.name != 'C1' else 11.0


def _canal_offset(v: Vertebra) -> float:
  """AP distance from the body centre to the canal centre."""
  return (v.ry + _canal_radius(v) + 1.0) if v.name != 'C1' else 9.0


def render_slice(phantom: Phantom, z: float, X: np.ndarray, Y: np.ndarray, min_half_mm: float
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
  """HU (float32), labels (uint8: 1-7 C1-C7, 8+ thoracic) and fracture masks of one slice.

  X, Y: LPS coordinates (mm) of each pixel. ``min_half_mm`` is the least half-width of a fracture
  gap: the generator passes 0.85 pixel, so a gap stays ~1.7 pixels wide (visible) at coarse
  resolution, and keeps its 1.6-2.4 mm width at real resolution. Returns fracture masks by vertebra name.
  """
  hu = np.full(X.shape, HU_AIR, np.float32)
  lab = np.zeros(X.shape, np.uint8)
  nx, ny = phantom.neck_center
  ax, ay = phantom.neck_axes
  r_neck = ((X - nx) / ax) ** 2 + ((Y - ny) / ay) ** 2
  hu[r_neck < 1] = HU_FAT
  inner = ((X - nx) / (ax - phantom.fat_mm)) ** 2 + ((Y - ny) / (ay - phantom.fat_mm)) ** 2 < 1
  hu[inner] = HU_MUSCLE
  # Skin: a thin soft-tissue rim.
  hu[(r_neck < 1) & (r_neck > (1 - 2.0 / min(ax, ay)) ** 2)] = HU_MUSCLE
  cx, cy = phantom.spine_center(z)
  # Airway, anterior to the spine.
  hu[(X - cx) ** 2 + (Y - (ny - 0.45 * ay)) ** 2 < 8.0 ** 2] = HU_AIR

  if phantom.z_occiput <= z <= phantom.z_occiput + 30:
    # Occiput / skull base: a thick bony plate with the foramen magnum (not a label).
    plate = (((X - nx) / (ax * 0.95)) ** 2 + ((Y - ny) / (ay * 0.95)) ** 2 < 1)
    magnum = (X - cx) ** 2 + (Y - (cy + 10)) ** 2 < 15 ** 2
    hu[plate & ~magnum] = HU_ARCH

  fracture_masks = {}
  for v in phantom.vertebrae:
    if not (v.z_bot - DISC_MM <= z <= v.z_top + 20):
      continue
    bone = np.zeros(X.shape, bool)
    cortical = np.zeros(X.shape, bool)
    in_body_z = v.z_bot <= z <= v.z_top
    canal_r = _canal_radius(v)
    ccx, ccy = cx, cy + _canal_offset(v)
    if in_body_z and v.name != 'C1':
      r = np.sqrt(((X - cx) / v.rx) ** 2 + ((Y - cy) / v.ry) ** 2)
      body = r < 1
      shell = 1.6 / min(v.rx, v.ry)
      endplate = min(z - v.z_bot, v.z_top - z) < 1.2
      cortical |= body & ((r > 1 - shell) | endplate)
      bone |= body
      hu[body] = HU_CANCELLOUS
    # Posterior arch: a ring around the canal, thinner in z than the body.
    arch_top = v.z_top - 0.15 * (v.z_top - v.z_bot)
    arch_bot = v.z_bot + 0.15 * (v.z_top - v.z_bot)
    if v.name == 'C1':
      arch_top, arch_bot = v.z_top, v.z_bot
    if arch_bot <= z <= arch_top:
      d = np.sqrt((X - ccx) ** 2 + (Y - ccy) ** 2)
      thick = 4.0 if v.name != 'C1' else 5.0
      ring = (d >= canal_r) & (d < canal_r + thick)
      if v.name != 'C1':
        ring &= Y > cy  # pedicles and laminae only: the front of the ring is the body
      spinous = ((np.abs(X - ccx) < 2.5) & (Y > ccy + canal_r) &
                 (Y < ccy + canal_r + thick + 10.0 + 1.0 * (v.label - 1)))
      transverse = ((np.abs(Y - (cy + v.ry * 0.6)) < 2.5) &
                    (np.abs(X - cx) < canal_r + 12.0 + (2.0 if v.label >= 7 else 0.0)) &
                    (np.abs(X - cx) > 0.5 * canal_r))
      arch = (ring | spinous | transverse) & inner
      hu[arch & ~bone] = HU_ARCH
      bone |= arch
      cortical |= ring & (np.abs(d - canal_r - thick / 2) > thick / 2 - 1.0)
      # Spinal cord inside the canal.
      hu[d < 0.55 * canal_r] = HU_CORD
    if v.name == 'C2':
      # The dens rises from the C2 body into the C1 ring.
      c1 = phantom.vertebrae[0]
      if v.z_top < z <= c1.z_top - 1.0:
        dens = (X - cx) ** 2 + (Y - (cy + 1.0)) ** 2 < 5.0 ** 2
        hu[dens] = HU_CANCELLOUS
        cortical |= dens & ((X - cx) ** 2 + (Y - (cy + 1.0)) ** 2 > 3.6 ** 2)
        bone |= dens
    hu[cortical & bone] = HU_CORTICAL
    lab[bone] = v.label
    if v.name != 'C1' and v.z_bot - DISC_MM * 0.95 <= z < v.z_bot:
      disc = ((X - cx) / v.rx) ** 2 + ((Y - cy) / v.ry) ** 2 < 1
      hu[disc] = HU_DISC
    for point, normal, half in v.fractures:
      dist = (X - point[0]) * normal[0] + (Y - point[1]) * normal[1] + (z - point[2]) * normal[2]
      line = bone & (np.abs(dist) < max(half, min_half_mm))
      if line.any():
        hu[line] = HU_FRACTURE
        fracture_masks[v.name] = fracture_masks.get(v.name, np.zeros(X.shape, bool)) | line
  return hu, lab, fracture_masks
