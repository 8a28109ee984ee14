"""``mpfast cache | train | eval | classify`` end to end on tiny synthetic videos."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("decord")
pytest.importorskip("av")

from mpfast.cli import main
from mpfast.data.synthetic import make_synthetic_dataset
from mpfast.engine import load_checkpoint

CONFIG = str(Path(__file__).parent / "configs" / "mpfast-tiny.json")
MODEL = ["--model", "mpfast-tiny", "--model-config", CONFIG, "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = make_synthetic_dataset(root / "data", train_per_class=2, test_per_class=1, size=32, num_frames=8)
    (root / "data" / "broken.mp4").write_bytes(b"\x00" * 100)
    with open(paths["train"], "a") as handle:
        handle.write("broken.mp4 0\n")
    return {**{k: str(v) for k, v in paths.items()}, "tmp": root}


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(data):
    output = data["tmp"] / "run"
    assert main(["train", *MODEL, "--num-frames", "4", "--train-list", data["train"], "--val-list", data["test"],
                 "--classes", data["classes"], "--cache-dir", str(data["tmp"] / "cache"), "--output", str(output),
                 "--epochs", "2", "--batch-size", "4", "--no-progress", "--clips", "2"]) == 0
    return output


def test_cache_command_reports_skipped_videos(data, capsys):
    args = ["cache", *MODEL, "--num-frames", "4", "--list", data["train"], "--cache-dir", str(data["tmp"] / "c"),
            "--no-progress", "--crops", "3"]
    assert main(args) == 0
    report = _json(capsys)
    assert report["videos"] == 9 and report["skipped"] == 1 and report["shape"] == [8, 3, 4, 32]
    assert main(args) == 0 and _json(capsys)["cache"] == report["cache"]  # reused


def test_train_writes_a_checkpoint_and_metrics(trained):
    checkpoint = load_checkpoint(trained / "last.safetensors")
    assert checkpoint.model_info["model"] == "mpfast-tiny" and checkpoint.head_config.num_frames == 4
    assert checkpoint.class_names == ["moving left", "moving right", "moving up", "moving down"]
    assert checkpoint.train_state["step"] == 4  # 8 readable videos / batch 4 x 2 epochs
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"train", "eval"} and records[-1]["count"] == 4


def test_train_from_a_reused_cache_counts_the_skipped_video(data, trained, capsys):
    assert main(["train", *MODEL, "--num-frames", "4", "--train-list", data["train"], "--classes", data["classes"],
                 "--cache-dir", str(data["tmp"] / "cache"), "--output", str(data["tmp"] / "again"), "--epochs", "1",
                 "--batch-size", "4", "--no-progress", "--clips", "2"]) == 0
    result = _json(capsys)
    assert result["train_videos"] == 8 and result["skipped"] == 1


def test_train_from_videos_few_shot(data, capsys):
    output = data["tmp"] / "few"
    assert main(["train", *MODEL, "--num-frames", "4", "--train-list", data["train"], "--classes", data["classes"],
                 "--output", str(output), "--epochs", "1", "--batch-size", "4", "--shots", "1", "--no-flip",
                 "--no-progress"]) == 0
    result = _json(capsys)
    assert result["train_videos"] == 4 and result["steps"] == 1


def test_eval_over_splits_reports_mean_and_std(data, trained, capsys):
    assert main(["eval", "--model-config", CONFIG, "--device", "cpu", "--checkpoint", str(trained / "last.safetensors"),
                 "--list", data["test"], "--list", data["test"], "--classes", data["classes"], "--clips", "2",
                 "--crops", "3", "--no-progress"]) == 0
    summary = _json(capsys)
    assert len(summary["splits"]) == 2 and summary["splits"][0]["count"] == 4
    assert summary["top1"]["std"] == pytest.approx(0.0) and summary["top1"]["mean"] == summary["splits"][0]["top1"]


def test_zero_shot_train_on_seen_classes_evaluate_on_unseen(data, tmp_path, capsys):
    from mpfast.data import read_class_names, read_list, write_class_names, write_list
    from mpfast.data.protocols import relabel

    names = read_class_names(data["classes"])
    seen, unseen = [0, 1], [2, 3]  # train on left/right, test on up/down
    root = Path(data["root"])
    write_list(root / "seen.txt", relabel(read_list(data["train"]), seen))
    write_class_names(root / "seen.csv", [names[i] for i in seen])
    unseen_test = relabel(read_list(data["test"]), unseen)
    for split in (1, 2):  # two "splits", each one unseen video per class
        write_list(root / f"unseen{split}.txt", unseen_test)
    write_class_names(root / "unseen.csv", [names[i] for i in unseen])
    output = tmp_path / "zs"
    assert main(["train", *MODEL, "--num-frames", "4", "--train-list", str(root / "seen.txt"), "--classes",
                 str(root / "seen.csv"), "--output", str(output), "--epochs", "1", "--batch-size", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", *MODEL, "--checkpoint", str(output / "last.safetensors"), "--classes", str(root / "unseen.csv"),
                 "--list", str(root / "unseen1.txt"), "--list", str(root / "unseen2.txt"), "--no-progress"]) == 0
    summary = _json(capsys)
    assert [split["count"] for split in summary["splits"]] == [2, 2]
    assert 0 <= summary["top1"]["mean"] <= 1 and summary["top5"]["mean"] == 1.0  # 2 classes: both in the top 5


def test_classify_prints_top5(data, trained, capsys):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_left_000.mp4")
    assert main(["classify", video, "--classes", "a,b,c,d,e,f", "--checkpoint", str(trained / "last.safetensors"),
                 "--model-config", CONFIG, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    probabilities = [float(line.split()[0]) for line in lines]
    assert len(lines) == 5 and probabilities == sorted(probabilities, reverse=True) and sum(probabilities) < 1
    assert {line.split()[1] for line in lines} <= set("abcdef")
    assert main(["classify", str(Path(data["root"]) / "broken.mp4"), "--classes", "a,b", *MODEL]) == 1
    assert "cannot read video" in capsys.readouterr().err


def test_malformed_list_names_file_and_line(data, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 0\nb.mp4 x\n")
    assert main(["cache", *MODEL, "--list", str(bad), "--cache-dir", str(tmp_path)]) == 2
    assert "mpfast cache: error: bad.txt:2: label must be an integer" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    with pytest.raises(ValueError, match="bad.txt:2: label must be an integer"):  # -v: the traceback
        main(["-v", "cache", *MODEL, "--list", str(bad), "--cache-dir", str(tmp_path)])


@pytest.mark.slow
def test_console_entry_point_registers_model_config(data):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_up_000.mp4")
    result = subprocess.run([sys.executable, "-m", "mpfast", "classify", video, "--classes", "moving up,moving down",
                             *MODEL], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = [line.split(maxsplit=1)[1] for line in result.stdout.strip().splitlines()]
    assert sorted(names) == ["moving down", "moving up"]
