"""The mpfast command as a user runs it: help, version, flag checks, exit codes, logging, build failures.

Most checks run ``python -m mpfast`` in a subprocess (what a user sees: stdout, stderr,
exit code); checks of every flag's value range go through the parser in-process (the
same code, a hundred times faster) with one subprocess run for the message's form.
"""

import argparse
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from mpfast import __version__
from mpfast.cli import EXIT_CODES_HELP, HelpFormatter, build_parser, main


def mpfast(*args: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``python -m mpfast ARGS``; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "mpfast", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr lines, without open_clip's warning that a model has random weights."""
    return [line for line in result.stderr.splitlines() if line.strip() and "No pretrained weights" not in line]


def test_info_module_lists_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "mpfast.info"], capture_output=True, text=True, check=True).stdout
    for line in ("torch ", "triton ", "backends for cpu tensors:", "reference  available", "cuda       unavailable"):
        assert line in out


def test_console_script_version_and_unknown_command():
    assert shutil.which("mpfast"), "the mpfast console script is not on PATH: pip install -e ."
    out = subprocess.run(["mpfast", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"mpfast {__version__} (torch ") and "open_clip" in out
    result = mpfast("frobnicate")
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr
    assert len(error_lines(result)) == 1  # one line, not the usage block


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_its_default_is_shown():
    parser = build_parser()
    commands = _subcommands(parser)
    assert {"info", "cache", "train", "eval", "classify", "report", "build"} <= set(commands)
    for name, command in {"mpfast": parser, **commands}.items():
        assert command.epilog == EXIT_CODES_HELP, name
        assert isinstance(command.formatter_class, type) and issubclass(command.formatter_class, HelpFormatter), name
        text = command.format_help()
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"{name} {flag} has no help"
            meaningful = action.default not in (None, False, [], argparse.SUPPRESS)
            if meaningful:
                shown = "default" in action.help.lower() or f"(default: {action.default})" in " ".join(text.split())
                assert shown, f"{name} {flag}: default {action.default!r} not shown in --help"
    out = mpfast("train", "--help")
    assert out.returncode == 0
    flat = " ".join(out.stdout.split())
    for needle in ("--epochs EPOCHS passes over the training set (default: 30)", "(default: 0.003)",
                   "--amp {none,bf16,fp16}", "exit codes: 0 success; 2 usage or input error", "1 runtime error",
                   "130 interrupted"):
        assert needle in flat, needle


BAD_VALUES = [
    ("train", "--num-frames", "0"),
    ("train", "--epochs", "0"),
    ("train", "--lr", "0"),
    ("train", "--lr", "nan"),
    ("train", "--weight-decay", "-1"),
    ("train", "--warmup-steps", "-1"),
    ("train", "--grad-clip", "-0.5"),
    ("train", "--shots", "0"),
    ("train", "--log-every", "-1"),
    ("train", "--checkpoint-every", "-2"),
    ("train", "--seed", "-1"),
    ("train", "--batch-size", "0"),
    ("eval", "--batch-size", "0"),
    ("eval", "--clips", "0"),
    ("cache", "--stride", "0"),
    ("cache", "--workers", "-1"),
    ("cache", "--crops", "2"),
    ("cache", "--init-seed", "x"),
    ("classify", "--precision", "fp8"),
    ("classify", "--num-frames", "-3"),
    ("report", "--frames", "0"),
    ("report", "--batch", "0"),
    ("report", "--classes", "0"),
    ("report", "--iterations", "0"),
    ("report", "--warmup", "-1"),
    ("report", "--dtype", "int8"),
]
REQUIRED = {
    "train": ["--train-list", "t.txt", "--classes", "a,b", "--output", "o"],
    "eval": ["--list", "t.txt"],
    "cache": ["--list", "t.txt"],
    "classify": ["v.mp4"],
    "report": [],
}


@pytest.mark.parametrize("command,flag,value", BAD_VALUES, ids=[f"{c}{f}={v}" for c, f, v in BAD_VALUES])
def test_out_of_range_values_are_refused_naming_the_flag(command, flag, value, capsys):
    assert main([command, *REQUIRED[command], flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpfast {command}: error: argument {flag}"), err
    assert repr(value) in err[0] or value in err[0]


def test_a_refused_value_is_one_line_from_the_command_line():
    result = mpfast("eval", "--list", "t.txt", "--batch-size", "0")
    assert result.returncode == 2
    assert error_lines(result) == ["mpfast eval: error: argument --batch-size: expected an integer >= 1, got '0' "
                                   "(see `mpfast eval --help`)"]


def test_errors_are_one_line_with_exit_code_2_for_input_and_a_traceback_under_v(tmp_path):
    result = mpfast("eval", "--list", str(tmp_path / "missing.txt"), "--classes", "a,b", "--model", "mpfast-tiny",
                    "--device", "cpu")
    assert result.returncode == 2
    assert error_lines(result) == [f"mpfast eval: error: annotation file '{tmp_path / 'missing.txt'}' does not exist "
                                   "(run `mpfast -v eval ...` for the traceback)"]
    verbose = mpfast("-v", "eval", "--list", str(tmp_path / "missing.txt"), "--classes", "a,b", "--model",
                     "mpfast-tiny", "--device", "cpu")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("mpfast eval: error: annotation file")


def test_runtime_failures_exit_1(monkeypatch, capsys):
    from mpfast.engine import commands

    def fail(args):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(commands, "run_cache", fail)
    assert main(["cache", "--list", "t.txt", "--cache-dir", "c"]) == 1
    assert capsys.readouterr().err.strip() == ("mpfast cache: error: CUDA out of memory. Tried to allocate 2 GiB "
                                               "(run `mpfast -v cache ...` for the traceback)")


def test_verbose_logs_mpfast_but_not_open_clip_info(tmp_path):
    from mpfast.data.synthetic import render_video, write_video
    import numpy as np

    video = tmp_path / "v.mp4"
    write_video(video, render_video("moving up", np.random.default_rng(0), 32, 8))
    result = mpfast("-v", "classify", str(video), "--classes", "up,down", "--model", "mpfast-tiny", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "INFO mpfast.model: created MotionCLIP on mpfast-tiny" in result.stderr
    assert "INFO root" not in result.stderr, result.stderr  # open_clip logs its progress to the root logger
    everything = mpfast("-vv", "classify", str(video), "--classes", "up,down", "--model", "mpfast-tiny", "--device",
                        "cpu")
    assert "INFO root" in everything.stderr


FAKE_COMPILER = """\
#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = "--version" ] || [ "$arg" = "-v" ]; then echo "fakecc version 1.0"; exit 0; fi
done
echo "$COUNTER" >> "$COUNT_FILE"
echo "bindings.cpp:3:10: fatal error: no_such_header.h: No such file or directory" >&2
i=0; while [ $i -lt 200 ]; do echo "note: a long compiler line $i ........................" >&2; i=$((i+1)); done
exit 1
"""


def test_failed_build_prints_a_short_line_with_the_log_and_is_not_retried_until_force(tmp_path):
    compiler = tmp_path / "fakecc"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {"CXX": str(compiler), "MPFAST_CACHE_DIR": str(tmp_path / "cache"), "COUNT_FILE": str(calls)}
    first = mpfast("build", "--kind", "cpp", env=env)
    assert first.returncode == 1
    (line,) = error_lines(first)[-1:]
    assert "no_such_header.h" in line and "full log: " in line and len(line) < 600, line
    log = line.split("full log: ")[1].split(";")[0]
    assert os.path.isfile(log) and "a long compiler line 199" in open(log).read()
    compiled = calls.read_text().count("\n")
    assert compiled >= 1
    again = mpfast("build", "--kind", "cpp", env=env)
    assert again.returncode == 1 and "not retried" in again.stderr and "--force" in again.stderr
    assert calls.read_text().count("\n") == compiled  # the compiler did not run again
    forced = mpfast("build", "--kind", "cpp", "--force", env=env)
    assert forced.returncode == 1 and "full log: " in forced.stderr
    assert calls.read_text().count("\n") > compiled


def test_interrupting_train_prints_one_line_with_the_resume_hint(tmp_path):
    from mpfast.data.synthetic import make_synthetic_dataset

    paths = make_synthetic_dataset(tmp_path / "data", train_per_class=2, test_per_class=1, size=32, num_frames=4)
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mpfast", "train", "--model", "mpfast-tiny", "--device", "cpu", "--num-frames", "2",
         "--train-list", str(paths["train"]), "--classes", str(paths["classes"]), "--output", str(output),
         "--epochs", "100000", "--batch-size", "4", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (output / "last.safetensors").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1]
        process.send_signal(2)  # SIGINT, as Ctrl-C
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "No pretrained weights" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mpfast train: interrupted: at step ")
    assert f"--resume {output / 'last.safetensors'}" in lines[0]


def test_files_are_written_with_the_umask_permissions(tmp_path):
    import torch

    from mpfast.engine.cache import _write_json_atomic
    from mpfast.engine.checkpoint import atomic_save

    previous = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(2)}, tmp_path / "a.safetensors", {})
        _write_json_atomic(str(tmp_path / "meta.json"), {"a": 1})
        for name in ("a.safetensors", "meta.json"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
        os.umask(0o027)
        atomic_save({"x": torch.zeros(2)}, tmp_path / "b.safetensors", {})
        assert stat.S_IMODE(os.stat(tmp_path / "b.safetensors").st_mode) == 0o640
    finally:
        os.umask(previous)


def test_readme_documents_the_exit_codes_that_main_returns():
    from pathlib import Path

    from mpfast import cli

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert (cli.EXIT_OK, cli.EXIT_RUNTIME, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED) == (0, 1, 2, 130)
    assert ("**Exit codes**, the same for every command: 0 success; 2 usage or input error (a bad flag or value, a "
            "missing or malformed file, a video that cannot be read); 1 runtime error") in readme
    assert "130 interrupted (Ctrl-C)" in readme
