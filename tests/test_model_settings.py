"""Per-model settings (settings.yaml beside a model's versions): typed, checked with the file and key
named, found by the repository scan, outside the hashed export folders."""
from __future__ import annotations

from pathlib import Path

import pytest

from rexnet_serving.model_settings import SETTINGS_FILE, ModelSettings, ModelSettingsError, read_model_settings
from rexnet_serving.repository import RepositoryError, scan_repository


def settings_in(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SETTINGS_FILE).write_text(text)
    return directory


def test_no_file_means_the_service_settings(tmp_path):
    settings = read_model_settings(tmp_path)
    assert settings == ModelSettings() and settings.overrides() == {} and settings.describe() == ""


def test_the_keys_set_override_and_are_described(tmp_path):
    settings = read_model_settings(settings_in(tmp_path / "m", "runtime: paddle\nmax_batch_images: 4\n"))
    assert (settings.runtime, settings.max_batch_images, settings.precision, settings.thread_num) == ("paddle", 4, None, None)
    assert settings.overrides() == {"runtime": "paddle", "max_batch_images": 4}
    assert settings.describe() == f"runtime paddle, max_batch_images 4 from {tmp_path / 'm' / SETTINGS_FILE}"


@pytest.mark.parametrize("text, message", [
    ("runtim: paddle\n", "unknown key 'runtim' (known: runtime, precision, max_batch_images, thread_num)"),
    ("runtime: onnxruntime\n", "runtime must be paddle or openvino, got 'onnxruntime'"),
    ("precision: int8\n", "precision must be fp32 or fp16 or bf16"),
    ("max_batch_images: 0\n", "max_batch_images must be 1..1024 images per forward pass, got 0"),
    ("thread_num: true\n", "thread_num must be 1..256 threads, got True"),
    ("thread_num: '2'\n", "thread_num must be 1..256 threads, got '2'"),
    ("- runtime\n", "the file must be a mapping of settings, got list"),
    ("runtime: [paddle\n", "cannot read it as YAML"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    directory = settings_in(tmp_path / "m", text)
    with pytest.raises(ModelSettingsError) as info:
        read_model_settings(directory)
    assert str(directory / SETTINGS_FILE) in str(info.value) and message in str(info.value)


def test_the_scan_reads_each_models_settings(scored_model_dir, tmp_path):
    root = tmp_path / "repo"
    (root / "a").mkdir(parents=True)
    (root / "a" / "2").symlink_to(scored_model_dir, target_is_directory=True)
    settings_in(root / "a", "runtime: paddle\nthread_num: 1\n")
    (root / "b").symlink_to(scored_model_dir, target_is_directory=True)  # an export itself, no settings
    repository = scan_repository(root)
    assert repository.model("a").settings.overrides() == {"runtime": "paddle", "thread_num": 1}
    assert repository.model("b").settings == ModelSettings()
    settings_in(root / "a", "batch_size: 4\n")
    with pytest.raises(RepositoryError, match=r"a/settings.yaml: unknown key 'batch_size'"):
        scan_repository(root)
