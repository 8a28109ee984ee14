"""Faults from the command line: kill -9, concurrent runs, damaged files, wrong roots, non-finite values.

What must hold: no crash leaves a cache or run folder the next run cannot use, finished
work is never recomputed (only a damaged shard is), no command exits 0 with a
non-finite result or over another run, and what cannot be done is said in one line.
The subprocess tests run ``mpfast`` through a small driver that can make shards small
and slow (environment variables), so that kills and waits land where they should.
"""

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("decord")
pytest.importorskip("av")

from mpfast.cli import main  # noqa: E402
from mpfast.data.synthetic import make_synthetic_dataset  # noqa: E402
from mpfast.engine import FeatureCache, load_checkpoint  # noqa: E402
from mpfast.engine import cache as cache_module  # noqa: E402
from mpfast.engine.shards import check_shard, read_header  # noqa: E402

CONFIG = str(Path(__file__).parent / "configs" / "mpfast-tiny.json")
MODEL = ["--model", "mpfast-tiny", "--model-config", CONFIG, "--device", "cpu", "--num-frames", "4", "--no-progress"]
VIDEOS = 12  # training videos of the synthetic set
SHARD = 2  # videos per shard in the subprocesses: 6 shards

# Runs the mpfast command line with small shards, a delay per shard or step, and a gate
# that holds the second shard back until a file exists.
DRIVER = """
import os, sys, time
import torch
torch.set_num_threads(1)
import mpfast.engine.cache as cache
import mpfast.engine.trainer as trainer
cache.SHARD_SIZE = int(os.environ.get("FAULT_SHARD_SIZE", cache.SHARD_SIZE))
finish, step = cache._finish_shard, trainer.Trainer.train_step
def slow_finish(dataset, folder, meta, plan, number, *rest):
    gate = os.environ.get("FAULT_GATE")
    while gate and number > 0 and not os.path.exists(gate):
        time.sleep(0.05)
    time.sleep(float(os.environ.get("FAULT_SHARD_DELAY", "0")))
    finish(dataset, folder, meta, plan, number, *rest)
def slow_step(self, *args):
    time.sleep(float(os.environ.get("FAULT_STEP_DELAY", "0")))
    return step(self, *args)
cache._finish_shard, trainer.Trainer.train_step = slow_finish, slow_step
from mpfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    paths = make_synthetic_dataset(root / "data", train_per_class=3, test_per_class=1, size=32, num_frames=8)
    return {**{k: str(v) for k, v in paths.items()}, "tmp": root}


def _start(args, log: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_SHARD_SIZE": str(SHARD),
                   **{k: str(v) for k, v in env.items()}}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE, stderr=handle,
                                text=True, env=environment)


def _finish(process: subprocess.Popen, log: Path, timeout=240) -> tuple[int, dict | None, str]:
    out, _ = process.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    return process.returncode, json.loads(lines[-1]) if lines else None, log.read_text()


def _wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def _cache_args(data, cache_dir):
    return ["cache", *MODEL, "--list", data["train"], "--cache-dir", str(cache_dir), "--batch-size", "2"]


def _finished_shards(cache_dir) -> dict[int, str]:
    """The shards on disk, each checked (checksums, values): a kill never leaves a damaged one."""
    shards = {}
    for path in glob.glob(os.path.join(cache_dir, "*", "shard-*.safetensors")):
        header = read_header(path)
        expected = {**{k: header.metadata[k] for k in ("key", "number", "start", "stop")}, "dtype": "float16",
                    "row_shape": None}
        check_shard(path, expected)
        shards[header.number] = path
    return shards


def _reference_cache(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", SHARD)
    assert main(_cache_args(data, tmp_path / "reference")) == 0
    return FeatureCache(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache"])


@pytest.mark.parametrize("runs", [2, 3])
def test_concurrent_cache_runs_wait_and_read_the_finished_cache(data, tmp_path, runs):
    cache_dir, gate = tmp_path / "cache", tmp_path / "gate"
    first = _start(_cache_args(data, cache_dir), tmp_path / "log0", FAULT_GATE=gate)
    _wait_for(lambda: glob.glob(str(cache_dir / "*" / "shard-000000.safetensors")), what="the first shard")
    others = [_start(_cache_args(data, cache_dir), tmp_path / f"log{i}") for i in range(1, runs)]
    for i in range(1, runs):  # each of them finds the key locked and waits
        _wait_for(lambda: "waiting for it" in (tmp_path / f"log{i}").read_text(), what=f"run {i} to wait")
    assert len(os.listdir(next(p for p in cache_dir.iterdir() if p.is_dir()))) == 2  # videos.json, shard 0: untouched
    gate.touch()
    results = [_finish(p, tmp_path / f"log{i}") for i, p in enumerate([first, *others])]
    assert [rc for rc, _, _ in results] == [0] * runs, [log[-2000:] for _, _, log in results]
    reports = [report for _, report, _ in results]
    assert len({r["cache"] for r in reports}) == 1 and [r["encoded"] for r in reports] == [VIDEOS] + [0] * (runs - 1)
    FeatureCache(reports[0]["cache"])  # sound


def test_a_waiting_run_takes_over_when_the_builder_is_killed(data, tmp_path):
    cache_dir, gate = tmp_path / "cache", tmp_path / "gate"
    first = _start(_cache_args(data, cache_dir), tmp_path / "log0", FAULT_GATE=gate)
    _wait_for(lambda: glob.glob(str(cache_dir / "*" / "shard-000000.safetensors")), what="the first shard")
    second = _start(_cache_args(data, cache_dir), tmp_path / "log1")
    _wait_for(lambda: "waiting for it" in (tmp_path / "log1").read_text(), what="the second run to wait")
    first.send_signal(signal.SIGKILL)
    first.wait()
    rc, report, log = _finish(second, tmp_path / "log1")
    assert rc == 0, log[-2000:]
    assert report["encoded"] == VIDEOS - SHARD  # shard 0 was finished: not computed again
    FeatureCache(report["cache"])


def test_kill_9_at_random_points_of_cache_loses_only_unfinished_shards(data, tmp_path, monkeypatch, capsys):
    reference = _reference_cache(data, tmp_path, monkeypatch, capsys)
    cache_dir, rng = tmp_path / "cache", random.Random(12)
    for round_ in range(3):
        process = _start(_cache_args(data, cache_dir), tmp_path / "log", FAULT_SHARD_DELAY=0.15)
        if round_ == 1:  # at a random time, possibly before anything is written
            time.sleep(rng.uniform(0.5, 6.0))
        else:  # while shards are being written
            done = len(_finished_shards(cache_dir))
            _wait_for(lambda: len(glob.glob(str(cache_dir / "*" / "shard-*"))) > done or process.poll() is not None)
            time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        _finished_shards(cache_dir)  # every shard left behind is whole
    finished = _finished_shards(cache_dir)
    rc, report, log = _finish(_start(_cache_args(data, cache_dir), tmp_path / "log"), tmp_path / "log")
    assert rc == 0, log[-2000:]
    assert report["encoded"] == VIDEOS - SHARD * len(finished)  # nothing finished is computed again
    assert report["cache"].endswith(os.path.basename(reference.folder))  # the same key
    torch.testing.assert_close(FeatureCache(report["cache"]).features[:], reference.features[:], rtol=2**-10, atol=1e-6)


def _train_args(data, cache_dir, output, *extra):
    return ["train", *MODEL, "--train-list", data["train"], "--classes", data["classes"], "--cache-dir", str(cache_dir),
            "--output", str(output), "--epochs", "3", "--batch-size", "4", "--checkpoint-every", "1",
            "--log-every", "1", "--lr", "0.01", *extra]


def _steps(output):
    path = Path(output) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_kill_9_at_random_points_of_train_then_resume_is_exact(data, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(cache_module, "SHARD_SIZE", SHARD)
    assert main(_cache_args(data, cache_dir)) == 0  # the runs below share this cache
    rc, _, log = _finish(_start(_train_args(data, cache_dir, tmp_path / "ref"), tmp_path / "log"), tmp_path / "log")
    assert rc == 0, log[-2000:]
    output, rng = tmp_path / "run", random.Random(3)
    for round_ in range(3):
        checkpoint = output / "last.safetensors"
        extra = ["--resume", str(checkpoint)] if checkpoint.exists() else ["--overwrite"] if output.exists() else []
        process = _start(_train_args(data, cache_dir, output, *extra), tmp_path / "log", FAULT_STEP_DELAY=0.1)
        if round_ == 0:
            time.sleep(rng.uniform(0.5, 5.0))
        else:
            logged = len(_steps(output))
            _wait_for(lambda: len(_steps(output)) > logged or process.poll() is not None, what="a training step")
            time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if checkpoint.exists():
            load_checkpoint(checkpoint)  # whole and finite after any kill
    checkpoint = output / "last.safetensors"
    extra = ["--resume", str(checkpoint)] if checkpoint.exists() else ["--overwrite"]
    rc, report, log = _finish(_start(_train_args(data, cache_dir, output, *extra), tmp_path / "log"), tmp_path / "log")
    assert rc == 0, log[-2000:]
    assert report["steps"] == 9 and os.path.exists(report["checkpoint"])
    assert _steps(output) == _steps(tmp_path / "ref") == list(range(1, 10))  # every step logged once
    expected, got = load_checkpoint(tmp_path / "ref" / "last.safetensors"), load_checkpoint(output / "last.safetensors")
    assert expected.head.keys() == got.head.keys()
    for name, tensor in expected.head.items():
        assert torch.equal(tensor, got.head[name]), name  # bitwise


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished run (3 epochs) from a cache."""
    root = tmp_path_factory.mktemp("trained")
    base = ["train", *MODEL, "--train-list", data["train"], "--classes", data["classes"], "--cache-dir",
            str(root / "cache"), "--output", str(root / "run"), "--batch-size", "4", "--log-every", "1"]
    assert main([*base, "--epochs", "3"]) == 0
    return {"root": root, "args": [*base, "--epochs", "3"], "base": base}


def _error(capsys, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"mpfast {command}: error: ")]
    assert len(errors) == 1, lines
    return errors[0]


def test_train_never_overwrites_a_finished_run(trained, capsys):
    run = trained["root"] / "run"
    before = {name: (run / name).read_bytes() for name in ("last.safetensors", "metrics.jsonl")}
    capsys.readouterr()
    again = [*trained["base"], "--epochs", "1"]
    assert main(again) == 2
    assert "already holds a run (last.safetensors, metrics.jsonl): pass --resume" in _error(capsys, "train")
    assert {name: (run / name).read_bytes() for name in before} == before  # 9 steps, 9 records: untouched
    assert main([*again, "--output", str(trained["root"] / "elsewhere")]) == 0  # another folder is fine


def test_resume_checks_the_run_and_every_reported_path_exists(data, trained, tmp_path, capsys):
    run = trained["root"] / "run"
    lines = Path(data["train"]).read_text().splitlines()
    (tmp_path / "other.txt").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "other.csv").write_text("id,name\n0,a\n1,b\n2,c\n3,d\n")
    capsys.readouterr()
    for flag, value in (("--train-list", tmp_path / "other.txt"), ("--classes", tmp_path / "other.csv")):
        args = [*trained["args"], "--resume", str(run / "last.safetensors"), "--root", data["root"], flag, str(value)]
        assert main(args) == 2
        assert "it comes from another run: the " in _error(capsys, "train")
    moved = [*trained["args"], "--resume", str(run / "last.safetensors"), "--output", str(tmp_path / "new")]
    assert main(moved) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert os.path.isfile(report["checkpoint"]) and report["steps"] == 9


@pytest.mark.parametrize("command", ["cache", "train", "eval"])
def test_a_wrong_root_fails_in_one_line(data, tmp_path, capsys, command):
    nowhere = str(tmp_path / "nowhere")
    args = {"cache": ["--list", data["train"], "--cache-dir", str(tmp_path / "c")],
            "train": ["--train-list", data["train"], "--classes", data["classes"], "--output", str(tmp_path / "r")],
            "eval": ["--list", data["train"], "--classes", data["classes"]]}[command]
    assert main([command, *MODEL, *args, "--root", nowhere]) == 2
    error = _error(capsys, command)
    assert f"nothing could be read: none of the {VIDEOS} videos of the list exists (first tried: " \
           f"'{nowhere}/videos/train/moving_left_000.mp4'); root: '{nowhere}'" in error


def test_videos_that_exist_but_cannot_be_read_fail_in_one_line(tmp_path, capsys):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"junk")
    (tmp_path / "list.txt").write_text("a.mp4 0\nb.mp4 1\n")
    (tmp_path / "classes.csv").write_text("id,name\n0,x\n1,y\n")
    assert main(["train", *MODEL, "--train-list", str(tmp_path / "list.txt"), "--classes",
                 str(tmp_path / "classes.csv"), "--output", str(tmp_path / "run"), "--batch-size", "2",
                 "--epochs", "2"]) == 2
    error = _error(capsys, "train")
    assert "nothing could be read: none of the 2 training videos (first tried: cannot read video" in error
    assert f"a.mp4" in error and f"root: '{tmp_path}'" in error
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_a_checkpoint_with_non_finite_values_is_refused(data, trained, tmp_path, capsys):
    path = tmp_path / "nan.safetensors"
    source = trained["root"] / "run" / "last.safetensors"
    with safe_open(source, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(source)
    tensors["model.motion.gate"] = torch.full_like(tensors["model.motion.gate"], float("nan"))
    save_file(tensors, path, metadata=metadata)
    capsys.readouterr()
    assert main(["eval", *MODEL, "--list", data["test"], "--classes", data["classes"], "--checkpoint", str(path)]) == 2
    assert "holds inf or NaN in 1 tensor(s) (model.motion.gate)" in _error(capsys, "eval")
    video = str(Path(data["root"]) / "videos" / "test" / "moving_up_000.mp4")
    assert main(["classify", video, "--classes", "a,b", "--checkpoint", str(path), *MODEL[:-1]]) == 2
    assert "cannot be used" in _error(capsys, "classify")


def test_cache_command_lists_and_prunes(data, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert main(_cache_args(data, cache_dir)) == 0
    folder = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache"]
    assert main(["cache", "--cache-dir", str(cache_dir), "--list-caches"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["caches"]
    assert listed["cache"] == folder and listed["state"] == "complete" and listed["videos"] == VIDEOS
    video = Path(data["root"]) / "videos" / "train" / "moving_up_001.mp4"
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert main(["cache", "--cache-dir", str(cache_dir), "--prune", "--dry-run"]) == 0
        assert [c["state"] for c in json.loads(capsys.readouterr().out)["pruned"]] == ["stale"]
        assert os.path.isdir(folder)
        assert main(["cache", "--cache-dir", str(cache_dir), "--prune"]) == 0
        assert not os.path.exists(folder)
    finally:
        os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(["cache", *MODEL, "--list", data["train"]]) == 2  # no --cache-dir
    assert "--cache-dir is needed" in capsys.readouterr().err


def _spawned_build(rank, world, port, paths, cache_dir, crash, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mpfast import create_model_and_transforms
    from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_list
    from mpfast.engine import build_cache
    import open_clip

    open_clip.add_model_config(CONFIG)
    torch.manual_seed(0)
    model = create_model_and_transforms("mpfast-tiny", None, num_frames=4)[0]
    if crash and rank == 1:
        finish = cache_module._finish_shard

        def die_after_one(*args):
            finish(*args)
            os._exit(9)  # as kill -9 would: no clean-up

        cache_module._finish_shard = die_after_one
    dataset = VideoDataset(read_list(paths["train"]), paths["root"], SamplingConfig(4), ClipTransform(32))
    cache = build_cache(model, dataset, cache_dir, "mpfast-tiny", batch_size=2, shard_size=SHARD)
    Path(results, f"rank{rank}.json").write_text(json.dumps(cache.built))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_each_process_of_a_torchrun_group_reuses_the_finished_shards(data, tmp_path):
    import torch.multiprocessing as mp

    cache_dir = tmp_path / "cache"
    with pytest.raises(mp.ProcessExitedException):  # process 1 dies after its first shard
        mp.spawn(_spawned_build, args=(2, _free_port(), data, cache_dir, True, tmp_path), nprocs=2)
    finished = _finished_shards(cache_dir)
    assert 1 in finished  # the dead process's shard survived it
    mp.spawn(_spawned_build, args=(2, _free_port(), data, cache_dir, False, tmp_path), nprocs=2)
    built = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert built[0] == built[1] and built[0]["videos_encoded"] == VIDEOS - SHARD * len(finished)
    shards = _finished_shards(cache_dir)
    new = sorted(set(shards) - set(finished))
    assert [int(read_header(shards[n]).metadata["rank"]) for n in new] == [i % 2 for i in range(len(new))]
    folder = os.path.dirname(shards[0])
    assert FeatureCache(folder).features.shape[0] == VIDEOS
