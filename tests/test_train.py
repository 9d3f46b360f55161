"""rexnet-train: configs, augmentation, data errors, a real short training run, exact resume, 2-rank DDP.

The data set is scikit-learn's bundled handwritten digits, written as PNG files with PaddleClas list
files and as a class-per-folder tree (tests/digits_runs.py, which also starts the 3-epoch run early).
Runs use ReXNet_1_0 at 32x32 (resize 36, crop 32): Paddle's CPU depthwise convolution costs per sample
and channel, not per pixel, so the data set is kept small rather than the images.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import yaml

import digits_runs
from digits_runs import EPOCHS, RUNS, SMALL_RUN, data_overrides, train_command, write_digits
from rexnet_train import cli
from rexnet_train.config import CONFIG_DIR, SCHEMA, ConfigError, config_path, load_config
from rexnet_train.data import DataError, load_split, read_list_file

REPO = Path(__file__).resolve().parents[1]
WIDTHS = ["ReXNet_1_0", "ReXNet_1_3", "ReXNet_1_5", "ReXNet_2_0", "ReXNet_3_0"]
TRAIN_PER_CLASS, VAL_PER_CLASS = RUNS["full_run"].train_per_class, RUNS["full_run"].val_per_class


@pytest.fixture(scope="module")
def full_run():
    """The 3-epoch run (digits_runs: started when collection ended, beside the tests before it): its data
    set, output folder and metrics history."""
    run = digits_runs.finish("full_run")
    history = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    print(f"\n[train] {EPOCHS} epochs of {10 * TRAIN_PER_CLASS} images in {run.seconds:.1f}s: "
          + "; ".join(f"epoch {r['epoch']} loss {r['train_loss']:.3f} val top-1 {r['val_top1']:.3f} "
                      f"top-5 {r['val_top5']:.3f}" for r in history))
    return run.out, history


@pytest.fixture(scope="module")
def digits() -> Path:
    """The full run's data set (written by digits_runs, whether or not the run is selected)."""
    return digits_runs.data("full_run")


def _run(root: Path, out: Path, *extra: str, resume: str = None) -> int:
    argv = ["-c", "ReXNet_1_0", "--no-progress", "-o", f"Global.output_dir={out}"]
    for override in [*SMALL_RUN, *data_overrides(root), *extra]:
        argv += ["-o", override]
    if resume:
        argv += ["--resume", resume]
    return cli.main(argv)


def _weights(path: Path) -> Dict[str, np.ndarray]:
    from rexnet_serving.models import read_state_dict
    return read_state_dict(str(path))


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", WIDTHS)
def test_width_configs_share_the_official_recipe(arch):
    config = load_config(config_path(arch))
    assert config["Arch"]["name"] == arch
    assert config["Optimizer"] == {"momentum": 0.9, "use_nesterov": True, "weight_decay": 1e-5,
                                   "one_dim_param_no_weight_decay": True, "lr": 0.5, "lr_batch_size": 512,
                                   "warmup_epochs": 5, "warmup_lr": 1e-4, "min_lr": 1e-5,
                                   "cooldown_epochs": 10}
    assert config["Global"]["epochs"] == 410 and config["Global"]["use_amp"] is True
    assert config["Loss"]["label_smoothing"] == 0.1
    aug = config["Augment"]
    assert (aug["crop_size"], aug["interpolation"], aug["randaugment_ops"], aug["randaugment_magnitude"],
            aug["randaugment_magnitude_std"], aug["random_erasing_prob"]) == (224, "random", 2, 9, 0.5, 0.2)
    # The per-width file names the architecture and nothing else.
    own = yaml.safe_load(Path(CONFIG_DIR, f"{arch}.yaml").read_text())
    assert own == {"_base_": "rexnet_imagenet.yaml", "Arch": {"name": arch}}


def test_finetune_config_drops_the_classifier_with_a_short_low_lr_schedule():
    config = load_config(config_path("finetune"))
    base = load_config(config_path("ReXNet_1_0"))
    assert config["Global"]["drop_classifier"] and config["Global"]["pretrained_model"]
    assert config["Global"]["epochs"] < base["Global"]["epochs"]
    assert config["Optimizer"]["lr"] < base["Optimizer"]["lr"]
    assert config["Arch"]["class_num"] != 1000


def test_overrides_are_yaml_scalars_and_lists():
    config = load_config(config_path("ReXNet_1_0"), [
        "Optimizer.lr=0.1", "Global.use_amp=true", "Augment.crop_scale=[0.25, 1]",
        "Global.pretrained_model=null", "Arch.name=ReXNet_2_0"])
    assert config["Optimizer"]["lr"] == 0.1 and config["Global"]["use_amp"] is True
    assert config["Augment"]["crop_scale"] == [0.25, 1.0]
    assert config["Arch"]["name"] == "ReXNet_2_0"


@pytest.mark.parametrize("content, words", [
    ("Optimizer:\n  learning_rate: 0.1\n", ["unknown key Optimizer.learning_rate"]),
    ("Optimiser:\n  lr: 0.1\n", ["unknown section 'Optimiser'"]),
    ("Optimizer:\n  momentum: 1.5\n", ["Optimizer.momentum", "out of range"]),
    ("Data:\n  batch_size: 0\n", ["Data.batch_size", "out of range"]),
    ("Global:\n  epochs: ten\n", ["Global.epochs", "expected int"]),
    ("Arch:\n  name: ReXNet_9_9\n", ["Arch.name", "not one of"]),
    ("Augment:\n  crop_scale: [1.0, 0.5]\n", ["Augment.crop_scale", "low <= high"]),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_text("_base_: " + str(Path(CONFIG_DIR, "ReXNet_1_0.yaml")) + "\n" + content)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_bad_overrides_and_base_cycles(tmp_path):
    with pytest.raises(ConfigError, match=r"override -o Loss.smoothing=0.1: unknown key Loss.smoothing"):
        load_config(config_path("ReXNet_1_0"), ["Loss.smoothing=0.1"])
    with pytest.raises(ConfigError, match="expected Section.key=value"):
        load_config(config_path("ReXNet_1_0"), ["lr=0.1"])
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_every_schema_default_is_valid():
    from rexnet_train.config import _check_value
    for section, fields in SCHEMA.items():
        for key, field in fields.items():
            _check_value(field, field.default, f"{section}.{key}")


@pytest.mark.parametrize("argv, words", [
    (["-o", "Optimizer.lr=-1"], ["Optimizer.lr", "out of range"]),
    (["-o", "Global.nonsense=1"], ["unknown key Global.nonsense"]),
    (["-c", "/nonexistent/config.yaml"], ["cannot read config /nonexistent/config.yaml"]),
])
def test_cli_config_errors_exit_2_with_one_line(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err


# -- data -----------------------------------------------------------------------------------------
def test_list_file_and_folder_tree_give_the_same_samples(digits):
    listed, names = load_split(str(digits), str(digits / "train_list.txt"), "train")
    tree, folder_names = load_split(str(digits / "train"), None, "train")
    assert names is None and folder_names == [str(i) for i in range(10)]
    key = lambda s: (os.path.basename(s.path), s.label)  # noqa: E731
    assert sorted(map(key, listed)) == sorted(map(key, tree))
    assert len(listed) == 10 * TRAIN_PER_CLASS


@pytest.mark.parametrize("content, words", [
    ("", ["has no samples"]),
    ("\n\n", ["has no samples"]),
    ("train/0/x.png\n", [":1:", "expected '<relative/image/path> <label>'"]),
    ("{first}\ntrain/0/a.png three\n", [":2:", "non-negative integer label"]),
    ("{first}\n\ntrain/0/missing.png 0\n", [":3:", "image not found", "missing.png"]),
])
def test_bad_list_files_name_file_and_line(digits, tmp_path, content, words):
    first = (digits / "train_list.txt").read_text().splitlines()[0]
    path = tmp_path / "list.txt"
    path.write_text(content.format(first=first))
    with pytest.raises(DataError) as info:
        read_list_file(str(path), str(digits))
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_cli_data_errors_exit_1_with_one_line(digits, tmp_path, capsys):
    bad = tmp_path / "bad_list.txt"
    bad.write_text("train/0/nope.png 0\n")
    code = _run(digits, tmp_path / "out", f"Data.train_list={bad}")
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:1: image not found" in err and "Traceback" not in err
    assert cli.main(["-o", f"Data.train_root={digits}", "-o", f"Data.train_list={digits}/train_list.txt",
                     "-o", "Arch.class_num=5", "-o", "Data.val_root=null",
                     "-o", f"Global.output_dir={tmp_path / 'out2'}"]) == 1
    assert "out of range for Arch.class_num=5" in capsys.readouterr().err


def test_folder_tree_class_names_travel_with_the_model(digits, tmp_path):
    from rexnet_train.engine import LABELS_FILE, Trainer
    config = load_config(config_path("ReXNet_1_0"), [
        *SMALL_RUN, f"Data.train_root={digits / 'train'}", "Data.train_list=null",
        f"Data.val_root={digits / 'val'}", "Data.val_list=null", f"Global.output_dir={tmp_path}"])
    trainer = Trainer(config, show_progress=False)
    assert len(trainer.train_set) == 10 * TRAIN_PER_CLASS
    assert (tmp_path / LABELS_FILE).read_text().splitlines() == [f"{i} {i}" for i in range(10)]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config


# -- real training --------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_lowers_the_loss_and_beats_chance(full_run):
    import paddle
    out, history = full_run
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_samples"] == 10 * VAL_PER_CLASS
    assert history[-1]["best_val_top1"] >= 0.3  # chance is 0.1
    assert history[-1]["val_top5"] >= history[-1]["val_top1"]
    for name in ("config.yaml", "label_list.txt", "train.log", "curves.png", "latest.pdparams",
                 "best_model.pdparams", "best.pdckpt", *(f"epoch_{e:04d}.pdckpt"
                                                          for e in range(1, EPOCHS + 1))):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The best pair comes from one epoch: both names lead into the directory that `best` points at.
    best = _weights(out / "best_model.pdparams")
    state = paddle.load(str(out / "best.pdckpt"))
    assert os.path.realpath(out / "best.pdckpt") == os.path.realpath(out / "best" / "best.pdckpt")
    assert all(np.array_equal(best[k], np.asarray(state["model"][k])) for k in best)
    assert state["epoch"] == max(history, key=lambda r: r["val_top1"])["epoch"]
    log = (out / "train.log").read_text()
    assert "img/s" in log and "eta" in log and " lr " in log


@pytest.mark.slow
def test_saved_weights_load_strictly_and_reproduce_the_reported_accuracy(full_run, digits):
    """best_model.pdparams is what rexnet-export --weights takes; evaluating it again gives the same
    top-1 as the run reported for its best epoch."""
    import paddle
    from rexnet_serving.imageio import decode_image
    from rexnet_serving.models import build_model, load_weights
    from rexnet_serving.preprocess import PreprocessConfig, preprocess
    out, history = full_run
    model = build_model("ReXNet_1_0", class_num=10)
    load_weights(model, str(out / "best_model.pdparams"), strict=True)
    model.eval()
    cfg = PreprocessConfig(resize_short=36, crop_size=32)
    samples = read_list_file(str(digits / "val_list.txt"), str(digits))
    correct = 0
    with paddle.no_grad():
        for i in range(0, len(samples), 50):
            batch = samples[i:i + 50]
            x = preprocess([decode_image(Path(s.path).read_bytes()) for s in batch], cfg)
            pred = model(x).argmax(axis=1).numpy()
            correct += int((pred == np.array([s.label for s in batch])).sum())
    assert correct / len(samples) == pytest.approx(history[-1]["best_val_top1"], abs=1e-9)


@pytest.mark.slow
def test_trained_weights_export_and_serve_the_same_predictions(full_run, digits, tmp_path):
    """Training hands over to export: best_model.pdparams and label_list.txt go through rexnet-export,
    and Paddle Inference on the export predicts what the eager model predicts."""
    import paddle
    from rexnet_serving.export.cli import main as export_main
    from rexnet_serving.imageio import decode_image
    from rexnet_serving.runtimes.paddle import InferenceModel
    from rexnet_serving.models import build_model, load_weights
    from rexnet_serving.preprocess import PreprocessConfig, preprocess
    out, _ = full_run
    export_dir = tmp_path / "export"
    assert export_main(["--arch", "ReXNet_1_0", "--weights", str(out / "best_model.pdparams"),
                        "--labels", str(out / "label_list.txt"), "--input-size", "32",
                        "-o", str(export_dir)]) == 0
    served = InferenceModel(export_dir)
    assert served.manifest.class_num == 10
    assert served.manifest.labels() == [str(i) for i in range(10)]  # label_list.txt: "<id> <id>"
    samples = read_list_file(str(digits / "val_list.txt"), str(digits))[:20]
    x = preprocess([decode_image(Path(s.path).read_bytes()) for s in samples],
                   PreprocessConfig(resize_short=36, crop_size=32))
    model = build_model("ReXNet_1_0", class_num=10)
    load_weights(model, str(out / "best_model.pdparams"))
    model.eval()
    with paddle.no_grad():
        eager = paddle.nn.functional.softmax(model(x)).numpy()
    np.testing.assert_allclose(served.run(x.numpy()), eager, atol=1e-5)


@pytest.fixture(scope="module")
def resumed_runs(full_run, digits, tmp_path_factory):
    """Epoch 3 again from the epoch-2 checkpoint, twice at once (training is single-threaded on CPU, so
    the two runs take the machine's two cores): at batch 8 through the rexnet-train command in a child
    process, and at the run's own batch 16 in this process. Returns both output directories."""
    out, _ = full_run
    checkpoint = str(out / f"epoch_{EPOCHS - 1:04d}.pdckpt")
    at_batch_16 = tmp_path_factory.mktemp("resumed")
    at_batch_8 = tmp_path_factory.mktemp("resumed_batch_8")
    cmd = train_command(digits, at_batch_8, "Data.batch_size=8", resume=checkpoint)
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        start = time.time()
        assert _run(digits, at_batch_16, resume=checkpoint) == 0
        print(f"\n[resume] epoch {EPOCHS} from the epoch-{EPOCHS - 1} checkpoint in "
              f"{time.time() - start:.1f}s")
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return at_batch_16, at_batch_8


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(full_run, resumed_runs):
    out, history = full_run
    resumed, _ = resumed_runs
    a, b = _weights(out / "latest.pdparams"), _weights(resumed / "latest.pdparams")
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by up to {worst}"
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in again] == list(range(1, EPOCHS + 1))
    assert again[-1]["val_top1"] == history[-1]["val_top1"]
    assert again[-1]["train_loss"] == pytest.approx(history[-1]["train_loss"], abs=1e-6)


@pytest.mark.slow
def test_resume_with_another_batch_size_continues_the_schedule_in_epochs(resumed_runs):
    """Stopped after epoch 2 at batch 16 (25 steps per epoch), resumed at batch 8 (50 steps, half the
    peak LR): the last epoch runs on the cosine's tail in epochs, not on a schedule counted in steps."""
    _, resumed = resumed_runs
    record = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()][-1]
    peak, steps = 0.32 * 8 / 512, 400 // 8
    t = EPOCHS - 1 + (steps - 1) / steps  # the LR of the epoch's last step
    expected = 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / EPOCHS))
    assert record["epoch"] == EPOCHS and record["lr"] == pytest.approx(expected, rel=1e-9)
    assert "LR schedule continues at epoch 2: 50 iterations per epoch instead of 25" in \
        (resumed / "train.log").read_text()


@pytest.mark.slow
def test_resume_rejects_plain_weights_and_other_models(full_run, digits, tmp_path, capsys):
    out, _ = full_run
    assert _run(digits, tmp_path / "a", resume=str(out / "latest.pdparams")) == 1
    assert "not a rexnet-train checkpoint" in capsys.readouterr().err
    assert _run(digits, tmp_path / "b", "Arch.name=ReXNet_1_3",
                resume=str(out / "epoch_0001.pdckpt")) == 1
    assert "Arch.name='ReXNet_1_0'" in capsys.readouterr().err


# -- two processes through Paddle's launcher ------------------------------------------------------
@pytest.mark.slow
def test_two_rank_cpu_launch_keeps_replicas_equal_and_counts_each_sample_once(tmp_path):
    import paddle
    from rexnet_serving.imageio import decode_image
    from rexnet_serving.models import build_model, load_weights
    from rexnet_serving.preprocess import PreprocessConfig, preprocess
    root = tmp_path / "data"
    write_digits(root, train_per_class=3, val_per_class=3)
    # 25 validation images: shards of 13 and 12, so any double counting of a padded sample shows.
    lines = (root / "val_list.txt").read_text().splitlines()[:25]
    (root / "val_list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    overrides = [*SMALL_RUN, *data_overrides(root), "Global.epochs=1", "Data.batch_size=8",
                 f"Global.output_dir={out}"]
    script = Path(sys.executable).parent / "rexnet-train"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "logs"), str(script), "-c", "ReXNet_1_0", "--no-progress"]
    for override in overrides:
        cmd += ["-o", override]
    # The launcher takes any CUDA_VISIBLE_DEVICES (even empty) to mean GPUs: leave it out on CPU.
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-5000:]
    print(f"\n[launch] 2 CPU ranks, 1 epoch, {time.time() - start:.1f}s")

    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    fingerprints = record["replica_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert record["val_samples"] == 25
    # The reduced accuracy equals a single-process evaluation of the saved weights on all 25 images.
    model = build_model("ReXNet_1_0", class_num=10)
    load_weights(model, str(out / "latest.pdparams"))
    model.eval()
    samples = read_list_file(str(root / "val_list.txt"), str(root))
    with paddle.no_grad():
        x = preprocess([decode_image(Path(s.path).read_bytes()) for s in samples],
                       PreprocessConfig(resize_short=36, crop_size=32))
        pred = model(x).argmax(axis=1).numpy()
    top1 = float((pred == np.array([s.label for s in samples])).mean())
    assert record["val_top1"] == pytest.approx(top1, abs=1e-9)
    assert "rexnet-train: done" in logs
