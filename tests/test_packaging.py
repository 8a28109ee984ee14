"""mpfast.kernels comes from the top-level kernels/ folder, in a checkout and in a wheel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mpfast.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_importable_from_checkout():
    assert Path(mpfast.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert callable(mpfast.kernels.load_ops)


@pytest.mark.slow
def test_wheel_ships_kernels_as_mpfast_kernels(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".*cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, env={**os.environ, "MPFAST_BUILD_EXT": "0"})
    (wheel,) = (tmp_path / "dist").glob("mpfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mpfast/kernels/__init__.py" in names
    assert "mpfast/ops/temporal_diff.py" in names
    assert {"mpfast/model_configs/mpfast-tiny.json", "mpfast/profiling/budgets.json"} <= set(names)  # package data
    assert not any(name.startswith(("kernels/", "tests/")) for name in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = "import mpfast.kernels, mpfast.ops; print(mpfast.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert Path(out.stdout.strip()).resolve() == (target / "mpfast" / "kernels" / "__init__.py").resolve()


def test_import_does_not_initialise_cuda_or_load_backends():
    # (open_clip itself imports triton through timm; mpfast's kernels load on first use only.)
    code = "import sys, torch, mpfast, mpfast.ops; print(torch.cuda.is_initialized(), 'mpfast.kernels' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
