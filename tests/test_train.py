"""Trainer, checkpoints and exact resume."""

import json
import math
import os

import pytest
import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpfast import create_model_and_transforms
from mpfast.engine import FeatureCache, FeatureDataset, TrainConfig, Trainer, evaluate, load_checkpoint, load_head
from mpfast.engine import checkpoint as checkpoint_module
from mpfast.engine.cache import collate_features
from mpfast.engine.checkpoint import NonFiniteError
from mpfast.engine.trainer import WarmupCosine, batch_logits

CLASSES = ["moving left", "moving right", "moving up"]


def _model(name, **options):
    torch.manual_seed(0)
    return create_model_and_transforms(name, None, num_frames=4, **options)[0]


def _features(count=12, views=2, dim=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, views, 4, dim, generator=generator)
    labels = torch.arange(count) % len(CLASSES)
    return FeatureCache.from_tensors(features, labels)


def _trainer(model, cache, output_dir=None, *, overwrite=False, classes=CLASSES, model_info=None, **options):
    config = TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "progress": False,
                            "log_every": 1, **options})
    return Trainer(model, classes, FeatureDataset(cache, train=True, seed=3), config, output_dir=output_dir,
                   model_info=model_info or {"model": "mpfast-tiny"}, overwrite=overwrite)


def _head(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("clip.")}


class Interrupted(Exception):
    pass


def _logged_steps(output) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tiny_model_name, tmp_path):
    cache = _features()
    reference_model = _model(tiny_model_name)
    reference = _trainer(reference_model, cache)
    reference.fit()
    assert reference.step == 6

    interrupted = _trainer(_model(tiny_model_name), cache, tmp_path, checkpoint_every=4)
    save = interrupted.save

    def save_then_stop(path):
        save(path)
        if interrupted.step == 4:  # mid-epoch
            raise Interrupted

    interrupted.save = save_then_stop
    with pytest.raises(Interrupted):
        interrupted.fit()
    rng_at_save = torch.get_rng_state()
    torch.manual_seed(1234)  # a fresh process would have another RNG state

    resumed_model = _model(tiny_model_name)
    resumed = _trainer(resumed_model, cache, tmp_path / "resumed")
    resumed.resume(tmp_path / "last.safetensors")
    assert resumed.step == 4 and torch.equal(torch.get_rng_state(), rng_at_save)
    assert resumed.scheduler.last_epoch == 4
    resumed.fit()
    expected, got = _head(reference_model), _head(resumed_model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    for p_ref, p_res in zip(reference.parameters, resumed.parameters):
        a, b = reference.optimizer.state[p_ref], resumed.optimizer.state[p_res]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()


def test_metrics_log_has_each_step_once_after_restart_or_resume(tiny_model_name, tmp_path):
    def steps():
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    cache = _features()
    _trainer(_model(tiny_model_name), cache, tmp_path, checkpoint_every=2).fit()
    assert steps() == [1, 2, 3, 4, 5, 6]
    again = _trainer(_model(tiny_model_name), cache, tmp_path, checkpoint_every=2, overwrite=True)  # a new run
    log_train = again._log_train

    def log_then_stop(*args):
        log_train(*args)
        if again.step == 5:  # logged, but the last checkpoint is at step 4
            raise Interrupted

    again._log_train = log_then_stop
    with pytest.raises(Interrupted):
        again.fit()
    assert steps() == [1, 2, 3, 4, 5]  # the old run's records are gone
    resumed = _trainer(_model(tiny_model_name), cache, tmp_path, checkpoint_every=2)
    resumed.resume(tmp_path / "last.safetensors")
    resumed.fit()
    assert steps() == [1, 2, 3, 4, 5, 6]  # step 5 redone, logged once


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 6}, "batch_size=4 (this run: 6)"),
    ({"lr": 0.5}, "lr=0.01 (this run: 0.5)"),
    ({"cache": _features(seed=9)}, "the training data (12 videos, this run 12"),
    ({"cache": _features(count=8)}, "the training data (12 videos, this run 8"),
    ({"classes": ["a", "b", "c"]}, "the class list"),
    ({"model_info": {"model": "ViT-B-32"}}, "model='mpfast-tiny' (this run: 'ViT-B-32')"),
])
def test_resume_refuses_another_run(tiny_model_name, tmp_path, change, message):
    trainer = _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=1)
    trainer.fit()
    change = dict(change)
    other = _trainer(_model(tiny_model_name), change.pop("cache", _features()), **{"epochs": 1, **change})
    with pytest.raises(ValueError, match=r"cannot resume .*last.safetensors', it comes from another run: "
                                         rf".*{message.replace('(', '.').replace(')', '.')}.*another --output"):
        other.resume(tmp_path / "last.safetensors")
    same = _trainer(_model(tiny_model_name), _features(), epochs=1, log_every=5, num_workers=0)  # logging may differ
    same.resume(tmp_path / "last.safetensors")
    assert same.step == trainer.step


def test_resume_refuses_a_checkpoint_that_records_no_run(tiny_model_name, tmp_path):
    trainer = _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=1)
    trainer.fit()
    path = tmp_path / "last.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    state = json.loads(metadata["train_state"])
    del state["run"]
    save_file(load_file(path), path, metadata={**metadata, "train_state": json.dumps(state)})
    with pytest.raises(ValueError, match="records no digest of its run"):
        _trainer(_model(tiny_model_name), _features(), epochs=1).resume(path)


def test_a_run_in_the_output_folder_is_never_overwritten(tiny_model_name, tmp_path):
    first = _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=1)
    first.fit()
    before = {name: (tmp_path / name).read_bytes() for name in ("last.safetensors", "metrics.jsonl")}
    with pytest.raises(FileExistsError, match=rf"--output '{tmp_path}' already holds a run \(last.safetensors, "
                                              rf"metrics.jsonl\): pass --resume {tmp_path}/last.safetensors to "
                                              "continue it, --overwrite to replace it, or choose another --output"):
        _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=2).fit()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    (tmp_path / "last.safetensors").unlink()  # a run killed before its first checkpoint: its metrics remain
    with pytest.raises(FileExistsError, match=r"already holds a run \(metrics.jsonl\): pass --overwrite"):
        _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=2).fit()
    replaced = _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=2, overwrite=True)
    replaced.fit()
    assert load_checkpoint(tmp_path / "last.safetensors").train_state["step"] == 6
    assert _logged_steps(tmp_path) == list(range(1, 7))


def test_two_trainers_never_share_an_output_folder(tiny_model_name, tmp_path):
    with FileLock(tmp_path / ".lock"):  # another process training there
        with pytest.raises(FileExistsError, match="another process is training into"):
            _trainer(_model(tiny_model_name), _features(), tmp_path, epochs=1).fit()
    assert not (tmp_path / "last.safetensors").exists()


def test_resuming_a_finished_run_into_a_new_folder_writes_its_checkpoint(tiny_model_name, tmp_path):
    finished = _trainer(_model(tiny_model_name), _features(), tmp_path / "a", epochs=1)
    finished.fit()
    resumed = _trainer(_model(tiny_model_name), _features(), tmp_path / "b", epochs=1)
    resumed.resume(tmp_path / "a" / "last.safetensors")
    resumed.fit()
    assert resumed.step == finished.step == 3
    first, second = tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors"
    assert load_file(second).keys() == load_file(first).keys()
    for name, tensor in load_checkpoint(first).head.items():
        assert torch.equal(tensor, load_checkpoint(second).head[name])


def test_a_metrics_log_cut_short_by_a_crash_is_tolerated(tiny_model_name, tmp_path, caplog):
    cache = _features()
    interrupted = _trainer(_model(tiny_model_name), cache, tmp_path, checkpoint_every=2)
    save = interrupted.save

    def save_then_stop(path):
        save(path)
        if interrupted.step == 4:
            raise Interrupted

    interrupted.save = save_then_stop
    with pytest.raises(Interrupted):
        interrupted.fit()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"type": "train", "ep')  # killed while writing a record
    resumed = _trainer(_model(tiny_model_name), cache, tmp_path, checkpoint_every=2)
    resumed.resume(tmp_path / "last.safetensors")
    resumed.fit()
    assert "metrics.jsonl:5 is not a complete record" in caplog.text
    assert _logged_steps(tmp_path) == list(range(1, 7))


def _nan_at(row, count=12):
    cache = _features(count=count)
    features = cache.features[:]
    features[row, 1, 2, 3] = float("nan")
    return FeatureCache.from_tensors(features, cache.labels)


def test_non_finite_features_stop_training_before_the_step(tiny_model_name, tmp_path):
    model = _model(tiny_model_name)
    trainer = _trainer(model, _nan_at(7), tmp_path, checkpoint_every=1, epochs=1)
    with pytest.raises(NonFiniteError) as error:
        trainer.fit()
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"non-finite loss at step {trainer.step + 1} (epoch 0); "
                                                       "non-finite logits for cached video 7. The step was not taken")
    assert all(torch.isfinite(p).all() for p in trainer.parameters)
    saved = load_checkpoint(tmp_path / "last.safetensors")  # the last good state, loadable
    assert saved.train_state["step"] == trainer.step
    assert all(torch.equal(saved.head[name], tensor) for name, tensor in _head(model).items())


def test_a_non_finite_gradient_stops_training_naming_the_batch(tiny_model_name):
    model = _model(tiny_model_name)
    model.motion.gate.register_hook(lambda grad: grad * float("inf"))
    trainer = _trainer(model, _features(count=4), batch_size=4, grad_clip=0.0)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 1 \(epoch 0\); the batch: cached video "
                                             r"\d, cached video \d, cached video \d and 1 more"):
        trainer.fit()
    assert trainer.step == 0 and torch.equal(model.motion.gate, _model(tiny_model_name).motion.gate)


def test_evaluation_refuses_non_finite_logits(tiny_model_name):
    with pytest.raises(NonFiniteError, match=r"non-finite logits for 1 of 12 videos \(cached video 4\)"):
        evaluate(_model(tiny_model_name), FeatureDataset(_nan_at(4)), CLASSES)


def test_checkpoints_with_non_finite_values_are_neither_written_nor_loaded(tiny_model_name, tmp_path):
    model = _model(tiny_model_name)
    path = tmp_path / "head.safetensors"
    checkpoint_module.save_checkpoint(path, model)
    with torch.no_grad():
        model.motion.gate[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not writing checkpoint .*1 tensor\(s\) hold inf or NaN "
                                             r"\(model.motion.gate\)"):
        checkpoint_module.save_checkpoint(tmp_path / "nan.safetensors", model)
    assert not (tmp_path / "nan.safetensors").exists()
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    for name in list(tensors)[:4]:
        tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=r"holds inf or NaN in 4 tensor\(s\) \(.* and 1 more\): it comes from a "
                                             "diverged run and cannot be used"):
        load_checkpoint(path)


def test_only_the_head_trains_and_metrics_are_logged(tiny_model_name, tmp_path):
    model = _model(tiny_model_name)
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    head_before = _head(model)
    trainer = _trainer(model, _features(), tmp_path, epochs=1)
    trainer.fit()
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in clip_before.items())
    changed = [name for name, value in _head(model).items() if not torch.equal(value, head_before[name])]
    assert "motion.gate" in changed and "communication.text_scale" in changed
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["type"] == "train" and r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in records)


def test_training_fits_the_training_set(tiny_model_name):
    cache = _features(count=24)
    model = _model(tiny_model_name)
    before, logits, labels = evaluate(model, FeatureDataset(cache), CLASSES)
    loss_before = torch.nn.functional.cross_entropy(logits, labels).item()
    trainer = _trainer(model, cache, epochs=6, lr=3e-2)
    trainer.fit()
    after, logits, labels = evaluate(model, FeatureDataset(cache), CLASSES)
    loss_after = torch.nn.functional.cross_entropy(logits, labels).item()
    assert after["count"] == 24 and after["top1"] > before["top1"]
    assert loss_after < 0.85 * loss_before, (loss_before, loss_after)


def _one_step(model, **options):
    cache = _features(count=8)
    trainer = _trainer(model, cache, batch_size=8, **options)
    dataset = trainer.train_set
    result = trainer.train_step(collate_features([dataset[i] for i in range(len(dataset))]),
                                model.encode_classes(CLASSES))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.parameters]))
    return result, norm.item()


def test_multi_view_logits_are_averaged(tiny_model_name):
    model = _model(tiny_model_name)
    with torch.no_grad():
        model.motion.gate.normal_()  # a head away from zero-init
    features = _features(count=2, views=3).features[:]
    classes = model.encode_classes(CLASSES)
    got = batch_logits(model, {"features": features}, classes, torch.device("cpu"))
    per_view = torch.stack([model.forward_features(features[:, v], classes) for v in range(3)], dim=1)
    torch.testing.assert_close(got, per_view.mean(dim=1))
    pooled = model.forward_features(features.mean(dim=1), classes)  # averaging features instead is different
    assert (got - pooled).abs().max() > 1e-3


def test_gradients_are_clipped(tiny_model_name):
    _, unclipped = _one_step(_model(tiny_model_name), grad_clip=0.0)
    _, clipped = _one_step(_model(tiny_model_name), grad_clip=1e-3)
    assert unclipped > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-4)


def test_bf16_autocast_step_is_close_to_float32(tiny_model_name):
    reference, _ = _one_step(_model(tiny_model_name))
    result, norm = _one_step(_model(tiny_model_name), amp="bf16")
    assert math.isfinite(norm) and result["loss_sum"] != reference["loss_sum"]  # autocast did run in bfloat16
    assert result["loss_sum"] == pytest.approx(reference["loss_sum"], rel=2e-2)


def test_fp16_needs_cuda(tiny_model_name):
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        _trainer(_model(tiny_model_name), _features(), amp="fp16")


def test_schedule_warms_up_then_decays():
    schedule = WarmupCosine(warmup=3, total=13, floor=0.1)
    factors = [schedule(step) for step in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])) and factors[13] == pytest.approx(0.1)


def test_checkpoint_round_trip_and_mismatch(tiny_model_name, tmp_path):
    model = _model(tiny_model_name)
    with torch.no_grad():
        model.motion.gate.fill_(0.25)
    checkpoint_module.save_checkpoint(tmp_path / "head.safetensors", model, model_info={"model": tiny_model_name},
                                      class_names=CLASSES)
    loaded = load_checkpoint(tmp_path / "head.safetensors")
    assert loaded.model_info == {"model": tiny_model_name} and loaded.class_names == CLASSES
    assert loaded.train_state is None and not any(name.startswith("clip.") for name in loaded.head)
    other = _model(tiny_model_name)
    load_head(other, loaded)
    assert torch.equal(other.motion.gate, model.motion.gate)
    with pytest.raises(ValueError, match=r"motion.gate has shape \(2, 32\), the model expects \(3, 32\)"):
        load_head(_model(tiny_model_name, strides=(1, 2, 3)), loaded)
    loaded.head.pop("motion.gate")
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['motion.gate'\]"):
        load_head(other, loaded)


def test_checkpoint_write_is_atomic(tiny_model_name, tmp_path, monkeypatch):
    model = _model(tiny_model_name)
    path = tmp_path / "head.safetensors"
    checkpoint_module.save_checkpoint(path, model)
    original = path.read_bytes()

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.save_checkpoint(path, model)
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["head.safetensors"]


def test_loading_never_unpickles(tmp_path):
    pickled = tmp_path / "evil.safetensors"
    torch.save({"model.x": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        load_checkpoint(pickled)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not an mpfast checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.safetensors")


def test_train_config_validation():
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
