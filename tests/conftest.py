"""Shared fixtures: a small synthetic RSNA-shaped dataset, converted once per test session."""
import os

import pytest

from configs import smoke
from data_tools import convert
from data_tools import synthetic


@pytest.fixture(scope='session')
def synthetic_converted(tmp_path_factory):
  """(raw RSNA root, converted root) of 10 labelled 48x48 studies (6 with masks) + 1 test."""
  base = tmp_path_factory.mktemp('synthetic')
  raw, out = str(base / 'rsna'), str(base / 'converted')
  synthetic.generate(raw, studies=10, size=48, seed=3, test_studies=1, seg_fraction=0.6)
  records = convert.run(raw, out, workers=1, progress=False)
  assert all(r['status'] == 'ok' for r in records), records
  return raw, out


@pytest.fixture
def smoke_config(synthetic_converted):
  config = smoke.get_config()
  config.data.root = synthetic_converted[1]
  return config


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
