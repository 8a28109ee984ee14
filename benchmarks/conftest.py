"""pytest-benchmark suites: ``pytest benchmarks`` (small sizes on CPU, realistic on GPU).

Triton is not put in interpreter mode here: benchmarks time real kernels only.
Save a run with ``--benchmark-json run.json`` and read it with ``python benchmarks/compare.py run.json``.
"""

import open_clip
import pytest

from tests.conftest import TINY_CONFIG  # noqa: F401  (registers nothing; path of the tiny config)

from ._harness import bench_device

open_clip.add_model_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
