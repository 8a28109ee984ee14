"""``mpfast report`` on the tiny model: what it prints and writes, and that the numbers hang together."""

import json

import pytest
import torch

import mpfast
from mpfast.cli import main
from mpfast.profiling import count_parameters, frame_encoder_flops
from mpfast.profiling.report import ReportOptions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model's ops are microseconds long: on a busy 2-core machine a second
    # thread only adds waits for a descheduled sibling.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = [
        "report",
        "--model",
        "mpfast-tiny",
        "--frames",
        "3",
        "6",
        "--batch",
        "1",
        "3",
        "--classes",
        "7",
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--iterations",
        "3",
        "--no-progress",
        "--out",
        str(out / "dir"),
        "--json",
        str(out / "alone.json"),
    ]
    # The report times whatever backend is chosen; the reference keeps this test free of
    # extension builds (the cpp backend compiles on first use).
    with mpfast.ops.backend("reference"):
        return main(argv), out


def test_report_writes_every_output(report_run, capsys):
    code, out = report_run
    assert code == 0
    for name in ("report.json", "report.md", "throughput.png", "flops_by_module.png"):
        assert (out / "dir" / name).stat().st_size > 0, name
    for name in ("throughput.png", "flops_by_module.png"):
        assert (out / "dir" / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "alone.json").read_text())["model"] == "mpfast-tiny"


def test_report_numbers_are_consistent(report_run):
    _, out = report_run
    report = json.loads((out / "dir" / "report.json").read_text())
    model, _, _, _ = mpfast.create_model_and_transforms("mpfast-tiny", num_frames=3)
    params = count_parameters(model)
    assert (report["parameters"]["total"], report["parameters"]["trainable"]) == (params.total, params.trainable)
    assert "random" in report["weights"] and report["ops_backend"] == "reference"
    encoder = report["flops"]["frame_encoder"]
    # The report counts one frame and scales by T: the same as counting all T frames.
    direct = frame_encoder_flops(model.eval(), 6)
    assert encoder["6"]["gflops_fvcore_style"] == pytest.approx(direct.fvcore / 1e9)
    assert encoder["6"]["gflops_true"] == pytest.approx(direct.true / 1e9)
    for frames in ("3", "6"):
        assert encoder[frames]["disagreement"] < 0.01
        assert encoder[frames]["gflops_true"] == pytest.approx(2 * encoder[frames]["gflops_fvcore_style"], rel=0.01)
        head = report["flops"]["head"][frames]
        assert head["batch_1"]["gflops_fvcore_style"] == pytest.approx(
            head["per_video"]["gflops_fvcore_style"] + head["per_call"]["gflops_fvcore_style"]
        )
    text = report["flops"]["text_encoder"]
    assert text["per_class_list"]["gflops_fvcore_style"] == pytest.approx(7 * text["per_prompt"]["gflops_fvcore_style"])
    assert [(r["frames"], r["batch"]) for r in report["timing"]] == [(3, 1), (3, 3), (6, 1), (6, 3)]
    for row in report["timing"]:
        for part in ("clip_frame_encoder", "motionclip"):
            m = row[part]
            assert m["samples"] == 3 and 0 < m["latency_ms_p50"] <= m["latency_ms_p90"]
            assert m["videos_per_s"] == pytest.approx(row["batch"] / (m["latency_ms_p50"] / 1e3))
    assert {(s["frames"], s["prompts"], s["classes"]) for s in report["head_sweep"]} == {
        (t, k, c) for t in (3, 6) for k in (8, 56) for c in (51, 101, 400)
    }
    # The head grows with C and with the keys L = K + T.
    sweep = {
        (s["frames"], s["prompts"], s["classes"]): s["per_video_gflops_fvcore_style"] for s in report["head_sweep"]
    }
    assert sweep[(3, 8, 51)] < sweep[(3, 8, 400)] and sweep[(3, 8, 400)] < sweep[(3, 56, 400)] < sweep[(6, 56, 400)]


def test_report_markdown_names_both_conventions_and_skipped_ops(report_run):
    _, out = report_run
    text = (out / "dir" / "report.md").read_text()
    for needle in (
        "fvcore-style",
        "true",
        "FlopCounterMode",
        "Ops not counted",
        "head overhead",
        "per class list",
        "L = K + T",
    ):
        assert needle.lower() in text.lower(), needle


def test_report_prints_a_summary(tmp_path, capsys):
    with mpfast.ops.backend("reference"):
        code = main(
            [
                "report",
                "--model",
                "mpfast-tiny",
                "--frames",
                "2",
                "--batch",
                "2",
                "--classes",
                "3",
                "--device",
                "cpu",
                "--warmup",
                "0",
                "--iterations",
                "1",
                "--no-progress",
                "--no-sweep",
            ]
        )
    printed = capsys.readouterr().out
    assert code == 0
    for needle in ("parameters:", "frozen CLIP frame encoder", "head per video (C=3)", "videos/s", "overhead"):
        assert needle in printed, needle


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"frames": (0,)}, "frames"),
        ({"batches": ()}, "batches"),
        ({"classes": 0}, "classes"),
        ({"dtype": "int8"}, "dtype"),
        ({"iterations": 0}, "iterations"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_report_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReportOptions(**kwargs)


def test_report_cli_rejects_a_bad_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--dtype", "int8"])
    assert "dtype" in capsys.readouterr().err
