"""data_tools.bench_convert on two tiny studies: the dcm2niix baseline converts the same voxels as
ours, every tool is measured, and the per-stage profile accounts for each study's time."""
import glob
import os

import nibabel as nib
import numpy as np
import pytest

from cspine_jax.data import store
from data_tools import bench_convert
from data_tools import synthetic

pytest.importorskip('dcm2niix', reason='the C++ baseline (test extra)')


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('rsna'))
  records = []
  for i, syntax in enumerate((synthetic.JPEG_LOSSLESS, synthetic.EXPLICIT_VR_LE)):
    study = synthetic.make_study(4, i, 32, labels=np.zeros(8, int), transfer_syntax=syntax)
    records.append(synthetic.write_study(study, root, 'train', None))
  synthetic.write_csvs(root, records)
  scratch = str(tmp_path_factory.mktemp('scratch'))
  result = bench_convert.bench_convert(root, 1, scratch, repeats=1)
  result['profile'] = bench_convert.profile(root, scratch, result['dcm2niix']['per_study_s'])
  return root, scratch, result


def test_every_tool_measured(bench):
  _, _, result = bench
  assert result['studies'] == 2 and result['slices'] > 40
  for tool in ('ours', 'dcm2niix', 'dcm2niix_same_cores'):
    r = result[tool]
    assert r['slices_per_s'] > 0 and r['cpu_s'] > 0 and r['mib_on_disk'] > 0
    assert 10 < r['peak_rss_mib'] < 4096, tool  # MiB of one process, not KiB or bytes
  assert result['ratio'] == result['ratio_vs_dcm2niix'] > 0
  assert result['ratio_per_core'] == round(result['ratio'] / result['workers'], 2)


def test_dcm2niix_converts_the_same_voxels(bench):
  """The baseline does the same job: its NIfTI values (nibabel applies the header's scale) are
  our HU, up to the voxel order (dcm2niix flips rows into its own orientation)."""
  _, scratch, result = bench
  niftis = [nib.load(p) for p in glob.glob(os.path.join(scratch, 'dcm2niix', '*.nii'))]
  assert len(niftis) == 2
  for uid in result['dcm2niix']['per_study_s']:
    ours = store.read_array(store.array_path(os.path.join(scratch, 'ours'), store.VOLUMES, uid))
    ours = np.sort(ours.ravel()).astype(np.float64)
    same = [np.array_equal(np.sort(np.rint(np.asarray(img.dataobj)).ravel()), ours)
            for img in niftis]
    assert sum(same) == 1, uid


def test_profile_accounts_for_each_study(bench):
  _, _, result = bench
  profile = result['profile']
  syntaxes = set()
  for study in profile['studies'].values():
    assert study['status'] == 'ok'
    stages = study['stages_ms_per_slice']
    for name in ('file listing and header parsing', 'sorting and geometry checks',
                 'HU conversion', 'zarr3 encode and write', 'derived levels',
                 'manifest and bookkeeping'):
      assert stages[name] >= 0, name
    decode = [k for k in stages if k.startswith('pixel decode (')]
    assert len(decode) == 1 and stages[decode[0]] > 0
    syntaxes.add(decode[0])
    # 'other' is what no stage recorded: the stages add up to the study's time.
    assert sum(stages.values()) == pytest.approx(study['total_ms_per_slice'], abs=0.01)
    assert study['dcm2niix_ms_per_slice'] > 0
  assert syntaxes == {'pixel decode (JPEG Lossless)', 'pixel decode (Explicit VR Little Endian)'}
  assert 0 < profile['worker_imports_s'] < profile['worker_start_s']
