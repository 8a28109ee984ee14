"""pytest-benchmark suites: ``pytest benchmarks`` (small sizes on CPU, realistic on GPU).

Triton is not put in interpreter mode here: benchmarks time real kernels only.
On CPU the benchmarks use ``MPFAST_BENCH_THREADS`` torch threads (default 1): on a
small shared machine, multi-threaded timings of small ops are dominated by threads
waiting for a descheduled sibling (medians in multiples of the scheduler tick).
Save a run with ``--benchmark-json run.json`` and read it with ``python benchmarks/compare.py run.json``.
"""

import os
from pathlib import Path

import open_clip
import pytest

from ._harness import bench_device

# The tiny open_clip config of the test suite (CPU end-to-end benchmark).
open_clip.add_model_config(Path(__file__).parents[1] / "tests" / "configs" / "mpfast-tiny.json")


@pytest.fixture(scope="session", autouse=True)
def device():
    device = bench_device()
    if device.type == "cpu":
        import torch

        torch.set_num_threads(int(os.environ.get("MPFAST_BENCH_THREADS", "1")))
    return device


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
