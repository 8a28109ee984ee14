"""Annotation files: the common list format and the official HMDB-51, UCF-101, Kinetics files.

Common format, one video per line: ``relative/path.mp4 label_index`` (the path may contain
spaces; the label is the last field), with a class-name file in CSV form ``id,name``
(ids ``0..C-1``, optional header line ``id,name``) or one name per line. Every reader
returns ``(entries, class_names)`` with ``entries`` a list of :class:`VideoEntry`, and
raises :class:`AnnotationError` naming the file and line of anything malformed. Files
are UTF-8, with or without a byte-order mark. Class names must be distinct (CLIP's
tokenizer ignores case and repeated spaces, so "Run" and "run" are the same class).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the line."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = os.fspath(path), line


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One labelled video."""

    path: str  # path relative to the video root (or absolute)
    label: int  # class index into the class-name list


def _lines(path: str | os.PathLike) -> Iterable[tuple[int, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {os.fspath(path)!r} does not exist")
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield number, line


def read_list(path: str | os.PathLike, num_classes: int | None = None) -> list[VideoEntry]:
    """Reads a list file ``relative/path.mp4 label_index`` per line (``#`` starts a comment line).

    Args:
        path: the list file.
        num_classes: when given, labels must lie in ``[0, num_classes)``.
    """
    entries = []
    for number, line in _lines(path):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise AnnotationError(path, number, f"expected 'relative/path label_index', got {line!r}")
        video, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise AnnotationError(path, number, f"label must be an integer class index, got {label_text!r}") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise AnnotationError(path, number, f"label {label} out of range, expected {bound}")
        entries.append(VideoEntry(video, label))
    if not entries:
        raise AnnotationError(path, None, "no videos listed")
    return entries


def write_list(path: str | os.PathLike, entries: Sequence[VideoEntry]) -> None:
    """Writes entries in the common list format."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(f"{entry.path} {entry.label}\n" for entry in entries)


def _name_key(name: str) -> str:
    return " ".join(name.casefold().split())


def check_class_names(names: Sequence[str], where: Callable[[int], str] = lambda i: f"class {i}") -> list[str]:
    """Returns ``names`` if they are distinct non-empty strings; else raises ``ValueError`` naming the repeats.

    Names are compared as CLIP's tokenizer sees them: ignoring case and repeated spaces.
    ``where(i)`` describes the position of name ``i`` in the error message.
    """
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where(index)}: class name is empty")
        key = _name_key(name)
        if key in seen:
            raise ValueError(f"{where(index)}: class name {name!r} repeats {names[seen[key]]!r} of {where(seen[key])}")
        seen[key] = index
    return list(names)


def parse_class_names(value: str) -> list[str]:
    """Class names from a class-name file (see :func:`read_class_names`) or a comma-separated list.

    A value naming an existing file is read as a file; a value that looks like a path
    (a path separator, or ending in ``.csv``/``.txt``) but is not a file raises
    ``FileNotFoundError``; anything else is split at commas (``"run,jump,walk"``).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"class names must be a file or a comma-separated list, got {value!r}")
    if os.path.isfile(value):
        return read_class_names(value)
    if os.sep in value or value.lower().endswith((".csv", ".txt")):
        raise FileNotFoundError(f"class-name file {value!r} does not exist")
    names = [name.strip() for name in value.lstrip("\ufeff").split(",")]
    return check_class_names(names, lambda i: f"class list {value!r}, name {i + 1}")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Reads class names: an ``id,name`` CSV (ids ``0..C-1`` in any order, optional ``id,name``
    header) or, when the first line is a single non-numeric field, one name per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file {os.fspath(path)!r} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if "".join(row).strip()]
    if not rows:
        raise AnnotationError(path, None, "no classes listed")
    if [cell.strip().lower() for cell in rows[0][1]] == ["id", "name"]:
        rows = rows[1:]
    elif len(rows[0][1]) == 1 and not rows[0][1][0].strip().lstrip("-").isdigit():  # one name per line
        with open(path, encoding="utf-8-sig") as handle:
            numbered = [(number, line.strip()) for number, line in enumerate(handle, start=1) if line.strip()]
        return check_class_names([name for _, name in numbered], lambda i: f"{os.fspath(path)}:{numbered[i][0]}")
    names: dict[int, str] = {}
    lines: dict[int, int] = {}
    for number, row in rows:
        if len(row) != 2:
            raise AnnotationError(path, number, f"expected 'id,name', got {','.join(row)!r}")
        try:
            index = int(row[0])
        except ValueError:
            raise AnnotationError(path, number, f"class id must be an integer, got {row[0]!r}") from None
        name = row[1].strip()
        if not name:
            raise AnnotationError(path, number, "class name is empty")
        if index in names:
            raise AnnotationError(path, number, f"class id {index} appears twice")
        names[index], lines[index] = name, number
    if not names:
        raise AnnotationError(path, None, "no classes listed")
    if sorted(names) != list(range(len(names))):
        raise AnnotationError(path, None, f"class ids must be 0..{len(names) - 1}, got {sorted(names)}")
    return check_class_names([names[i] for i in range(len(names))], lambda i: f"{os.fspath(path)}:{lines[i]}")


def write_class_names(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Writes an ``id,name`` CSV with a header."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "name"])
        writer.writerows((i, name) for i, name in enumerate(names))


def read_hmdb51_split(split_dir: str | os.PathLike, split: int, subset: str) -> tuple[list[VideoEntry], list[str]]:
    """Reads the official HMDB-51 split files ``<class>_test_split<k>.txt``.

    Each line is ``video.avi flag`` with flag 1 = train, 2 = test, 0 = unused. Videos are
    expected at ``<class>/<video.avi>`` under the video root. Classes are sorted by name.

    Args:
        split_dir: folder of the 153 split files. split: 1, 2 or 3. subset: "train" or "test".
    """
    _check_split(split, subset)
    pattern = re.compile(rf"^(.+)_test_split{split}\.txt$")
    files = sorted(p for p in Path(split_dir).iterdir() if pattern.match(p.name)) if Path(split_dir).is_dir() else []
    if not files:
        raise FileNotFoundError(f"no HMDB-51 files '*_test_split{split}.txt' in {os.fspath(split_dir)!r}")
    wanted = "1" if subset == "train" else "2"
    class_names = [pattern.match(p.name).group(1) for p in files]
    entries = []
    for label, file in enumerate(files):
        for number, line in _lines(file):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(file, number, f"expected 'video.avi 0|1|2', got {line!r}")
            if parts[1] == wanted:
                entries.append(VideoEntry(f"{class_names[label]}/{parts[0]}", label))
    return entries, [name.replace("_", " ") for name in class_names]


def read_ucf101_split(split_dir: str | os.PathLike, split: int, subset: str) -> tuple[list[VideoEntry], list[str]]:
    """Reads the official UCF-101 ``classInd.txt`` and ``trainlistNN.txt`` / ``testlistNN.txt``.

    ``classInd.txt`` lines are ``1 ApplyEyeMakeup`` (1-based); train lines are
    ``Class/v_x.avi 1-based-label``; test lines are ``Class/v_x.avi`` (label from the folder).
    Class names are split at capitals ("ApplyEyeMakeup" -> "Apply Eye Makeup").
    """
    _check_split(split, subset)
    root = Path(split_dir)
    index_file = root / "classInd.txt"
    folders: dict[str, int] = {}
    for number, line in _lines(index_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AnnotationError(index_file, number, f"expected '1-based-id ClassName', got {line!r}")
        folders[parts[1]] = int(parts[0]) - 1
    if sorted(folders.values()) != list(range(len(folders))):
        raise AnnotationError(index_file, None, "class ids must be 1..C")
    list_file = root / f"{subset}list{split:02d}.txt"
    entries = []
    for number, line in _lines(list_file):
        parts = line.split()
        if len(parts) not in (1, 2):
            raise AnnotationError(list_file, number, f"expected 'Class/v_x.avi [label]', got {line!r}")
        folder = parts[0].split("/")[0]
        if folder not in folders:
            raise AnnotationError(list_file, number, f"class folder {folder!r} is not in classInd.txt")
        label = folders[folder]
        if len(parts) == 2 and (not parts[1].isdigit() or int(parts[1]) - 1 != label):
            raise AnnotationError(list_file, number, f"label {parts[1]!r} does not match class {folder!r} ({label + 1})")
        entries.append(VideoEntry(parts[0], label))
    by_index = sorted(folders, key=folders.get)
    return entries, [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name) for name in by_index]


def read_kinetics_csv(csv_path: str | os.PathLike, class_names: Sequence[str] | None = None,
                      filename: str = "{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4",
                      ) -> tuple[list[VideoEntry], list[str]]:
    """Reads a Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split[,is_cc]``).

    Args:
        csv_path: e.g. ``train.csv`` or ``validate.csv``.
        class_names: the class list to index into (e.g. from the training CSV); by
            default the sorted labels of this file.
        filename: path of each video relative to the root, formatted with the row's
            fields (``label`` keeps its spaces; times are ints).
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"annotation file {os.fspath(csv_path)!r} does not exist")
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"label", "youtube_id", "time_start", "time_end"} - set(reader.fieldnames or ())
        if missing:
            raise AnnotationError(csv_path, 1, f"header lacks column(s) {sorted(missing)}")
        rows = []
        for row in reader:
            number = reader.line_num
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except (TypeError, ValueError):
                raise AnnotationError(csv_path, number, "time_start/time_end must be numbers") from None
            if not row["label"] or not row["youtube_id"]:
                raise AnnotationError(csv_path, number, "label and youtube_id must not be empty")
            rows.append((number, row["label"], row["youtube_id"], start, end))
    names = list(class_names) if class_names is not None else sorted({row[1] for row in rows})
    index = {name: i for i, name in enumerate(names)}
    entries = []
    for number, label, youtube_id, start, end in rows:
        if label not in index:
            raise AnnotationError(csv_path, number, f"label {label!r} is not among the {len(names)} classes")
        path = filename.format(label=label, youtube_id=youtube_id, time_start=start, time_end=end)
        entries.append(VideoEntry(path, index[label]))
    if not entries:
        raise AnnotationError(csv_path, None, "no videos listed")
    return entries, names


def _check_split(split: int, subset: str) -> None:
    if split not in (1, 2, 3):
        raise ValueError(f"split must be 1, 2 or 3, got {split!r}")
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
