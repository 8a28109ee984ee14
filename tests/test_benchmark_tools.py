"""benchmarks/compare.py (tables and comparisons of saved runs), the harness's dtype choice and the
launcher-overhead benchmark."""

import json

import pytest
import torch

from benchmarks import _harness, compare, launch_overhead  # the repository root is on sys.path: tests/ is a package


def _bench(impl, median, calls=None, nbytes=2e9, flops=0):
    info = {"op": "temporal_diff", "shape": "32x16x512", "dtype": "bfloat16", "pass": "fwd", "impl": impl,
            "bytes": nbytes, "flops": flops}
    if calls is not None:
        info["calls_per_round"] = calls
    return {"name": f"test_temporal_diff[{impl}]", "stats": {"median": median}, "extra_info": info}


def _run(tmp_path, name, benches):
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": benches, "datetime": "2026-11-27", "machine_info": {}}))
    return path


def test_rows_divide_by_calls_per_round_and_take_ratios_within_the_run(tmp_path):
    # eager: 1 ms per call; triton: 10 calls per round took 2 ms, so 0.2 ms per call
    data = compare.load(_run(tmp_path, "run.json", [_bench("eager", 1e-3), _bench("triton", 2e-3, calls=10)]))
    rows = {r["impl"]: r for r in compare.rows(data)}
    assert rows["triton"]["median_s"] == pytest.approx(2e-4)
    assert rows["triton"]["vs_eager"] == pytest.approx(5.0)
    assert rows["triton"]["gbps"] == pytest.approx(2e9 / 2e-4 / 1e9)
    assert rows["eager"]["vs_compile"] is None  # no compile baseline in this run
    table = compare.table(data)
    assert "| temporal_diff | 32x16x512 | bfloat16 | fwd | triton | 0.2 |" in table


def test_two_runs_compare_benchmark_by_benchmark(tmp_path, capsys):
    base = _run(tmp_path, "base.json", [_bench("eager", 1e-3), _bench("cpp", 5e-4)])
    new = _run(tmp_path, "new.json", [_bench("eager", 1e-3), _bench("cpp", 2.5e-4), _bench("triton", 1e-4)])
    assert compare.main([str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert "| temporal_diff | 32x16x512 | bfloat16 | fwd | cpp | 0.5 | 0.25 | 0.50 |" in out
    assert "In one run only: test_temporal_diff[triton]" in out


def test_a_file_that_is_not_a_run_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert compare.main([str(bad)]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


def test_benchmark_dtypes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MPFAST_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("MPFAST_BENCH_DTYPES", raising=False)
    assert _harness.bench_dtypes() == [torch.float32]
    monkeypatch.setenv("MPFAST_BENCH_DTYPES", "bfloat16, float16")
    assert _harness.bench_dtypes() == [torch.bfloat16, torch.float16]
    monkeypatch.setenv("MPFAST_BENCH_DTYPES", "float8")
    with pytest.raises(ValueError, match="MPFAST_BENCH_DTYPES: unknown dtype"):
        _harness.bench_dtypes()


def test_peak_memory_column(tmp_path):
    with_peak = _bench("cpp", 1e-3)
    with_peak["extra_info"]["peak_memory_bytes"] = 3 * 2**20
    table = compare.table(compare.load(_run(tmp_path, "run.json", [_bench("eager", 2e-3), with_peak])))
    assert "| peak MiB |" in table
    assert "| temporal_diff | 32x16x512 | bfloat16 | fwd | cpp | 1 |" in table and table.rstrip().endswith("| 2.00 |  | 3 |")


def test_peak_memory_of_one_call_on_cpu():
    """A call that holds 8 MiB at once (two 4 MiB tensors) peaks at least there, whatever was allocated before."""
    kept = torch.empty(2**20)  # allocated before: not counted

    def call():
        a = torch.ones(2**20)
        b = a * 2
        return float((a + b).sum()), kept

    peak = _harness.peak_memory(call, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 16 * 2**20


def test_launch_overhead_times_every_op_without_launching(monkeypatch):
    """Every op's path, pass and launcher is timed, and no kernel runs (a launch would raise)."""
    from mpfast.ops import available_backends

    if available_backends("cpu")["triton"] is not None:
        pytest.skip(available_backends("cpu")["triton"])

    def no_run(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(launch_overhead, "_no_launch", no_run)  # the recorder's call: proves every launch went there
    with pytest.raises(AssertionError, match="a kernel ran"):
        launch_overhead.measure(calls=1, repeats=1)
    monkeypatch.undo()
    rows = launch_overhead.measure(calls=2, repeats=1)
    assert {(r["op"], r["what"], r["pass_"]) for r in rows} == {
        (op, what, pass_) for op in ("temporal_diff", "motion_mix", "prompt_attention", "class_logits (core op)")
        for what, pass_ in (("op", "fwd"), ("op", "fwd+bwd"), ("cpp", "fwd"), ("cpp", "fwd+bwd"), ("launcher", "fwd"))}
    assert all(r["us"][1] > 0 for r in rows)
