"""rexnet-train optimizer, LR schedule and checkpoints: the recipe's LR at chosen steps, resumes across
another world size or batch size through the real checkpoint format, which parameters get weight decay,
Nesterov momentum, durable saves and the best pair.

World sizes are exercised without launching processes: a rank count only changes the global batch and
the iterations per epoch (Paddle's DistributedBatchSampler, computed here for ImageNet-1k's 1,281,167
images), and those are what the scheduler and the checkpoint see.
"""
from __future__ import annotations

import math
import os

import numpy as np
import paddle
import pytest

from rexnet_serving.models.weights import save_atomically
from rexnet_train import checkpoint as ckpt
from rexnet_train.config import config_path, load_config
from rexnet_train.optim import build_optimizer, split_weight_decay
from rexnet_train.schedule import ScheduleError, build_scheduler, restore_scheduler

IMAGENET_TRAIN = 1_281_167
MIN_LR, WARMUP_LR = 1e-5, 1e-4


def _recipe(*overrides):
    return load_config(config_path("ReXNet_1_0"), list(overrides))


class _Images(paddle.io.Dataset):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n


def iters_per_epoch(world: int, batch: int) -> int:
    sampler = paddle.io.DistributedBatchSampler(_Images(IMAGENET_TRAIN), batch_size=batch,
                                                num_replicas=world, rank=0, shuffle=True)
    return len(sampler)


def timm_lr(t: float, peak: float) -> float:
    """timm's CosineLRScheduler of the recipe at t epochs: warm-up 5 from 1e-4, cosine over 400, cool-down."""
    if t < 5:
        return WARMUP_LR + (peak - WARMUP_LR) * t / 5
    if t < 400:
        return MIN_LR + 0.5 * (peak - MIN_LR) * (1 + math.cos(math.pi * t / 400))
    return MIN_LR


def _lr_at(scheduler, step: int) -> float:
    scheduler.step(step)  # Paddle's API: jump to this step count
    return scheduler.last_lr


def test_ipe_of_the_authors_setup():
    assert iters_per_epoch(4, 128) == 2503 and iters_per_epoch(8, 128) == 1252
    assert iters_per_epoch(4, 256) == 1252 and iters_per_epoch(2, 128) == 5005


def test_fresh_run_lr_at_chosen_steps():
    config = _recipe()
    assert config["Global"]["epochs"] == 410
    ipe = iters_per_epoch(4, 128)
    scheduler = build_scheduler(config["Optimizer"], 512, config["Global"]["epochs"], ipe)
    assert scheduler.last_lr == pytest.approx(1e-4)  # step 0: timm's warmup_lr, not 0
    expected = {
        1: 1e-4 + (0.5 - 1e-4) * (1 / ipe) / 5,
        ipe: 1e-4 + (0.5 - 1e-4) / 5,  # after epoch 1 of the warm-up
        5 * ipe // 2: 1e-4 + (0.5 - 1e-4) * (5 * ipe // 2) / ipe / 5,
        5 * ipe: 1e-5 + 0.5 * (0.5 - 1e-5) * (1 + math.cos(math.pi * 5 / 400)),  # 0.49988
        200 * ipe: 1e-5 + 0.5 * (0.5 - 1e-5),  # the middle of the cosine: 0.250005
        399 * ipe: 1e-5 + 0.5 * (0.5 - 1e-5) * (1 + math.cos(math.pi * 399 / 400)),
        400 * ipe: 1e-5, 405 * ipe: 1e-5, 410 * ipe - 1: 1e-5,  # cool-down
        410 * ipe: 1e-5, 1000 * ipe: 1e-5,  # past the end: never climbs back
    }
    for step, lr in expected.items():
        assert _lr_at(scheduler, step) == pytest.approx(lr, rel=1e-9, abs=1e-12), step
    assert expected[200 * ipe] == pytest.approx(0.250005)
    # Warm-up rises, then the LR never rises again to the end and beyond.
    lrs = [_lr_at(scheduler, s) for s in range(0, 500 * ipe, 997)]
    peak_at = int(np.argmax(lrs))
    assert np.all(np.diff(lrs[:peak_at + 1]) > 0) and np.all(np.diff(lrs[peak_at:]) <= 0)


def _checkpoint_after(tmp_path, epochs_done: int, world: int, batch: int, *overrides):
    """A real checkpoint (ckpt.training_state, written and read back) of a run stopped after
    ``epochs_done`` epochs on ``world`` ranks x ``batch``."""
    config = _recipe(f"Data.batch_size={batch}", *overrides)
    ipe = iters_per_epoch(world, batch)
    model = paddle.nn.Linear(4, 2)
    scheduler = build_scheduler(config["Optimizer"], world * batch, config["Global"]["epochs"], ipe)
    optimizer = build_optimizer(model, config["Optimizer"], scheduler)
    model(paddle.ones([2, 4])).sum().backward()
    optimizer.step()  # creates the momentum buffers that a checkpoint carries
    scheduler.step(epochs_done * ipe)
    path = str(tmp_path / ckpt.epoch_checkpoint_name(epochs_done))
    save_atomically(ckpt.training_state(model, optimizer, scheduler, epochs_done, config, world),
                      path)
    return ckpt.load_checkpoint(path)


def _resume(state, world: int, batch: int, *overrides):
    """What Trainer._resume does with the schedule: optimizer state (which restores its scheduler),
    then restore_scheduler's check against the checkpoint's epoch."""
    config = _recipe(f"Data.batch_size={batch}", *overrides)
    ipe = iters_per_epoch(world, batch)
    scheduler = build_scheduler(config["Optimizer"], world * batch, config["Global"]["epochs"], ipe)
    optimizer = build_optimizer(paddle.nn.Linear(4, 2), config["Optimizer"], scheduler)
    optimizer.set_state_dict(state["optimizer"])
    restore_scheduler(scheduler, state)
    return scheduler, ipe


@pytest.mark.parametrize("epochs_done, world, batch, new_world, new_batch", [
    (200, 4, 128, 8, 128),  # the case: 4 ranks -> 8, peak 0.5 -> 1.0
    (200, 4, 128, 2, 128),  # fewer ranks: peak 0.25
    (3, 4, 128, 4, 256),  # in the warm-up, larger batch per rank
    (398, 4, 128, 8, 64),  # same global batch, the end of the cosine
    (405, 4, 128, 8, 128),  # in the cool-down
])
def test_resume_across_world_and_batch_size_continues_in_epochs(tmp_path, epochs_done, world, batch,
                                                                new_world, new_batch):
    state = _checkpoint_after(tmp_path, epochs_done, world, batch)
    scheduler, ipe = _resume(state, new_world, new_batch)
    peak = 0.5 * new_world * new_batch / 512
    assert scheduler.schedule.peak_lr == pytest.approx(peak)
    assert scheduler.last_epoch == epochs_done * ipe
    assert scheduler.last_lr == pytest.approx(timm_lr(epochs_done, peak), rel=1e-9)
    for k in (1, 3, ipe // 2, ipe, 10 * ipe):  # steps after the resume
        t = epochs_done + k / ipe
        assert _lr_at(scheduler, epochs_done * ipe + k) == pytest.approx(timm_lr(t, peak), rel=1e-9,
                                                                         abs=1e-12), k
    # To the end and past it: no climb after the warm-up.
    tail = [_lr_at(scheduler, s) for s in range(max(epochs_done, 5) * ipe, 420 * ipe, 1009)]
    assert np.all(np.diff(tail) <= 0) and tail[-1] == pytest.approx(MIN_LR)


def test_resume_with_the_same_settings_is_exact(tmp_path):
    state = _checkpoint_after(tmp_path, 40, 4, 128)
    scheduler, ipe = _resume(state, 4, 128)
    fresh = build_scheduler(_recipe()["Optimizer"], 512, 410, ipe)
    fresh.step(40 * ipe)
    assert (scheduler.last_epoch, scheduler.last_lr) == (fresh.last_epoch, fresh.last_lr)


@pytest.mark.parametrize("override, words", [
    ("Global.epochs=310", ["decay_epochs: 400 in the checkpoint, 300 now", "Global.pretrained_model"]),
    ("Optimizer.warmup_epochs=3", ["warmup_epochs: 5 in the checkpoint, 3 now"]),
    ("Optimizer.lr=0.1", ["lr: 0.5 in the checkpoint, 0.1 now"]),
])
def test_resume_refuses_another_schedule_shape(tmp_path, override, words):
    state = _checkpoint_after(tmp_path, 100, 4, 128)
    with pytest.raises(ScheduleError) as info:
        _resume(state, 8, 128, override)
    for word in words:
        assert word in str(info.value)


def test_resume_refuses_a_step_counted_schedule(tmp_path):
    state = _checkpoint_after(tmp_path, 100, 4, 128)
    old = {"last_epoch": 250300, "last_lr": 0.25}  # what a Paddle LinearWarmup saved
    state["lr_scheduler"] = old
    state["optimizer"] = dict(state["optimizer"], LR_Scheduler=old)
    with pytest.raises(ScheduleError, match="counts steps, not epochs"):
        _resume(state, 8, 128)


def test_config_rejects_a_cooldown_or_warmup_that_does_not_fit():
    from rexnet_train.config import ConfigError
    with pytest.raises(ConfigError, match="Optimizer.cooldown_epochs=10 leaves no epoch"):
        _recipe("Global.epochs=10")
    with pytest.raises(ConfigError, match="Optimizer.warmup_epochs=5 is longer than the cosine"):
        _recipe("Global.epochs=14")


# -- optimizer ------------------------------------------------------------------------------------
def test_weight_decay_skips_one_dim_params_and_biases_of_rexnet():
    from rexnet_serving.models import build_model
    model = build_model("ReXNet_1_0", class_num=10)
    decay, no_decay = split_weight_decay(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decay) + len(no_decay) == 227 and len(no_decay) == 151
    assert all(len(p.shape) > 1 for p in decay)
    assert all(len(p.shape) == 1 for p in no_decay)
    assert not any(names[id(p)].endswith(".bias") for p in decay)
    bn = [n for n, layer in model.named_sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)]
    exempt = {names[id(p)] for p in no_decay}
    assert all(f"{n}.weight" in exempt and f"{n}.bias" in exempt for n in bn)
    assert "output.1.weight" in {names[id(p)] for p in decay}  # the classifier conv's kernel


class _Small(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(axis=[2, 3]))


def _one_step(optim_overrides, loss_fn):
    model = _Small()
    rng = np.random.default_rng(0)  # non-zero biases too, so that a decay of them would show
    trainable = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    for _, param in trainable:
        param.set_value(rng.normal(1.0, 0.5, param.shape).astype("float32"))
    optim = dict(_recipe()["Optimizer"], **optim_overrides)
    optimizer = build_optimizer(model, optim, 0.1)
    before = {n: p.numpy().copy() for n, p in trainable}
    loss_fn(model).backward()
    grads = {n: p.grad.numpy().copy() for n, p in trainable}
    optimizer.step()
    return before, grads, {n: p.numpy() for n, p in trainable}


def test_weight_decay_reaches_only_the_decayed_group():
    """Zero gradients: decayed weights shrink by the Nesterov L2 step, exempt ones stay bit-equal."""
    x = paddle.ones([2, 3, 5, 5])
    before, _, after = _one_step({"weight_decay": 0.01}, lambda m: m(x).sum() * 0)
    for name in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
        assert np.array_equal(before[name], after[name]), name
    for name in ("conv.weight", "fc.weight"):  # p - lr * (1 + mu) * wd * p, the first Nesterov step
        np.testing.assert_allclose(after[name], before[name] * (1 - 0.1 * 1.9 * 0.01), rtol=1e-6)
    before, _, after = _one_step({"weight_decay": 0.01, "one_dim_param_no_weight_decay": False},
                                 lambda m: m(x).sum() * 0)
    for name in before:  # switched off: every parameter decays (timm's filter_bias_and_bn=False)
        np.testing.assert_allclose(after[name], before[name] * (1 - 0.1 * 1.9 * 0.01), rtol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_is_nesterov_as_configured(nesterov):
    """First step from zero velocity: Nesterov moves by lr * (1 + mu) * g, plain momentum by lr * g."""
    assert _recipe()["Optimizer"]["use_nesterov"] is True
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype("float32"))
    before, grads, after = _one_step({"weight_decay": 0.0, "use_nesterov": nesterov},
                                     lambda m: (m(x) ** 2).sum())
    factor = 0.1 * (1.9 if nesterov else 1.0)
    for name in before:
        assert np.abs(grads[name]).max() > 0, name
        np.testing.assert_allclose(after[name], before[name] - factor * grads[name], rtol=1e-5,
                                   atol=1e-7)


# -- durable saves and the best pair --------------------------------------------------------------
def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "w.pdparams"
    save_atomically({"a": np.arange(3)}, str(path))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert os.path.basename(events[0][1]).startswith(".tmp-")  # the complete temporary file
    assert events[1][1] == str(path) and events[2][1] == str(tmp_path)
    assert list(paddle.load(str(path))["a"]) == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["w.pdparams"]


def _pair(out):
    state = paddle.load(str(out / ckpt.BEST_CHECKPOINT))
    weights = paddle.load(str(out / ckpt.BEST_WEIGHTS))
    return state["epoch"], int(np.asarray(weights["w"])[0])


def test_best_pair_switches_at_once_and_survives_a_crash_half_way(tmp_path, monkeypatch):
    out = tmp_path
    for epoch in (1, 2):
        ckpt.publish_best(str(out), {"epoch": epoch}, {"w": np.array([epoch])}, epoch)
        assert _pair(out) == (epoch, epoch)
    assert len([n for n in os.listdir(out) if n.startswith(ckpt.BEST_DIR_PREFIX)]) == 1

    real_save = ckpt.save_atomically

    def crash_on_weights(obj, path):
        if path.endswith(ckpt.BEST_WEIGHTS):
            raise KeyboardInterrupt("power lost")  # after the new checkpoint is written
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "save_atomically", crash_on_weights)
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish_best(str(out), {"epoch": 3}, {"w": np.array([3])}, 3)
    assert _pair(out) == (2, 2)  # both still from epoch 2
    monkeypatch.setattr(ckpt, "save_atomically", real_save)
    ckpt.publish_best(str(out), {"epoch": 4}, {"w": np.array([4])}, 4)
    assert _pair(out) == (4, 4)
    assert [n for n in os.listdir(out) if n.startswith(ckpt.BEST_DIR_PREFIX)] == \
        [os.readlink(out / ckpt.BEST_LINK)]  # the half-written pair is gone


def test_best_pair_replaces_plain_files_of_an_older_layout(tmp_path):
    for name in (ckpt.BEST_CHECKPOINT, ckpt.BEST_WEIGHTS):
        (tmp_path / name).write_bytes(b"old")
    ckpt.publish_best(str(tmp_path), {"epoch": 7}, {"w": np.array([7])}, 7)
    assert _pair(tmp_path) == (7, 7)
