from pathlib import Path

import pytest
import torch

import deformvit  # noqa: F401  (registers the models with timm)

FIXTURES = Path(__file__).parent / 'fixtures'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', help='also run tests marked slow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'):
        return
    skip = pytest.mark.skip(reason='slow: run with --runslow (make test-all)')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)
