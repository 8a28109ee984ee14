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
    for name in ("report.json", "report.md", "throughput.png", "flops_per_video.png"):
        assert (out / "dir" / name).stat().st_size > 0, name
    for name in ("throughput.png", "flops_per_video.png"):
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
    assert main(["report", "--dtype", "int8"]) == 2
    assert "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err


def test_report_times_have_their_spread(report_run):
    _, out = report_run
    report = json.loads((out / "dir" / "report.json").read_text())
    for row in report["timing"]:
        for part in ("clip_frame_encoder", "motionclip"):
            m = row[part]
            assert m["videos_per_s_min"] <= m["videos_per_s"] <= m["videos_per_s_max"]
            assert m["latency_ms_min"] <= m["latency_ms_p50"] <= m["latency_ms_max"]
            assert m["videos_per_s_min"] == pytest.approx(row["batch"] / (m["latency_ms_max"] / 1e3))
    assert set(report["load_average"]) == {"start", "end"}
    text = (out / "dir" / "report.md").read_text()
    first = report["timing"][0]["motionclip"]
    assert f"{first['videos_per_s']:.3f} [{first['videos_per_s_min']:.3f}, {first['videos_per_s_max']:.3f}]" in text
    assert "slowest and the fastest call" in text and "Load average" in text


def test_throughput_plot_is_linear_from_zero_with_error_bars_and_numeric_batches(report_run):
    from mpfast.profiling.report import throughput_figure

    _, out = report_run
    report = json.loads((out / "dir" / "report.json").read_text())
    figure = throughput_figure(report)
    (ax,) = figure.axes
    assert ax.get_yscale() == "linear" and ax.get_xscale() == "linear" and ax.get_ylim()[0] == 0
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == [f"batch {r['batch']}\nT={r['frames']}" for r in report["timing"]]
    bars = [patch for container in ax.containers if hasattr(container, "patches") for patch in container.patches]
    assert len(bars) == 2 * len(report["timing"])  # bare encoder and MotionCLIP per row
    assert sorted(round(b.get_height(), 6) for b in bars) == sorted(
        round(r[k]["videos_per_s"], 6) for r in report["timing"] for k in ("clip_frame_encoder", "motionclip")
    )
    error_bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(error_bars) == 2


def test_flops_plot_stacks_where_a_video_goes_on_a_linear_axis(report_run):
    from mpfast.profiling.report import FLOP_PARTS, flops_breakdown, flops_figure

    _, out = report_run
    report = json.loads((out / "dir" / "report.json").read_text())
    rows = flops_breakdown(report)
    assert len(rows) == 2 * len(report["frames"])
    alone, batched = rows[0][1], rows[1][1]
    head = report["flops"]["head"]["3"]
    assert alone["encoder"] == report["flops"]["frame_encoder"]["3"]["gflops_fvcore_style"]
    assert alone["head/video"] == head["per_video"]["gflops_fvcore_style"]
    assert alone["head/call"] == head["per_call"]["gflops_fvcore_style"]
    assert alone["text/list"] == report["flops"]["text_encoder"]["per_class_list"]["gflops_fvcore_style"]
    assert batched == {k: alone[k] for k in ("encoder", "head/video")}
    (ax,) = flops_figure(report).axes
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0
    widths = {}
    for container in ax.containers:
        widths[container.get_label()] = [patch.get_width() for patch in container.patches]
    assert set(widths) == {legend for legend, _ in FLOP_PARTS.values()}
    assert widths[FLOP_PARTS["encoder"][0]][0] == pytest.approx(alone["encoder"])


def test_report_accepts_a_custom_model_config(tmp_path, capsys):
    config = json.loads((mpfast.model.factory.SHIPPED_CONFIGS / "mpfast-tiny.json").read_text())
    config["vision_cfg"]["layers"] = 1
    path = tmp_path / "one-layer-tiny.json"
    path.write_text(json.dumps(config))
    with mpfast.ops.backend("reference"):
        code = main(["report", "--model", "one-layer-tiny", "--model-config", str(path), "--frames", "2", "--batch",
                     "1", "--classes", "3", "--device", "cpu", "--warmup", "0", "--iterations", "1", "--no-progress",
                     "--no-sweep", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"] == "one-layer-tiny"
    one_layer = mpfast.create_model_and_transforms("one-layer-tiny", num_frames=2)[0]
    assert report["parameters"]["total"] == count_parameters(one_layer).total
    two_layers = frame_encoder_flops(mpfast.create_model_and_transforms("mpfast-tiny", num_frames=2)[0].eval(), 2)
    assert report["flops"]["frame_encoder"]["2"]["gflops_fvcore_style"] < two_layers.fvcore / 1e9


@pytest.mark.slow
def test_readme_counts_for_vit_b16_are_what_the_report_counts():
    """The README's ViT-B/16 numbers (8 frames, 400 classes), as printed there, from the report's counters."""
    import re
    from pathlib import Path

    from mpfast.profiling import head_cost, text_encoder_flops_per_class

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    claim = readme.split("Counts do not depend on the machine.")[1].split("Speed depends")[0]
    numbers = [float(x.replace(",", "")) for x in re.findall(r"(\d[\d,]*\.?\d*) (?:M|GFLOPs|per|once|%)", claim)]
    model, _, _, _ = mpfast.create_model_and_transforms("ViT-B-16", num_frames=8)
    model.eval()
    params = count_parameters(model)
    encoder = frame_encoder_flops(model, 1).fvcore * 8 / 1e9
    cost = head_cost(model, 8, 400)
    text = text_encoder_flops_per_class(model).fvcore * 400 / 1e9
    per_video, per_call = cost.per_video.fvcore / 1e9, cost.per_call.fvcore / 1e9
    expected = [params.total / 1e6, params.trainable / 1e6, encoder, per_video, 100 * per_video / encoder, per_call,
                text, 100 * text / (encoder + per_video + per_call + text)]
    assert len(numbers) == len(expected), numbers
    for stated, counted in zip(numbers, expected):
        decimals = len(str(stated).split(".")[1]) if "." in str(stated) and not str(stated).endswith(".0") else 0
        assert round(counted, decimals) == stated, (stated, counted)
