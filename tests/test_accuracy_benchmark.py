"""benchmarks/accuracy.py: its heads, ablations, verdict and tables, and (slow) a small run of it."""

import json
import types

import pytest
import torch

from benchmarks import accuracy
from benchmarks.accuracy_heads import ABLATIONS, PEERS, FeatureHead, standardise
from mpfast.model import HeadConfig, MotionCLIP


@pytest.fixture(scope="module")
def clip(tiny_model_name):
    import open_clip

    return open_clip.create_model(tiny_model_name)


@pytest.mark.parametrize("name", list(PEERS))
def test_peers_map_frames_to_logits_and_train(name):
    head = PEERS[name](32, 3, 8, 4, 14.3)
    model = FeatureHead(head, {("a", "b", "c"): torch.randn(3, 32)})
    frames = torch.randn(5, 8, 32)
    logits = model.forward_features(frames, model.encode_classes(["a", "b", "c"]))
    assert logits.shape == (5, 3) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablations_freeze_their_part_and_keep_zero_shot(name, clip):
    overrides, change = ABLATIONS[name]
    model = MotionCLIP(clip, HeadConfig(num_heads=4, **overrides))
    full = MotionCLIP(clip, HeadConfig(num_heads=4))
    if change is not None:
        change(model)
    trainable = {id(p) for p in model.trainable_parameters()}
    count = sum(p.numel() for p in model.trainable_parameters())
    assert 0 < count < sum(p.numel() for p in full.trainable_parameters())
    frames, classes = torch.randn(2, 8, 32), torch.randn(3, 32)
    # untrained, every ablation is still CLIP zero-shot on mean-pooled frames
    torch.testing.assert_close(model.forward_features(frames, classes), full.forward_features(frames, classes))
    frozen = {"no_motion_stream": [model.motion.up.weight], "no_state": [model.motion.state.weight],
              "no_content_scale": [model.motion.content_scale],
              "no_text_to_video": [model.communication.text_scale], "no_video_to_text": [model.communication.video_scale],
              "no_class_adapter": [model.communication.adapter_scale]}.get(name, [])
    for parameter in frozen:
        assert id(parameter) not in trainable and torch.count_nonzero(parameter) == 0


def test_motion_head_fits_the_parameter_budget_at_vit_b16_widths():
    params = accuracy.count_trainable("motion", 512, 8, 8, 400)
    assert 2_500_000 < params <= 3_000_000
    assert accuracy.count_trainable("no_prompts", 512, 8, 8, 400) < params
    assert accuracy.count_trainable("zero_shot", 512, 8, 8, 400) == 0


def _entry(means, test_videos=64):
    return {"test_videos": test_videos, "rows": {row: {"mean": value} for row, value in means.items()}}


def test_verdict_allows_one_test_video():
    rows = ["motion", "linear_probe", "conv", "xclip"]
    win = accuracy.verdict(_entry({"motion": 0.95, "linear_probe": 0.99, "conv": 0.96, "xclip": 0.5}), rows)
    assert win["best_peer"] == "conv" and win["wins"]  # 0.01 behind, one video is 1/64
    lose = accuracy.verdict(_entry({"motion": 0.94, "linear_probe": 0.2, "conv": 0.96, "xclip": 0.5}), rows)
    assert not lose["wins"] and lose["margin"] == pytest.approx(-0.02)
    assert accuracy.verdict(_entry({"conv": 0.5}), ["conv"]) is None


def test_markdown_and_plot(tmp_path):
    rows = ["chance", "motion", "conv"]
    task = {"classes": ["a", "b"], "test_videos": 4, "train_videos": 8,
            "rows": {"chance": {"top1": [0.5], "mean": 0.5, "std": 0.0, "params": 0, "params_vit_b16": 0},
                     "motion": {"top1": [1.0, 0.75], "mean": 0.875, "std": 0.177, "params": 10, "params_vit_b16": 2},
                     "conv": {"top1": [0.5, 0.5], "mean": 0.5, "std": 0.0, "params": 5, "params_vit_b16": 1}}}
    task["verdict"] = accuracy.verdict(task, rows)
    results = {"tasks": {"direction": task}, "rows": rows, "seeds": [0, 1], "settings": {**vars(accuracy.Settings())},
               "machine": accuracy.machine(), "workers": 1, "seconds": 3.0, "cpu_seconds": 5.0,
               "load_average_before": [0.1], "load_average_after": [0.2], "date": "today", "command": "python -m x"}
    text = accuracy.markdown(results)
    assert "| **motion** | 0.875 ± 0.177 | 0.875 | 10 | 2 |" in text
    assert "direction: motion 0.875, best peer conv 0.500" in text and "wins" in text
    accuracy.write_outputs(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    assert (tmp_path / "results.png").stat().st_size > 0


def test_bad_arguments():
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--workers", "0"])
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--tasks", "juggling"])
    for bad in (["--lr-grid", "1e-2", "0"], ["--lr", "-1"], ["--val-fraction", "1"]):
        with pytest.raises(SystemExit):
            accuracy.parse_args(bad)
    assert accuracy.parse_args(["--lr-grid", "1e-3", "1e-2"]).lr_grid == [1e-3, 1e-2]


def test_standardised_frames():
    frames = torch.randn(3, 8, 16) + 5
    out = standardise(frames)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(3, 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pow(2).mean(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(standardise(100 * frames - 3), out, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(standardise(torch.ones(2, 8, 16))) == 0  # exactly static: zeros, not NaN
    # No floor (unlike the motion head's): a static video's rounding residue comes out at unit scale.
    assert torch.isfinite(standardise(torch.randn(2, 1, 16).expand(2, 8, 16))).all()
    torch.testing.assert_close(standardise(frames.flip(1)), out.flip(1))  # frame order is kept


def test_validation_split_is_per_class_and_repeatable():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2)
    cache = types.SimpleNamespace(indices=torch.arange(100, 100 + len(labels)), labels=labels)
    fit, held = accuracy.validation_split(cache, seed=3, fraction=0.25)
    assert sorted(fit + held) == cache.indices.tolist() and not set(fit) & set(held)
    held_labels = [int(labels[i - 100]) for i in held]
    assert held_labels.count(0) == 2 and held_labels.count(1) == 1 and held_labels.count(2) == 1  # >= 1, < all
    assert accuracy.validation_split(cache, seed=3, fraction=0.25) == (fit, held)
    assert accuracy.validation_split(cache, seed=4, fraction=0.25) != (fit, held)


def test_a_diverging_rate_of_the_lr_grid_is_not_chosen(monkeypatch):
    """A rate whose training diverges loses the selection; a grid where every rate diverges is an error."""
    from mpfast.engine import NonFiniteError

    cache = types.SimpleNamespace(indices=torch.arange(8), labels=torch.tensor([0, 1] * 4))
    task = {"task": "t", "classes": ["a", "b"], "caches": {"train": "train", "test": "test"}}
    diverging = {0.03}

    def fit(row, seed, settings, task, lr, positions=None):
        if lr in diverging:
            raise NonFiniteError("non-finite loss at step 3")
        return lr

    monkeypatch.setattr(accuracy, "load_cache", lambda folder: cache)
    monkeypatch.setattr(accuracy, "FeatureDataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(accuracy, "_fit", fit)
    monkeypatch.setattr(accuracy, "_score", lambda model, dataset, classes: (0.5 + model, 1.0))  # higher lr scores higher
    settings = accuracy.Settings(lr_grid=(0.001, 0.01, 0.03))
    record = accuracy.train_and_score("conv", 0, settings, task)
    assert record["lr"] == 0.01 and record["validation_top1"]["0.03"] is None
    diverging.update(settings.lr_grid)
    with pytest.raises(RuntimeError, match="diverged at every rate"):
        accuracy.train_and_score("conv", 0, settings, task)
    with pytest.raises(RuntimeError, match="diverged at lr 0.01"):  # one rate, no grid
        accuracy.train_and_score("conv", 0, accuracy.Settings(lr=0.01), task)


@pytest.mark.slow
def test_small_run_motion_head_beats_the_peers(tmp_path):
    """A small version of the benchmark: two tasks, one seed, few videos and epochs."""
    pytest.importorskip("av")
    pytest.importorskip("decord")
    args = ["--out", str(tmp_path), "--tasks", "direction", "two_phase", "--seeds", "0", "--workers", "1",
            "--rows", "chance", "zero_shot", "motion", "no_motion_stream", "conv", "xclip",
            "--train-per-class", "48", "--test-per-class", "16", "--epochs", "30", "--train-clips", "1",
            "--test-clips", "1"]
    assert accuracy.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for task, entry in results["tasks"].items():
        rows = entry["rows"]
        chance = rows["chance"]["mean"]
        assert rows["zero_shot"]["mean"] < chance + 0.2, task
        assert rows["motion"]["mean"] > chance + 0.25, task
        assert rows["motion"]["mean"] > rows["no_motion_stream"]["mean"] + 0.2, task
        assert entry["verdict"]["margin"] > 0, task
