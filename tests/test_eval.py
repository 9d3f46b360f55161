"""rexnet-eval: the number it prints for a rexnet-train checkpoint is that run's own validation metric.

A one-epoch rexnet-train run on the digits data set (tests/digits_runs.py: its generator and small-run settings,
fewer images) writes metrics.jsonl, best.pdckpt and best_model.pdparams; rexnet-eval on the same
validation list must print the same top-1, top-5 and loss. Also: the class-per-folder form, --limit,
refused images, an export directory (against Classifier, which test_service pins to the service), and
usage errors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import pytest

import digits_runs
from rexnet_train.eval_cli import main

VAL_PER_CLASS = digits_runs.RUNS["trained"].val_per_class


@pytest.fixture(scope="module")
def trained() -> Dict:
    """One epoch of rexnet-train (CPU, no progress bar; digits_runs: started when collection ended): its
    output folder and last metrics record."""
    run = digits_runs.finish("trained")
    record = json.loads((run.out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"out": run.out, "metrics": record}


@pytest.fixture(scope="module")
def digits() -> Path:
    """The data set the one-epoch run trains and validates on."""
    return digits_runs.data("trained")


def eval_json(capsys, *args) -> Dict:
    code = main([*map(str, args), "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def assert_training_metric(result: Dict, metrics: Dict) -> None:
    assert result["samples"] == metrics["val_samples"] == 10 * VAL_PER_CLASS
    assert result["top1"] == metrics["val_top1"]
    assert result["top5"] == metrics["val_top5"]
    assert result["loss"] == pytest.approx(metrics["val_loss"], abs=1e-4)


def test_checkpoint_gives_the_runs_own_validation_metric(trained, digits, capsys):
    result = eval_json(capsys, trained["out"] / "best.pdckpt", digits / "val_list.txt", "--root", digits)
    assert_training_metric(result, trained["metrics"])
    assert result["refused"] == 0 and result["images"] == 10 * VAL_PER_CLASS
    print(f"rexnet-eval: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} loss {result['loss']:.4f}"
          f" (training's metrics.jsonl: {trained['metrics']['val_top1']:.4f}, "
          f"{trained['metrics']['val_top5']:.4f}, {trained['metrics']['val_loss']:.4f})")


def test_plain_weights_on_a_folder_tree_with_the_same_preprocessing(trained, digits, capsys):
    # best_model.pdparams has no config: the Eval settings of the run are given as flags.
    result = eval_json(capsys, trained["out"] / "best_model.pdparams", digits / "val", "--arch", "ReXNet_1_0",
                       "--resize-short", "36", "--crop-size", "32", "--batch-size", "7",
                       "--labels", trained["out"] / "label_list.txt")
    assert_training_metric(result, trained["metrics"])


def test_table_limit_and_refused_images(trained, digits, tmp_path, capsys):
    listing = (digits / "val_list.txt").read_text().splitlines()
    (tmp_path / "val").symlink_to(digits / "val")
    (tmp_path / "broken.png").write_bytes((digits / listing[0].split()[0]).read_bytes()[:60])
    (tmp_path / "list.txt").write_text("\n".join(listing[:9] + ["broken.png 3"]) + "\n")
    code = main([str(trained["out"] / "best.pdckpt"), str(tmp_path / "list.txt"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1  # the metrics are printed, over the images that could be decoded
    assert "10 (9 scored, 1 refused: truncated=1)" in out and "resize 36, crop 32" in out
    assert "top-1" in out and "top-5" in out and "from logits" in out

    result = eval_json(capsys, trained["out"] / "best.pdckpt", digits / "val_list.txt", "--limit", "20")
    assert result["images"] == result["samples"] == 20


def test_export_directory_scores_what_the_classifier_answers(scored_model_dir, digits, capsys):
    from rexnet_serving.classifier import Classifier
    from rexnet_serving.imageio import decode_image
    from rexnet_train.data import read_list_file
    result = eval_json(capsys, scored_model_dir, digits / "val_list.txt", "--limit", "30", "--batch-size", "8")
    samples = read_list_file(str(digits / "val_list.txt"), str(digits))
    samples = [samples[i * len(samples) // 30] for i in range(30)]
    probs = Classifier(scored_model_dir).classify_arrays(
        [decode_image(Path(s.path).read_bytes()) for s in samples])
    labels = np.array([s.label for s in samples])
    order = np.argsort(-probs, axis=1, kind="stable")
    assert result["top1"] == pytest.approx(np.mean(order[:, 0] == labels))
    assert result["top5"] == pytest.approx(np.mean((order[:, :5] == labels[:, None]).any(axis=1)))
    expected_loss = np.mean(-np.log(np.maximum(probs[np.arange(30), labels], 1e-12)))
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "{digits}/missing_list.txt"], "no such list file or folder"),
    (["{ckpt}", "{digits}/val_list.txt", "--arch", "ReXNet_2_0"], "trained as ReXNet_1_0"),
    (["{ckpt}", "{digits}/val_list.txt", "--runtime", "openvino"], "weights run eagerly"),
    (["{out}/missing.pdparams", "{digits}/val_list.txt"], "no such weights file"),
    (["{ckpt}", "{digits}/val", "--labels", "{digits}/val_list.txt"], "expected '<id> <name>'"),
])
def test_usage_errors_exit_2_with_one_line(trained, digits, capsys, args, message):
    values = {"ckpt": trained["out"] / "best.pdckpt", "digits": digits, "out": trained["out"]}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
