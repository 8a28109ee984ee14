"""The mpfast command and python -m mpfast.info, as a user runs them."""

import shutil
import subprocess
import sys

import pytest


def test_info_module_lists_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "mpfast.info"], capture_output=True, text=True, check=True).stdout
    for line in ("torch ", "triton ", "backends for cpu tensors:", "reference  available", "cuda       unavailable"):
        assert line in out


def test_console_script():
    assert shutil.which("mpfast"), "the mpfast console script is not on PATH: pip install -e ."
    out = subprocess.run(["mpfast", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out
    out = subprocess.run(["mpfast", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends for cpu tensors:" in out


def test_unknown_command_fails_clearly():
    result = subprocess.run([sys.executable, "-m", "mpfast", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr


def test_errors_are_one_line_unless_verbose(capsys):
    from mpfast.cli import main

    assert main(["report", "--frames", "0"]) == 2
    err = capsys.readouterr().err
    assert "mpfast report: error: frames must be positive ints, got (0,)" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="frames must be positive ints"):
        main(["-v", "report", "--frames", "0"])
