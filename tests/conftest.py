import sys
from pathlib import Path

import pytest
import torch

# Make `tests/helpers.py` importable as `helpers` from every test module.
sys.path.insert(0, str(Path(__file__).parent))

BENCHMARKS = Path(__file__).parent / "benchmarks"


def pytest_ignore_collect(collection_path, config):
    """Leave the pytest-benchmark suite out of the default run (it times, it does not test),
    unless it is named on the command line or --benchmark-only asks for benchmarks."""
    if collection_path != BENCHMARKS:
        return None
    if config.getoption("benchmark_only", default=False):
        return None
    here = config.invocation_params.dir
    for arg in config.args:
        path = (here / arg.split("::")[0]).resolve()
        if path == BENCHMARKS or BENCHMARKS in path.parents:
            return None
    return True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
