"""setup.cfg against the code: every requirement bounded above and installed within its bounds,
every import of the package declared, nothing declared that nothing imports; and the JPEG
Lossless decoders the DICOM reader relies on (libjpeg-turbo, pydicom's GDCM plugin as the fallback)
agree, without pylibjpeg."""
import ast
import configparser
import importlib.metadata
import os
import sys

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pydicom
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders import JPEGLosslessSV1Decoder
import pytest

from data_tools import dicom
from data_tools import synthetic
from tests.conftest import repo_root

PACKAGE_DIRS = ('cspine_jax', 'data_tools', 'configs')
FIRST_PARTY = {'cspine_jax', 'data_tools', 'configs', 'tests'}
# Import name -> distribution name, for every third-party module the code imports.
DISTRIBUTIONS = {
    'absl': 'absl-py', 'apache_beam': 'apache-beam', 'boto3': 'apache-beam',
    'dcm2niix': 'dcm2niix', 'flax': 'flax', 'gdcm': 'python-gdcm', 'grain': 'grain',
    'highdicom': 'highdicom', 'imagecodecs': 'imagecodecs', 'jax': 'jax',
    'ml_collections': 'ml-collections', 'moto': 'moto',
    'monai': 'monai', 'nibabel': 'nibabel', 'numpy': 'numpy', 'optax': 'optax',
    'orbax': 'orbax-checkpoint', 'packaging': 'pytest', 'PIL': 'pillow', 'psutil': 'psutil',
    'pydicom': 'pydicom', 'pytest': 'pytest', 'scipy': 'scipy', 'SimpleITK': 'SimpleITK',
    'sklearn': 'scikit-learn', 'tensorboardX': 'tensorboardX', 'tensorstore': 'tensorstore',
    'torch': 'torch', 'tqdm': 'tqdm', 'vit_pytorch': 'vit-pytorch',
}  # packaging: the tests' own requirement parser, installed with pytest (its dependency); boto3:
#    installed with apache-beam[aws] (its "aws" extra's), the tests' S3 client.
# Modules only an extra's users import (the rest of the package never does): their module-level
# imports may come from that extra.
EXTRA_MODULES = {'data_tools/beam_convert.py': 'beam'}


def _requirements(section: str, key: str) -> list[Requirement]:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(repo_root(), 'setup.cfg'))
  lines = [l.strip() for l in cfg.get(section, key).splitlines()]
  return [Requirement(l) for l in lines if l and not l.startswith('#')]


def _extras() -> dict[str, list[Requirement]]:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(repo_root(), 'setup.cfg'))
  return {name: _requirements('options.extras_require', name)
          for name in cfg.options('options.extras_require')}


def _names(reqs) -> set[str]:
  return {canonicalize_name(r.name) for r in reqs}


def _imports(folders) -> dict[str, dict[str, list[str]]]:
  """{'top' | 'deferred': {top-level module: [file:line, ...]}} of the absolute imports in
  ``folders``. 'deferred' are inside a function (optional dependencies, loaded on use)."""
  found = {'top': {}, 'deferred': {}}

  def visit(node, where, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      if isinstance(child, ast.Import):
        mods = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom) and child.level == 0:
        mods = [child.module]
      else:
        mods = []
      for mod in mods:
        top = mod.split('.')[0]
        found['deferred' if in_function else 'top'].setdefault(top, []).append(
            f'{where}:{child.lineno}')
      visit(child, where, inner)

  for folder in folders:
    for dirpath, _, files in os.walk(os.path.join(repo_root(), folder)):
      for name in sorted(files):
        if name.endswith('.py'):
          path = os.path.join(dirpath, name)
          with open(path) as f:
            tree = ast.parse(f.read(), path)
          visit(tree, os.path.relpath(path, repo_root()), False)
  return found


def _third_party(modules: dict) -> dict[str, list[str]]:
  return {m: w for m, w in modules.items()
          if m not in FIRST_PARTY and m not in sys.stdlib_module_names}


def _upper_bounded(req: Requirement) -> bool:
  return any(s.operator in ('<', '<=', '==', '~=', '===') for s in req.specifier)


def test_every_requirement_has_an_upper_bound():
  reqs = _requirements('options', 'install_requires')
  assert len(reqs) >= 15  # the parse saw the list, not an empty value
  for extra in _extras().values():
    reqs += extra
  assert not [str(r) for r in reqs if not _upper_bounded(r)]


def test_installed_versions_are_within_the_bounds():
  """The environment the suite runs in is the one the bounds were chosen for."""
  reqs = _requirements('options', 'install_requires') + _extras()['test']
  outside = []
  for r in reqs:
    version = importlib.metadata.version(r.name)
    if not r.specifier.contains(version, prereleases=True):
      outside.append(f'{r.name} {version} not in {r.specifier}')
  assert not outside


def test_every_import_of_the_package_is_declared():
  install = _names(_requirements('options', 'install_requires'))
  extras = set().union(*(_names(v) for v in _extras().values()))
  found = _imports(PACKAGE_DIRS)
  top, deferred = _third_party(found['top']), _third_party(found['deferred'])
  assert {'jax', 'flax', 'pydicom', 'gdcm', 'imagecodecs'} <= set(top)  # the walk saw the code
  unmapped = sorted((set(top) | set(deferred)) - set(DISTRIBUTIONS))
  assert not unmapped, f'add these to DISTRIBUTIONS: {unmapped}'
  # A module-level import runs on every use of its module: install_requires, or the extra of a
  # module only that extra's users import.
  extra_of = {path: _names(_extras()[extra]) for path, extra in EXTRA_MODULES.items()}
  assert all(os.path.isfile(os.path.join(repo_root(), p)) for p in EXTRA_MODULES)

  def declared(module, where):
    dist = canonicalize_name(DISTRIBUTIONS[module])
    return dist in install or dist in extra_of.get(where.rsplit(':', 1)[0], set())

  missing = {m: bad for m, w in top.items() if (bad := [x for x in w if not declared(m, x)])}
  assert not missing, missing
  # One inside a function (torch, MONAI, SimpleITK in the benchmarks) may be an extra's.
  missing = {m: w for m, w in deferred.items()
             if canonicalize_name(DISTRIBUTIONS[m]) not in install | extras}
  assert not missing, missing
  # And nothing is required that no code imports.
  used = {canonicalize_name(DISTRIBUTIONS[m]) for m in top}
  assert install - used == set()


def _module_level(tree):
  """The nodes run when the module is imported (not those inside a function, run on use)."""
  stack = list(tree.body)
  while stack:
    node = stack.pop()
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      yield node
      stack.extend(ast.iter_child_nodes(node))


def test_extra_modules_are_imported_by_nothing_else():
  """An extra-only module stays one: the rest of the package imports it only inside a function
  (data_tools.convert, on --runner), so the pool and the training stack never need the extra."""
  extra_modules = {os.path.splitext(p)[0].replace('/', '.') for p in EXTRA_MODULES}
  found = []
  for folder in PACKAGE_DIRS:
    for dirpath, _, files in os.walk(os.path.join(repo_root(), folder)):
      for name in sorted(f for f in files if f.endswith('.py')):
        path = os.path.join(dirpath, name)
        with open(path) as f:
          tree = ast.parse(f.read(), path)
        for node in _module_level(tree):
          if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
          else:
            continue
          if extra_modules & set(names):
            found.append(f'{os.path.relpath(path, repo_root())}:{node.lineno}')
  assert not found, found


def test_every_import_of_the_tests_is_in_the_test_extra():
  declared = (_names(_requirements('options', 'install_requires'))
              | _names(_extras()['test']))
  found = _imports(['tests'])
  modules = {**_third_party(found['top']), **_third_party(found['deferred'])}
  assert 'pytest' in modules
  missing = {m: w for m, w in modules.items()
             if m not in DISTRIBUTIONS or canonicalize_name(DISTRIBUTIONS[m]) not in declared}
  assert not missing, missing


@pytest.mark.parametrize('storage', ['signed12', 'unsigned12'])
def test_jpeg_lossless_decoders_agree_without_pylibjpeg(tmp_path, storage):
  """The reader's two JPEG Lossless paths: libjpeg-turbo (imagecodecs) first, pydicom's GDCM
  plugin as the fallback (its first choice; pylibjpeg, no longer required, would only come
  after)."""
  assert 'gdcm' in JPEGLosslessSV1Decoder.available_plugins  # pydicom registers it first
  study = synthetic.make_study(5, 0, 32, storage=storage,
                               transfer_syntax=synthetic.JPEG_LOSSLESS)
  synthetic.write_study(study, str(tmp_path), 'train', None)
  folder = tmp_path / 'train_images' / study.uid
  name = sorted(os.listdir(folder))[len(os.listdir(folder)) // 2]
  path = str(folder / name)
  with open(path, 'rb') as f:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    s = dicom._Slice(name, path, ds, None, None, f.tell())
  assert ds.file_meta.TransferSyntaxUID == synthetic.JPEG_LOSSLESS
  fast, _ = dicom._fast_stored(s, np.empty((32, 32), np.uint16))
  gdcm_values = pixel_array(path, decoding_plugin='gdcm')
  assert fast.dtype == gdcm_values.dtype
  np.testing.assert_array_equal(fast, gdcm_values)
  assert np.unique(fast).size > 10  # a real image, not a constant


@pytest.mark.parametrize('line', ['jax>=0.10', 'numpy>=1.26,!=2.0.0'])
def test_unbounded_lines_are_caught(line):
  assert not _upper_bounded(Requirement(line))
