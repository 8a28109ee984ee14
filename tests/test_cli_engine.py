"""``mpfast cache | train | eval | classify`` end to end on tiny synthetic videos."""

import json
import logging
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
    assert main(["classify", str(Path(data["root"]) / "broken.mp4"), "--classes", "a,b", *MODEL]) == 2  # input
    assert "cannot read video" in capsys.readouterr().err


def test_malformed_list_names_file_and_line(data, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 0\nb.mp4 x\n")
    assert main(["cache", *MODEL, "--list", str(bad), "--cache-dir", str(tmp_path)]) == 2
    assert "mpfast cache: error: bad.txt:2: label must be an integer" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert main(["-v", "cache", *MODEL, "--list", str(bad), "--cache-dir", str(tmp_path)]) == 2  # -v: + traceback
    err = capsys.readouterr().err
    assert "Traceback" in err and "AnnotationError" in err and "bad.txt:2: label must be an integer" in err


@pytest.mark.slow
def test_console_entry_point_registers_model_config(data):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_up_000.mp4")
    result = subprocess.run([sys.executable, "-m", "mpfast", "classify", video, "--classes", "moving up,moving down",
                             *MODEL], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = [line.split(maxsplit=1)[1] for line in result.stdout.strip().splitlines()]
    assert sorted(names) == ["moving down", "moving up"]


def mpfast(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpfast", *args], capture_output=True, text=True, timeout=timeout)


def _printed_names(stdout: str) -> list[str]:
    return [line.split(maxsplit=1)[1] for line in stdout.strip().splitlines()]


def test_classes_take_a_file_or_a_list_in_every_command(data, tmp_path, capsys):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_left_000.mp4")
    names = ["moving left", "moving right", "moving up", "moving down"]
    with_bom = tmp_path / "classes.txt"  # one name per line, saved by an editor that writes a BOM
    with_bom.write_bytes(("\ufeff" + "\n".join(names) + "\n").encode("utf-8"))
    result = mpfast("classify", video, "--classes", data["classes"], *MODEL)
    assert result.returncode == 0, result.stderr
    assert sorted(_printed_names(result.stdout)) == sorted(names)
    result = mpfast("classify", video, "--classes", str(with_bom), *MODEL)
    assert result.returncode == 0 and sorted(_printed_names(result.stdout)) == sorted(names), result.stderr
    output = tmp_path / "run"
    assert main(["train", *MODEL, "--num-frames", "4", "--train-list", data["train"], "--classes", ",".join(names),
                 "--output", str(output), "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    assert load_checkpoint(output / "last.safetensors").class_names == names
    capsys.readouterr()
    assert main(["eval", *MODEL, "--checkpoint", str(output / "last.safetensors"), "--list", data["test"],
                 "--classes", str(with_bom), "--no-progress"]) == 0
    assert _json(capsys)["splits"][0]["count"] == 4


@pytest.mark.parametrize("classes", ["run,jump,Run", "run, jump,  jump "])
def test_duplicate_class_names_are_refused(data, classes, capsys):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_left_000.mp4")
    assert main(["classify", video, "--classes", classes, *MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpfast classify: error: --classes: class list") and "repeats" in err


def test_duplicate_class_names_in_a_file_are_refused(data, tmp_path, capsys):
    classes = tmp_path / "dup.csv"
    classes.write_text("id,name\n0,moving left\n1,moving right\n2,Moving  Left\n")
    assert main(["train", *MODEL, "--train-list", data["train"], "--classes", str(classes), "--output",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--classes: {classes}:4: class name 'Moving  Left' repeats 'moving left' of {classes}:2" in err
    assert not (tmp_path / "o").exists()


def test_missing_class_file_is_not_taken_for_a_class_name(data, tmp_path, capsys):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_left_000.mp4")
    assert main(["classify", video, "--classes", str(tmp_path / "classes.csv"), *MODEL]) == 2
    assert "--classes: class-name file" in capsys.readouterr().err


def test_a_list_file_with_a_bom_keeps_its_first_video(data, tmp_path, capsys):
    text = Path(data["test"]).read_text()
    bom_list = Path(data["root"]) / "bom_test.txt"
    bom_list.write_bytes(("\ufeff" + text).encode("utf-8"))
    assert main(["eval", *MODEL, "--list", str(bom_list), "--classes", data["classes"], "--no-progress"]) == 0
    summary = _json(capsys)["splits"][0]
    assert summary["count"] == 4 and summary["skipped"] == 0


def test_a_checkpoint_brings_its_classes_and_model_config(data, tmp_path, capsys):
    config = json.loads(Path(CONFIG).read_text())
    config["vision_cfg"]["layers"] = 1
    custom = tmp_path / "custom-tiny.json"
    custom.write_text(json.dumps(config))
    output = tmp_path / "run"
    names = ["moving left", "moving right", "moving up", "moving down"]
    assert main(["train", "--model-config", str(custom), "--device", "cpu", "--num-frames", "4", "--train-list",
                 data["train"], "--classes", data["classes"], "--output", str(output), "--epochs", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    checkpoint = load_checkpoint(output / "last.safetensors")
    assert checkpoint.model_info["model"] == "custom-tiny" and checkpoint.model_info["open_clip_config"] == config
    custom.unlink()  # later commands need nothing but the checkpoint
    video = str(Path(data["root"]) / "videos" / "test" / "moving_up_000.mp4")
    result = mpfast("classify", video, "--checkpoint", str(output / "last.safetensors"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(_printed_names(result.stdout)) == sorted(names)
    result = mpfast("eval", "--checkpoint", str(output / "last.safetensors"), "--list", data["test"], "--device",
                    "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["splits"][0]["count"] == 4
    assert main(["eval", "--checkpoint", str(output / "last.safetensors"), "--list", data["test"], "--device", "cpu",
                 "--num-frames", "8"]) == 2
    assert "--num-frames 8 does not fit the checkpoint" in capsys.readouterr().err


def test_the_tiny_config_ships_with_the_package():
    code = ("import mpfast, open_clip; from mpfast.model import factory; "
            "assert 'mpfast-tiny' not in open_clip.list_models(); "
            "m = mpfast.create_model_and_transforms('mpfast-tiny', num_frames=2)[0]; "
            "print(factory.SHIPPED_CONFIGS, m.dim)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import mpfast
    assert Path(out[0]) == Path(mpfast.__file__).parent / "model_configs" and out[1] == "32"


def test_bf16_and_fp16_run_end_to_end(data, trained, tmp_path, capsys):
    video = str(Path(data["root"]) / "videos" / "test" / "moving_right_000.mp4")
    checkpoint = str(trained / "last.safetensors")
    probabilities = {}
    for precision in ("fp32", "bf16", "fp16"):
        assert main(["classify", video, "--checkpoint", checkpoint, "--device", "cpu", "--precision", precision]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        probabilities[precision] = {line.split(maxsplit=1)[1]: float(line.split()[0]) for line in lines}
    for precision in ("bf16", "fp16"):
        for name, value in probabilities["fp32"].items():
            assert probabilities[precision][name] == pytest.approx(value, abs=0.05), (precision, name)
    assert main(["train", *MODEL, "--num-frames", "4", "--precision", "bf16", "--amp", "bf16", "--train-list",
                 data["train"], "--classes", data["classes"], "--output", str(tmp_path / "bf16"), "--epochs", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "bf16" / "last.safetensors"), "--precision", "fp16",
                 "--device", "cpu", "--list", data["test"], "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    top1 = _json(capsys)["splits"][0]["top1"]
    assert 0.0 <= top1 <= 1.0


def test_a_video_shorter_than_the_clip_is_warned(tmp_path, caplog):
    import numpy as np

    from mpfast.data.synthetic import render_video, write_video

    short = tmp_path / "short.mp4"
    write_video(short, render_video("moving up", np.random.default_rng(0), 32, 3))
    result = mpfast("classify", str(short), "--classes", "up,down", "--num-frames", "8", *MODEL[:2], "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "short.mp4 has 3 frame(s), fewer than the 8 of a clip: frames are repeated" in result.stderr
    one = tmp_path / "one.mp4"
    write_video(one, render_video("moving up", np.random.default_rng(0), 32, 2)[:1])
    caplog.set_level(logging.WARNING, logger="mpfast")
    assert main(["classify", str(one), "--classes", "up,down", "--num-frames", "2", *MODEL]) == 0
    assert "one.mp4 has 1 frame(s), fewer than the 2 of a clip" in caplog.text
    (tmp_path / "list.txt").write_text("short.mp4 0\none.mp4 1\n")
    assert main(["eval", "--list", str(tmp_path / "list.txt"), "--classes", "up,down", *MODEL, "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "0 video(s) skipped, 2 clip(s) from videos shorter than the clip" in warnings


def test_progress_bars_count_videos_and_each_epoch_prints_one_line(data, tmp_path):
    result = mpfast("train", *MODEL, "--num-frames", "4", "--train-list", data["train"], "--val-list", data["test"],
                    "--classes", data["classes"], "--output", str(tmp_path / "run"), "--epochs", "2", "--batch-size",
                    "4", "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    err = result.stderr.replace("\r", "\n")
    assert "caching features: 100%" in err and "9/9" in err  # 9 videos (one broken) in the training list
    assert "training: 100%" in err and "16/16" in err and "video/s" in err  # 8 readable videos x 2 epochs
    epochs = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("train loss" in line and "val top-1" in line for line in epochs)
    assert "step" not in err.split("training:")[1].split("\n")[0]  # the bar counts videos, not steps


@pytest.mark.slow
def test_readme_command_line_runs_as_written(tmp_path):
    """The README's command-line block, run in an empty folder as a user would paste it."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The command line")[1].split("\n## ")[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [line.split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["python", "-m"], ["mpfast", "cache"], ["mpfast", "train"],
                                         ["mpfast", "eval"], ["mpfast", "classify"]]
    outputs = []
    for command in commands:
        argv = [sys.executable, *command[1:]] if command[0] == "python" else [sys.executable, "-m", *command]
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    assert json.loads(outputs[2].strip().splitlines()[-1])["eval"]["count"] == 16
    assert len(outputs[4].strip().splitlines()) == 4  # the checkpoint's 4 classes
