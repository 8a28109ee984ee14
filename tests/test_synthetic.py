"""Synthetic motion tasks: shapes, determinism, time-reversed class pairs, lossless files."""

import numpy as np
import pytest

from mpfast.data import read_class_names, read_list
from mpfast.data.synthetic import (
    SYNTHETIC_CLASSES,
    TASKS,
    get_task,
    make_synthetic_dataset,
    render_video,
    write_video,
)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_draws_uint8_videos_deterministically(name):
    task = TASKS[name]
    assert len(task.classes) >= 2 and len(set(task.classes)) == len(task.classes)
    for label in range(len(task.classes)):
        video = task.render(label, np.random.default_rng(7), size=32, num_frames=10)
        assert video.shape == (10, 32, 32, 3) and video.dtype == np.uint8
        np.testing.assert_array_equal(video, task.render(label, np.random.default_rng(7), size=32, num_frames=10))
        assert np.abs(np.diff(video.astype(int), axis=0)).sum() > 0, f"{name}/{task.classes[label]} does not move"


@pytest.mark.parametrize("name", [name for name, task in TASKS.items() if task.reversed_pairs])
def test_reversed_classes_show_the_same_frames_backwards(name):
    # What makes mean pooling useless on these tasks: class b is class a played backwards.
    task = TASKS[name]
    for a, b in task.reversed_pairs:
        forward = task.render(a, np.random.default_rng(3), size=24, num_frames=9)
        backward = task.render(b, np.random.default_rng(3), size=24, num_frames=9)
        np.testing.assert_array_equal(backward, forward[::-1])


def test_direction_task_is_the_walk_through():
    left = render_video("moving left", np.random.default_rng(0), size=32, num_frames=8)
    np.testing.assert_array_equal(left, TASKS["direction"].render(0, np.random.default_rng(0), 32, 8))
    assert TASKS["direction"].classes == SYNTHETIC_CLASSES
    # the square's columns move left: its mean column decreases
    columns = [np.nonzero((frame != frame[0, 0]).any(axis=(0, 2)))[0].mean() for frame in left]
    assert columns[0] > columns[-1]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: get_task("juggling"), ValueError, "unknown task 'juggling'"),
        (lambda: TASKS["approach"].render(2, np.random.default_rng(0)), ValueError, r"label must be an int in \[0, 2\)"),
        (lambda: TASKS["approach"].render(True, np.random.default_rng(0)), ValueError, "label must be an int"),
        (lambda: TASKS["speed"].render(0, np.random.default_rng(0), size=6), ValueError, "size must be >= 8"),
        (lambda: render_video("moving sideways", np.random.default_rng(0)), ValueError, "direction must be one of"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lossless_videos_decode_to_the_drawn_frames(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("decord")
    from mpfast.data.video import open_video

    frames = TASKS["clutter"].render(1, np.random.default_rng(0), size=32, num_frames=6)
    write_video(tmp_path / "exact.mp4", frames)
    write_video(tmp_path / "lossy.mp4", frames, lossless=False)
    exact = open_video(tmp_path / "exact.mp4").get_batch(list(range(6))).asnumpy()
    lossy = open_video(tmp_path / "lossy.mp4").get_batch(list(range(6))).asnumpy()
    np.testing.assert_array_equal(exact, frames)
    assert np.abs(lossy.astype(int) - frames).max() > 0


def test_dataset_of_a_task(tmp_path):
    pytest.importorskip("av")
    paths = make_synthetic_dataset(tmp_path / "data", train_per_class=2, test_per_class=1, size=16, num_frames=4,
                                   task="two_phase")
    assert read_class_names(paths["classes"]) == list(TASKS["two_phase"].classes)
    train = read_list(paths["train"])
    assert len(train) == 4 and sorted(e.label for e in train) == [0, 0, 1, 1]
    assert all((paths["root"] / e.path).is_file() for e in train + read_list(paths["test"]))
    subset = make_synthetic_dataset(tmp_path / "subset", 1, 1, size=16, num_frames=4, classes=["receding"],
                                    task="approach")
    assert read_class_names(subset["classes"]) == ["receding"]
    with pytest.raises(ValueError, match="classes must be a non-empty subset"):
        make_synthetic_dataset(tmp_path / "bad", 1, 1, classes=["moving left"], task="approach")
