"""The CUDA kernels (csrc/*.cu) run on CPU tensors through the emulation in tests/cuda_sim.

No GPU needed: the kernels compile as C++ against a CPU model of threads, barriers and
shuffles (tests/cuda_sim/README.md) and run as the ``cuda`` backend for a selection of the
op suites' cuda-backend tests: each kernel and its rarer paths (vector loads, more than
eight strides, several feature chunks and key tiles, masks, stride-0 and permuted layouts,
shared and per-video queries, fully padded videos). The whole suites run with
``PYTHONPATH=tests/cuda_sim python -m pytest -p plugin tests/test_<op>.py -k cuda``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "tests" / "cuda_sim"

SELECTION = [
    "tests/test_temporal_diff.py::test_matches_reference[cuda-(1, 3, 2, 40, 60)-(1, 2)-torch.float32]",
    "tests/test_temporal_diff.py::test_matches_reference[cuda-(2, 5, 33)-(1, 2, 4, 5, 9)-torch.float64]",
    "tests/test_temporal_diff.py::test_expanded_grad[cuda]",
    "tests/test_motion_mix.py::test_matches_reference[cuda-(3, 5, 3, 77)-torch.float64]",
    "tests/test_motion_mix.py::test_permuted_layouts[cuda]",
    "tests/test_motion_mix.py::test_expanded_grads[cuda]",
    "tests/test_prompt_attention.py::test_matches_reference[cuda-(3, 7, 6, 2, 17, True, 'some')-torch.float64]",
    "tests/test_prompt_attention.py::test_matches_reference[cuda-(2, 4, 5, 1, 128, True, 'all_first')-torch.float64]",
    "tests/test_prompt_attention.py::test_matches_reference[cuda-(1, 9, 100, 1, 16, False, 'leading')-torch.float64]",
    "tests/test_prompt_attention.py::test_matches_reference[cuda-(2, 33, 9, 3, 32, False, 'some')-torch.bfloat16]",
    "tests/test_prompt_attention.py::test_head_major_layouts[cuda-True]",
    "tests/test_prompt_attention.py::test_broadcast_keys_gradients[cuda]",
    "tests/test_prompt_attention.py::test_fully_padded_rows_are_zero_with_finite_grads[cuda]",
    "tests/test_class_logits.py::test_core_op_matches_reference[cuda-(2, 70, 9, 3, 5, 20, 'all_first')-torch.float64]",
    "tests/test_class_logits.py::test_core_op_matches_reference[cuda-(3, 7, 6, 2, 17, 33, 'some')-torch.float64]",
    "tests/test_class_logits.py::test_every_key_of_a_video_padded[cuda]",
    "tests/test_class_logits.py::test_expanded_and_broadcast_gradients[cuda]",
]


@pytest.mark.slow  # about a minute, and 40 s more to build the emulation the first time
def test_cuda_kernels_pass_their_op_tests_emulated(monkeypatch):
    if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/include/cuda_runtime_api.h").is_file():
        monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    sys.path.insert(0, str(SIM))
    try:
        from build import cuda_include
    finally:
        sys.path.remove(str(SIM))
    if cuda_include() is None:
        pytest.skip("the CUDA emulation needs a CUDA toolkit's headers: set CUDA_HOME")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SIM), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "plugin", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         *SELECTION], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert summary.startswith(f"{len(SELECTION)} passed") and "skipped" not in summary, summary
