"""rexnet-export --lite: Paddle Lite models that load in Lite's own predictor and agree with Paddle
Inference, and the three operator forms that make Paddle Lite 2.13's opt die on Paddle 2.6 programs.

opt and Lite's predictor run in child processes on the Python 3.10 venv of scripts/lite_tools.sh
(paddlelite has no wheels for the project's Python 3.11), built on first use.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from conftest import lite_tools_python
from images import make_photo_set
from rexnet_serving.export import export_model
from rexnet_serving.export import lite_format
from rexnet_serving.export.builder import ExportError
from rexnet_serving.manifest import MODEL_FILE, PARAMS_FILE



@pytest.fixture(scope="module", autouse=True)
def lite_python():
    """paddlelite has no Python 3.11 wheels: the worker runs on scripts/lite_tools.sh's Python 3.10 venv."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REXNET_LITE_PYTHON", lite_tools_python())
        yield

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def lite_export(scored_model_dir, tmp_path_factory):
    """The 10-class scored model exported again with --lite for both targets."""
    source = scored_model_dir.parent
    return export_model("ReXNet_1_0", tmp_path_factory.mktemp("lite") / "model",
                        weights=str(source / "scaled.pdparams"), labels=str(source / "labels.txt"),
                        lite_targets=("arm", "x86"))


def test_lite_models_are_recorded_and_x86_matches_paddle_inference(lite_export, tmp_path):
    from rexnet_serving.classifier import Classifier
    assert lite_export.paths["lite_arm"] == "lite/arm/model.nb"
    assert lite_export.paths["lite_x86"] == "lite/x86/model.nb"
    assert lite_export.versions["paddlelite"] == "2.13rc0"
    for target in ("arm", "x86"):
        assert lite_export.lite_file(target).stat().st_size > 1_000_000
    classifier = Classifier(lite_export.model_dir)
    photos = make_photo_set(tmp_path)
    images, errors = classifier.decode([p.read_bytes() for p in photos])
    assert not errors
    batch = np.asarray(classifier.preprocess(images))  # OpenCV on the CPU: already NumPy
    expected = classifier.model.run(batch)
    got = lite_format.run_lite(lite_export.lite_file("x86"), batch)
    assert got.shape == expected.shape == (len(photos), 10)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert float(np.abs(got - expected).max()) <= 1e-4
    print(f"Paddle Lite x86 vs Paddle Inference on {len(photos)} photos: max difference "
          f"{float(np.abs(got - expected).max()):.2g}, top-1 equal")
    assert expected.max() > 0.3 and expected.min() < 0.01  # far from uniform: the comparison means something


class TinyNet(nn.Layer):
    """One operator behind a convolution (opt needs a parameter file). Module level: dy2static reads
    the globals of the forward's module, not a function's locals."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2D(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if self.kind == "swish":
            return F.swish(x)
        if self.kind == "relu6":
            return F.relu6(x)
        return paddle.flatten(x, 1)


def save_tiny(kind: str, directory: Path) -> Path:
    net = TinyNet(kind)
    net.eval()
    spec = [paddle.static.InputSpec([None, 4, 8, 8], "float32", name="x")]
    paddle.jit.save(paddle.jit.to_static(net, input_spec=spec, full_graph=True), str(directory / "inference"),
                    input_spec=spec)
    return directory


@pytest.mark.parametrize("kind, cause", [
    ("swish", "No attributes called beta found for swish"),
    ("relu6", "No attributes called threshold found for relu6"),
    ("flatten", "crashed with SIGSEGV"),
])
def test_paddle_26_operator_forms_kill_opt_and_the_patched_program_converts(kind, cause, tmp_path):
    program = save_tiny(kind, tmp_path)
    out = tmp_path / "out"
    argv = [lite_format.lite_python(), str(lite_format.WORKER), "opt", str(program / MODEL_FILE),
            str(program / PARAMS_FILE), str(out), "x86"]
    with pytest.raises(lite_format.LiteError, match=cause):
        lite_format._worker(argv[2:], "opt")  # as written by Paddle 2.6: opt dies; we only get a message
    patched = tmp_path / "patched.pdmodel"
    lite_format.lite_compatible_program(program / MODEL_FILE, patched)
    subprocess.run([*argv[:3], str(patched), *argv[4:]], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "out.nb").stat().st_size > 0


def test_bad_targets_are_refused(scored_model_dir, tmp_path, capsys):
    from rexnet_serving.export.cli import main
    source = scored_model_dir.parent
    with pytest.raises(ExportError, match="name one or more of arm, x86"):
        export_model("ReXNet_1_0", tmp_path / "m", weights=str(source / "scaled.pdparams"),
                     lite_targets=("mips",))
    with pytest.raises(SystemExit) as exit_:
        main(["--weights", str(source / "scaled.pdparams"), "-o", str(tmp_path / "m"), "--lite",
              "--lite-targets", "arm,arm"])
    assert exit_.value.code == 2 and "each once" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
