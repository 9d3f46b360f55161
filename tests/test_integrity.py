"""Exports that cannot be served damaged: manifest.json records the size and sha256 of every file and a
digest of its own content; every loader calls integrity.verify_files first and refuses with the file
named (same-size corruption, a missing file, a hand-edited manifest, an export from before digests)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from rexnet_serving.integrity import file_sha256, verify_files
from rexnet_serving.manifest import CONTENT_KEY, MANIFEST_FILE, IntegrityError, content_digest, load_manifest

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
    from rexnet_serving.runtimes.paddle import InferenceModel
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


# -- every path the manifest names: relative, inside the export (symlinks resolved), listed --------------
def rewrite_manifest(model: Path, change) -> None:
    """A hostile edit that also recomputes content_sha256 (it is a digest, not a signature)."""
    path = model / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    data[CONTENT_KEY] = content_digest(data)
    path.write_text(json.dumps(data, indent=2))


def outside_copy(model: Path, tmp_path: Path, name: str = "inference") -> Path:
    """A copy of the export's ``name`` directory outside the export (a loader must never open it)."""
    return Path(shutil.copytree(model / name, tmp_path / "elsewhere" / name))


@pytest.mark.parametrize("key, value, message", [
    ("files", "../outside", r"files: '\.\./outside' is not a relative path inside the export"),
    ("files", "/etc/passwd", r"files: '/etc/passwd' is not a relative path"),
    ("paths.inference", "/tmp/elsewhere/inference", r"paths\.inference: '/tmp/elsewhere/inference' is not a "
                                                     "relative path"),
    ("paths.serving_server", "../serving_server", r"paths\.serving_server: '\.\./serving_server' is not"),
    ("paths.inference", "inference/../inference", r"paths\.inference: 'inference/\.\./inference' is not"),
    ("paths.inference", "./inference", r"paths\.inference: '\./inference' is not"),
    ("labels_file", "/etc/hostname", r"labels_file: '/etc/hostname' is not a relative path"),
    ("labels_file", "../labels.txt", r"labels_file: '\.\./labels\.txt' is not a relative path"),
])
def test_absolute_and_dotdot_paths_are_refused(model: Path, key: str, value: str, message: str) -> None:
    def change(data):
        if key == "files":
            data["files"][value] = {"size": 1, "sha256": "0" * 64}
        elif key.startswith("paths."):
            data["paths"][key.split(".", 1)[1]] = value
        else:
            data[key] = value
    rewrite_manifest(model, change)
    with pytest.raises(ValueError, match=message):
        load_manifest(model)
    with pytest.raises(ValueError, match=message):
        verify_files(model)


def test_manifest_listing_only_labels_with_inference_outside_is_refused(model: Path, tmp_path: Path) -> None:
    """The reported hole: only labels.txt listed, paths.inference outside the export; passed before."""
    outside = outside_copy(model, tmp_path)
    rewrite_manifest(model, lambda data: (data.update(files={"labels.txt": data["files"]["labels.txt"]}),
                                          data["paths"].update(inference=str(outside))))
    with pytest.raises(ValueError, match=f"paths.inference: '{outside}' is not a relative path"):
        verify_files(model)
    # Relative this time, still unlisted: refused for the listing.
    shutil.copytree(outside, model / "other")
    rewrite_manifest(model, lambda data: data["paths"].update(inference="other"))
    with pytest.raises(ValueError, match=r"paths\.inference: 'other/inference\.pdmodel' is not listed in files"):
        verify_files(model)


@pytest.mark.parametrize("key, name", [
    ("labels_file", "labels.txt"),
    ("paths.serving_server", "serving_server/serving_server_conf.prototxt"),
    ("paths.serving_client", "serving_client/serving_client_conf.prototxt"),
    ("paths.inference", PARAMS),
])
def test_files_a_runtime_opens_must_be_listed(model: Path, key: str, name: str) -> None:
    rewrite_manifest(model, lambda data: data["files"].pop(name))
    with pytest.raises(ValueError, match=f"{key}.*'{name}' is not listed in files"):
        verify_files(model)


def test_unlisted_file_in_a_loaded_directory_is_refused(model: Path) -> None:
    """LocalPredictor globs *.pdmodel and the C++ engine takes the first model file it finds, so an
    unlisted file in serving_server/ could be what is loaded."""
    extra = model / "serving_server" / "a.pdmodel"
    shutil.copy(model / "inference" / "inference.pdmodel", extra)
    with pytest.raises(IntegrityError, match=f"{extra}: not listed in .*paths.serving_server"):
        verify_files(model)
    extra.unlink()
    (model / "inference" / "sub").mkdir()
    (model / "inference" / "sub" / "x.pdiparams").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"inference/sub/x\.pdiparams: not listed .*paths\.inference"):
        verify_files(model)
    shutil.rmtree(model / "inference" / "sub")
    (model / "notes.txt").write_text("beside the export, loaded by nothing")
    verify_files(model)


def test_symlinked_file_out_of_the_export_is_refused(model: Path, tmp_path: Path) -> None:
    """Same bytes, so the digest alone would pass: the link leaves the export."""
    outside = outside_copy(model, tmp_path)
    params = model / PARAMS
    params.unlink()
    params.symlink_to(outside / "inference.pdiparams")
    with pytest.raises(IntegrityError, match=f"{params}: files entry '{PARAMS}' resolves to "
                                             f"{outside.resolve()}/inference.pdiparams, outside the export"):
        verify_files(model)
    labels = model / "labels.txt"
    shutil.copy(labels, tmp_path / "labels.txt")
    labels.unlink()
    labels.symlink_to(tmp_path / "labels.txt")
    params.unlink()
    shutil.copy(outside / "inference.pdiparams", params)
    with pytest.raises(IntegrityError, match="labels.txt: files entry 'labels.txt' resolves to .*outside"):
        verify_files(model)


def test_symlinked_directory_out_of_the_export_is_refused(model: Path, tmp_path: Path) -> None:
    from rexnet_serving.brpc.cpp_backend import BackendError, model_serving_dir
    from rexnet_serving.runtimes.paddle import InferenceModel
    outside = outside_copy(model, tmp_path, "serving_server")
    shutil.rmtree(model / "serving_server")
    (model / "serving_server").symlink_to(outside, target_is_directory=True)
    message = "serving_server/.* resolves to .*, outside the export"
    with pytest.raises(IntegrityError, match=message):
        verify_files(model)
    with pytest.raises(BackendError, match=message):
        model_serving_dir(model)
    with pytest.raises(IntegrityError, match=message):
        InferenceModel(model)


def test_symlinked_subdirectory_out_of_a_loaded_directory_is_refused(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (model / "inference" / "more").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IntegrityError, match="a directory under paths.inference resolves to .*outside"):
        verify_files(model)


def test_symlinks_inside_the_export_are_followed_and_verified(model: Path) -> None:
    """A link that stays inside (say, a deduplicated copy) is fine: its target is what is hashed."""
    copy = model / "serving_server" / "inference.pdiparams"
    copy.unlink()
    copy.symlink_to(model / PARAMS)
    manifest = verify_files(model)
    assert manifest.file("serving_server/inference.pdiparams") == (model / PARAMS).resolve()
    flip_bytes(model / PARAMS)
    with pytest.raises(IntegrityError, match="sha256 differs"):
        verify_files(model)


def test_the_verified_manifest_gives_the_checked_paths(model: Path) -> None:
    """Runtimes open what verify_files resolved: the inference files, labels, serving dirs."""
    from rexnet_serving.brpc.cpp_backend import BackendError, model_serving_dir
    from rexnet_serving.classifier import Classifier
    from rexnet_serving.runtimes.base import model_files
    linked = model.parent / "linked_export"
    linked.symlink_to(model, target_is_directory=True)
    manifest = verify_files(linked)
    root = model.resolve()
    assert manifest.verified and not load_manifest(linked).verified
    assert model_files(manifest) == (root / "inference/inference.pdmodel", root / PARAMS)
    assert manifest.labels_path == root / "labels.txt"
    assert manifest.serving_server_dir == root / "serving_server" == model_serving_dir(linked)
    with pytest.raises(IntegrityError, match="not-listed.txt is not listed"):
        manifest.file("not-listed.txt")
    classifier = Classifier(linked)  # a real export still loads and classifies
    assert classifier.manifest.verified and len(classifier.labels) == classifier.class_num
    decoy = model / "serving_server_copy"  # beside the export's own: not what the manifest names
    decoy.mkdir()
    shutil.copy(model / "serving_server" / "serving_server_conf.prototxt", decoy)
    with pytest.raises(BackendError, match="not the serving_server of the export"):
        model_serving_dir(decoy)


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
