"""Annotation readers and evaluation protocols."""

import pytest
import torch

from mpfast.data import (
    FEW_SHOT_K,
    AnnotationError,
    VideoEntry,
    average_views,
    classification_metrics,
    few_shot_indices,
    few_shot_subset,
    mean_std,
    read_class_names,
    read_hmdb51_split,
    read_kinetics_csv,
    read_list,
    read_ucf101_split,
    write_class_names,
    write_list,
)
from mpfast.data.protocols import class_split, relabel


def test_list_round_trip_with_spaces_and_comments(tmp_path):
    entries = [VideoEntry("a/x 1.mp4", 0), VideoEntry("b/y.mp4", 2)]
    write_list(tmp_path / "l.txt", entries)
    (tmp_path / "l.txt").write_text("# comment\n\n" + (tmp_path / "l.txt").read_text())
    assert read_list(tmp_path / "l.txt", num_classes=3) == entries


@pytest.mark.parametrize("text, line, message", [
    ("a.mp4 0\nb.mp4\n", 2, "expected 'relative/path label_index'"),
    ("a.mp4 zero\n", 1, "label must be an integer"),
    ("a.mp4 0\nb.mp4 -1\n", 2, "out of range"),
    ("a.mp4 0\nc.mp4 1\nb.mp4 3\n", 3, r"out of range, expected \[0, 3\)"),
])
def test_malformed_list_lines_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message) as info:
        read_list(path, num_classes=3)
    assert info.value.line == line and f"bad.txt:{line}:" in str(info.value)


def test_list_errors_for_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_list(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("\n# only a comment\n")
    with pytest.raises(AnnotationError, match="no videos"):
        read_list(tmp_path / "e.txt")


def test_class_names(tmp_path):
    write_class_names(tmp_path / "c.csv", ["brush hair", "cartwheel, fast"])
    assert read_class_names(tmp_path / "c.csv") == ["brush hair", "cartwheel, fast"]
    (tmp_path / "unordered.csv").write_text("1,b\n0,a\n")
    assert read_class_names(tmp_path / "unordered.csv") == ["a", "b"]
    for text, message in [("0,a\n0,b\n", "appears twice"), ("0,a\n2,c\n", "must be 0..1"), ("x,a\n", "integer"),
                          ("0\n", "expected 'id,name'"), ("0,\n", "empty")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(AnnotationError, match=message):
            read_class_names(tmp_path / "bad.csv")


def test_hmdb51_split_files(tmp_path):
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (tmp_path / "cartwheel_test_split1.txt").write_text("d.avi 2\ne.avi 1\n")
    (tmp_path / "cartwheel_test_split2.txt").write_text("d.avi 1\n")
    train, names = read_hmdb51_split(tmp_path, 1, "train")
    test, _ = read_hmdb51_split(tmp_path, 1, "test")
    assert names == ["brush hair", "cartwheel"]
    assert train == [VideoEntry("brush_hair/a.avi", 0), VideoEntry("cartwheel/e.avi", 1)]
    assert test == [VideoEntry("brush_hair/b.avi", 0), VideoEntry("cartwheel/d.avi", 1)]
    (tmp_path / "cartwheel_test_split1.txt").write_text("d.avi 2\ne.avi 7\n")
    with pytest.raises(AnnotationError, match=r"cartwheel_test_split1.txt:2"):
        read_hmdb51_split(tmp_path, 1, "train")
    with pytest.raises(FileNotFoundError):
        read_hmdb51_split(tmp_path, 3, "train")
    with pytest.raises(ValueError, match="subset"):
        read_hmdb51_split(tmp_path, 1, "val")


def test_ucf101_split_files(tmp_path):
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Basketball\n")
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_a.avi 1\nBasketball/v_b.avi 2\n")
    (tmp_path / "testlist01.txt").write_text("Basketball/v_c.avi\n")
    train, names = read_ucf101_split(tmp_path, 1, "train")
    test, _ = read_ucf101_split(tmp_path, 1, "test")
    assert names == ["Apply Eye Makeup", "Basketball"]
    assert train == [VideoEntry("ApplyEyeMakeup/v_a.avi", 0), VideoEntry("Basketball/v_b.avi", 1)]
    assert test == [VideoEntry("Basketball/v_c.avi", 1)]
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_a.avi 1\nBasketball/v_b.avi 1\n")
    with pytest.raises(AnnotationError, match=r"trainlist01.txt:2: label '1' does not match"):
        read_ucf101_split(tmp_path, 1, "train")
    (tmp_path / "testlist01.txt").write_text("Juggling/v_c.avi\n")
    with pytest.raises(AnnotationError, match="not in classInd"):
        read_ucf101_split(tmp_path, 1, "test")


def test_kinetics_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                    "abseiling,--abc,14,24,train,0\nair drumming,xyz,0,10,train,0\n")
    entries, names = read_kinetics_csv(path)
    assert names == ["abseiling", "air drumming"]
    assert entries == [VideoEntry("abseiling/--abc_000014_000024.mp4", 0), VideoEntry("air drumming/xyz_000000_000010.mp4", 1)]
    entries, _ = read_kinetics_csv(path, ["air drumming", "abseiling"], filename="{youtube_id}.mp4")
    assert entries[0] == VideoEntry("--abc.mp4", 1)
    with pytest.raises(AnnotationError, match="train.csv:3: label 'air drumming' is not among"):
        read_kinetics_csv(path, ["abseiling"])
    path.write_text("label,youtube_id,time_start,time_end\nabseiling,a,x,10\n")
    with pytest.raises(AnnotationError, match="train.csv:2: time_start"):
        read_kinetics_csv(path)
    path.write_text("label,id\n")
    with pytest.raises(AnnotationError, match="header lacks"):
        read_kinetics_csv(path)


def test_classification_metrics_by_hand():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [5, 9, 2, 3, 4, 1], [9, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([0, 0, 1, 0])
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(0.25)  # only row 0
    assert metrics["top5"] == pytest.approx(0.5)  # rows 0 and 1; rows 2 and 3 rank the label last
    assert metrics["mean_class_accuracy"] == pytest.approx((1 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(logits, torch.tensor([0, 0, 0, 6]))
    with pytest.raises(ValueError):
        classification_metrics(logits[:0], labels[:0])


def test_few_shot_subset_is_all_way_k_shot_and_seeded():
    entries = [VideoEntry(f"{c}/{i}.mp4", c) for c in range(5) for i in range(20)]
    for shots in FEW_SHOT_K:
        subset = few_shot_subset(entries, shots, seed=1)
        assert sorted(e.label for e in subset) == sorted(list(range(5)) * shots)
        assert subset == few_shot_subset(entries, shots, seed=1)
    assert few_shot_subset(entries, 4, seed=1) != few_shot_subset(entries, 4, seed=2)
    doubled = entries + entries[:3]  # a line listed twice is one more candidate, never an extra shot
    for seed in range(20):
        positions = few_shot_indices(doubled, 2, seed=seed)
        assert positions == sorted(positions) and sorted(doubled[i].label for i in positions) == sorted(list(range(5)) * 2)
    with pytest.raises(ValueError, match="fewer than shots=32"):
        few_shot_subset(entries, 32)
    with pytest.raises(ValueError, match="positive"):
        few_shot_subset(entries, 0)


def test_mean_std_views_and_zero_shot_class_split():
    assert mean_std([0.5, 0.7, 0.6]) == pytest.approx((0.6, (0.02 / 3) ** 0.5))
    logits = torch.arange(12.0).view(4, 3)  # 2 videos x 2 views
    torch.testing.assert_close(average_views(logits, 2), torch.tensor([[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]))
    seen, unseen = class_split(10, 0.5, seed=0)
    assert len(seen) == 5 and not set(seen) & set(unseen) and sorted(seen + unseen) == list(range(10))
    entries = [VideoEntry(f"{c}.mp4", c) for c in range(10)]
    relabelled = relabel(entries, unseen)
    assert [e.label for e in relabelled] == list(range(5)) and [e.path for e in relabelled] == [f"{c}.mp4" for c in unseen]
