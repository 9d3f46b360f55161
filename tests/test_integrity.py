"""Exports that cannot be served damaged: manifest.json records the size and sha256 of every file and a
digest of its own content; every loader calls manifest.verify_files first and refuses with the file
named (same-size corruption, a missing file, a hand-edited manifest, an export from before digests)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from rexnet_serving.manifest import (CONTENT_KEY, MANIFEST_FILE, IntegrityError, file_sha256, load_manifest,
                                     verify_files)

PARAMS = "inference/inference.pdiparams"
BIN = Path(sys.executable).parent


@pytest.fixture()
def model(random_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's export, free to damage."""
    return Path(shutil.copytree(random_model_dir, tmp_path / "ReXNet_1_0"))


def flip_bytes(path: Path, offset: int = 4096) -> None:
    """Same size, different content: a silently damaged file."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(model: Path, change) -> None:
    path = model / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_export_records_every_file(random_model_dir: Path) -> None:
    manifest = verify_files(random_model_dir)
    on_disk = sorted(p.relative_to(random_model_dir).as_posix() for p in random_model_dir.rglob("*")
                     if p.is_file() and p.name != MANIFEST_FILE)
    assert sorted(manifest.files) == on_disk
    assert {PARAMS, "inference/inference.pdmodel", "labels.txt", "serving_server/inference.pdiparams",
            "serving_client/serving_client_conf.prototxt"} <= set(on_disk)
    for name, record in manifest.files.items():
        path = random_model_dir / name
        assert record.size == path.stat().st_size and record.sha256 == file_sha256(path)
    assert CONTENT_KEY in json.loads((random_model_dir / MANIFEST_FILE).read_text())


def test_same_size_corruption_is_refused_by_every_loader(model: Path) -> None:
    from rexnet_serving.classifier import Classifier
    from rexnet_serving.inference import InferenceModel
    flip_bytes(model / PARAMS)
    target = str(model / PARAMS)
    with pytest.raises(IntegrityError, match=f"{target}: sha256 differs .*same size"):
        verify_files(model)
    with pytest.raises(IntegrityError, match=target):
        InferenceModel(model)
    with pytest.raises(IntegrityError, match=target):
        Classifier(model)


def test_corruption_of_the_serving_copy_is_refused_by_the_cpp_launcher(model: Path) -> None:
    from rexnet_serving.brpc.cpp_backend import BackendError, model_serving_dir
    flip_bytes(model / "serving_server" / "inference.pdiparams")
    with pytest.raises(BackendError, match="serving_server/inference.pdiparams: sha256 differs"):
        model_serving_dir(model)
    with pytest.raises(BackendError, match="serving_server/inference.pdiparams: sha256 differs"):
        model_serving_dir(model / "serving_server")  # given the Serving dir itself


def test_size_change_and_missing_file(model: Path) -> None:
    with (model / "labels.txt").open("a") as f:
        f.write("1000 extra\n")
    with pytest.raises(IntegrityError, match=r"labels\.txt: \d+ bytes, but the manifest records \d+"):
        verify_files(model)
    shutil.copy(model / "serving_server" / "inference.pdmodel", model / "x")  # an unlisted file is ignored
    (model / "inference" / "inference.pdmodel").unlink()
    with pytest.raises(IntegrityError, match=r"inference/inference\.pdmodel: missing"):
        verify_files(model)


def test_hand_edited_manifest_is_refused(model: Path) -> None:
    edit_manifest(model, lambda data: data["preprocess"].update(mean=[0.5, 0.5, 0.5]))
    assert load_manifest(model).preprocess.mean == (0.5, 0.5, 0.5)  # well-formed, so only the digest tells
    with pytest.raises(IntegrityError, match=f"{model / MANIFEST_FILE}: edited after export"):
        verify_files(model)


def test_listing_a_damaged_file_anew_is_refused(model: Path) -> None:
    """Re-recording the damaged file's digest by hand is a manifest edit too."""
    flip_bytes(model / PARAMS)
    edit_manifest(model, lambda data: data["files"][PARAMS].update(sha256=file_sha256(model / PARAMS)))
    with pytest.raises(IntegrityError, match="edited after export"):
        verify_files(model)
    edit_manifest(model, lambda data: data.pop(CONTENT_KEY))
    with pytest.raises(IntegrityError, match=f"{CONTENT_KEY} is missing"):
        verify_files(model)


def test_old_format_export_is_refused_with_how_to_reexport(model: Path) -> None:
    def to_v1(data):
        data.update(format_version=1)
        data.pop("files"), data.pop(CONTENT_KEY)
    edit_manifest(model, to_v1)
    with pytest.raises(ValueError, match=r"predates file digests.*rexnet-export --arch ReXNet_1_0 .*--force"):
        verify_files(model)


def test_manifest_file_paths_stay_inside_the_export(model: Path) -> None:
    edit_manifest(model, lambda data: data["files"].update({"../outside": {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(ValueError, match="'../outside' is not a file path inside the export"):
        load_manifest(model)


@pytest.mark.server
def test_rexnet_serve_refuses_a_damaged_export(model: Path, tmp_path: Path) -> None:
    flip_bytes(model / PARAMS)
    proc = subprocess.run(
        [str(BIN / "rexnet-serve"), "--model-dir", str(model), "--http-port", str(free_port()),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{model.resolve() / PARAMS}: sha256 differs" in proc.stderr
    assert "ready:" not in proc.stderr
