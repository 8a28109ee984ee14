"""Video decoding, frame sampling, transforms and the broken-input policy."""

import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("decord")
pytest.importorskip("av")

from mpfast.data import (
    BrokenVideoLog,
    ClipTransform,
    SamplingConfig,
    VideoDataset,
    VideoDecodeError,
    VideoEntry,
    collate_videos,
    dense_indices,
    load_clips,
    segment_indices,
)
from mpfast.data.synthetic import render_video, write_video
from mpfast.data.transforms import VideoTransform


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A good 12-frame video, a 3-frame one, and every kind of broken file."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    frames = render_video("moving right", rng, size=32, num_frames=12)
    write_video(root / "good.mp4", frames)
    write_video(root / "short.mp4", render_video("moving up", rng, size=32, num_frames=3))
    data = (root / "good.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index (at the end) lost
    write_video(root / "streamable.mp4", frames, faststart=True)
    data = (root / "streamable.mp4").read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    (root / "truncated_data.mp4").write_bytes(data[: len(data) * 3 // 4])  # index kept, frame data cut
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "folder.mp4").mkdir()
    return root, frames


BROKEN = {"missing.mp4": "does not exist", "empty.mp4": "empty", "truncated.mp4": "unreadable",
          "truncated_data.mp4": "unreadable",
          "garbage.mp4": "unreadable", "folder.mp4": "not a regular file"}


def test_segment_sampling_centre_random_and_views():
    assert segment_indices(16, 4).tolist() == [2, 6, 10, 14]
    assert segment_indices(16, 4, view=0, num_views=2).tolist() == [1, 5, 9, 13]
    assert segment_indices(16, 4, view=1, num_views=2).tolist() == [3, 7, 11, 15]
    rng = np.random.default_rng(0)
    for _ in range(50):
        drawn = segment_indices(16, 4, rng=rng)
        assert all(4 * s <= i < 4 * (s + 1) for s, i in enumerate(drawn))
    assert segment_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # short: frames repeat


def test_dense_sampling():
    assert dense_indices(20, 4, 2).tolist() == [6, 8, 10, 12]  # centred clip of span 7 (13 frames to spare)
    assert dense_indices(20, 4, 2, view=0, num_views=3).tolist() == [0, 2, 4, 6]
    assert dense_indices(20, 4, 2, view=2, num_views=3).tolist() == [13, 15, 17, 19]
    assert dense_indices(5, 4, 2).tolist() == [0, 2, 4, 4]  # past the end the last frame repeats
    starts = {int(dense_indices(20, 4, 2, rng=np.random.default_rng(s))[0]) for s in range(40)}
    assert starts <= set(range(14)) and len(starts) > 5


@pytest.mark.parametrize("call", [lambda: segment_indices(0, 4), lambda: segment_indices(8, 4, view=2, num_views=2),
                                  lambda: SamplingConfig(0), lambda: SamplingConfig(8, "random"),
                                  lambda: SamplingConfig(8, "dense", 0)])
def test_sampling_rejects_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_load_clips_decodes_the_sampled_frames(videos):
    root, frames = videos
    clips, length = load_clips(root / "good.mp4", SamplingConfig(4), num_views=2)
    assert length == 12 and clips.shape == (2, 4, 32, 32, 3) and clips.dtype == np.uint8
    expected = frames[segment_indices(12, 4, view=1, num_views=2)]
    assert np.abs(clips[1].astype(int) - expected.astype(int)).mean() < 2.5  # lossy codec: 1.3; the next frame: 5.1


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_raise_a_clear_error(videos, name):
    root, _ = videos
    with pytest.raises(VideoDecodeError, match=BROKEN[name]) as info:
        load_clips(root / name, SamplingConfig(4))
    assert info.value.path == os.fspath(root / name)


class _ReaderThatFailsToDecode:
    """Opens (as decord does for a file damaged after its index) but fails in get_batch."""

    def __len__(self):
        return 12

    def get_batch(self, indices):
        raise RuntimeError("av_read_frame failed\nC++ stack trace")


def test_decoding_failure_after_opening_is_skipped_or_raised(videos, monkeypatch):
    from mpfast.data import video as video_module

    root, _ = videos
    monkeypatch.setattr(video_module, "open_video", lambda path: _ReaderThatFailsToDecode())
    with pytest.raises(VideoDecodeError, match=r"good.mp4.*decoding failed, the file may be truncated \(av_read_frame failed\)$"):
        load_clips(root / "good.mp4", SamplingConfig(4))
    item = _dataset(root, ["good.mp4"])[0]
    assert "video" not in item and "decoding failed" in item["error"]
    with pytest.raises(VideoDecodeError, match="decoding failed"):
        _dataset(root, ["good.mp4"], on_error="raise")[0]


def _dataset(root, names, on_error="skip", num_frames=4, train=False):
    entries = [VideoEntry(name, i % 2) for i, name in enumerate(names)]
    return VideoDataset(entries, root, SamplingConfig(num_frames), ClipTransform(32, train=train, flip=False),
                        on_error=on_error)


def test_skip_policy_sets_broken_videos_aside_and_counts_them(videos, caplog):
    root, _ = videos
    names = ["good.mp4", *sorted(BROKEN), "short.mp4"]
    dataset = _dataset(root, names)
    batch = collate_videos([dataset[i] for i in range(len(dataset))])
    assert batch["video"].shape == (2, 1, 4, 3, 32, 32)
    assert batch["index"].tolist() == [0, len(names) - 1]
    assert sorted(i for i, _ in batch["failed"]) == list(range(1, len(names) - 1))
    assert batch["short"] == 1
    log = BrokenVideoLog()
    with caplog.at_level(logging.WARNING, logger="mpfast.data"):
        log.update(batch)
        log.update(batch)  # the same failures again: counted once
        log.report()
    assert len(log.failed) == len(BROKEN) and log.short == 2
    assert f"{len(BROKEN)} video(s) skipped" in caplog.text
    assert "truncated.mp4" in caplog.text


def test_raise_policy_stops(videos):
    root, _ = videos
    dataset = _dataset(root, ["good.mp4", "truncated.mp4"], on_error="raise")
    assert dataset[0]["video"].shape[0] == 1
    with pytest.raises(VideoDecodeError):
        dataset[1]
    with pytest.raises(ValueError, match="on_error"):
        _dataset(root, ["good.mp4"], on_error="ignore")


def test_all_broken_batch_collates_to_no_video(videos):
    root, _ = videos
    dataset = _dataset(root, ["empty.mp4", "missing.mp4"])
    batch = collate_videos([dataset[0], dataset[1]])
    assert batch["video"] is None and batch["label"].numel() == 0 and len(batch["failed"]) == 2


def test_short_video_repeats_frames(videos):
    root, _ = videos
    item = _dataset(root, ["short.mp4"], num_frames=8)[0]
    video = item["video"][0]
    assert item["short"] and video.shape == (8, 3, 32, 32)
    assert torch.equal(video[0], video[1])  # indices [0,0,0,1,1,2,2,2]


def test_training_randomness_is_seeded_per_sample(videos):
    root, _ = videos
    dataset = _dataset(root, ["good.mp4"], train=True)
    first, again = dataset[0]["video"], dataset[0]["video"]
    assert torch.equal(first, again)
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["video"])


def test_float_frames_match_uint8_frames():
    # smooth frames: torchvision resizes uint8 with integer arithmetic, which differs from the
    # float path by a few levels on noise but by about one level on natural-looking images
    coarse = torch.rand(3, 3, 5, 7) * 255
    video = torch.nn.functional.interpolate(coarse, size=(40, 56), mode="bilinear").round().to(torch.uint8)
    video = video.permute(0, 2, 3, 1)  # [T,H,W,3]
    ours = ClipTransform(32)(video)
    assert ours.shape == (1, 3, 3, 32, 32)
    # [T,3,H,W] floats in [0, 1], as VideoTransform also takes them
    floats = VideoTransform(32)(video.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(floats, ours[0], atol=1.5 / 255 / 0.26, rtol=0)


def test_three_crop_covers_the_long_side():
    video = torch.zeros(2, 32, 96, 3, dtype=torch.uint8)
    video[..., :32, 0] = 255  # red left third
    video[..., 64:, 2] = 255  # blue right third
    crops = ClipTransform(32, crops=3, mean=(0, 0, 0), std=(1, 1, 1))(video)
    assert crops.shape == (3, 2, 3, 32, 32)
    assert crops[0, :, 0].mean() > 0.99 and crops[0, :, 2].mean() < 0.01
    assert crops[1].max() == 0  # centre third is black
    assert crops[2, :, 2].mean() > 0.99 and crops[2, :, 0].mean() < 0.01
    tall = ClipTransform(32, crops=3)(torch.zeros(1, 96, 32, 3, dtype=torch.uint8))
    assert tall.shape == (3, 1, 3, 32, 32)


def test_train_crop_without_flip_keeps_orientation():
    video = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    video[..., :, :16, 0] = 255
    torch.manual_seed(3)
    for _ in range(10):
        out = ClipTransform(32, train=True, flip=False, scale=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))(video)
        assert out[0, 0, 0, :, :8].mean() > 0.9 and out[0, 0, 0, :, -8:].mean() < 0.1


@pytest.mark.parametrize("bad, error", [(torch.zeros(2, 8, 8, 3, dtype=torch.int32), TypeError), (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ValueError)])
def test_transform_rejects_bad_input(bad, error):
    with pytest.raises(error):
        ClipTransform(8)(bad)
    with pytest.raises(ValueError, match="crops"):
        ClipTransform(8, crops=2)
