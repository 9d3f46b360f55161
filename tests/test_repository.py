"""rexnet_serving.repository: the model repository layout (Triton's, with exports as model files),
scanned over real exports (linked into place), and its errors for empty or malformed repositories."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rexnet_serving.repository import RepositoryError, scan_repository


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return root


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=True)
    return path


def test_models_and_versions(repo: Path, random_model_dir: Path, scored_model_dir: Path) -> None:
    link(repo / "small", random_model_dir)
    for version in ("1", "2", "10"):
        link(repo / "tuned" / version, scored_model_dir)
    (repo / "README.md").write_text("not a model")
    (repo / ".small.tmp-123").mkdir()          # rexnet-export's staging directory
    (repo / "tuned" / ".cache").mkdir()
    found = scan_repository(repo)
    assert sorted(found.models) == ["small", "tuned"] and found.default_model == "small"
    assert found.models["small"].served == (1,) and found.models["small"].latest.manifest.class_num == 1000
    tuned = found.model("tuned")
    assert sorted(tuned.versions) == [1, 2, 10] and tuned.served == (10,)
    assert tuned.latest.path == repo / "tuned" / "10" and tuned.latest.manifest.class_num == 10
    both = scan_repository(repo, versions={"tuned": [1, 10]}, default_model="tuned")
    assert both.models["tuned"].served == (10, 1) and both.model().name == "tuned"
    with pytest.raises(KeyError, match="unknown model 'big': this repository serves small, tuned"):
        both.model("big")


def test_a_plain_export_is_one_model(tmp_path: Path, random_model_dir: Path) -> None:
    found = scan_repository(link(tmp_path / "ReXNet_1_0", random_model_dir))
    assert list(found.models) == ["ReXNet_1_0"] and found.models["ReXNet_1_0"].served == (1,)
    assert list(scan_repository(tmp_path / "ReXNet_1_0", export_name="rexnet").models) == ["rexnet"]


def test_errors_name_the_problem(repo: Path, random_model_dir: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        scan_repository(repo / "nowhere")
    with pytest.raises(RepositoryError, match=f"{repo} holds no models"):
        scan_repository(repo)
    link(repo / "good", random_model_dir)
    (repo / "empty").mkdir()
    with pytest.raises(RepositoryError, match=f"{repo / 'empty'}: neither an export"):
        scan_repository(repo)
    (repo / "empty" / "latest").mkdir()
    with pytest.raises(RepositoryError, match="latest: inside the model directory .*named 1, 2, 3"):
        scan_repository(repo)
    (repo / "empty" / "latest").rmdir()
    (repo / "empty" / "1").mkdir()
    with pytest.raises(RepositoryError, match="version 1 of empty has no manifest.json"):
        scan_repository(repo)
    (repo / "empty" / "1").rmdir()
    (repo / "empty").rmdir()
    with pytest.raises(RepositoryError, match=r"version\(s\) 3 configured but not found \(it has 1\)"):
        scan_repository(repo, versions={"good": [3]})
    with pytest.raises(RepositoryError, match="versions configured for unknown model"):
        scan_repository(repo, versions={"bad": [1]})
    with pytest.raises(RepositoryError, match="default model 'bad' is not in"):
        scan_repository(repo, default_model="bad")
    (repo / "bad name").mkdir()
    with pytest.raises(RepositoryError, match="not a usable model name"):
        scan_repository(repo)


def test_malformed_manifest_is_reported(repo: Path) -> None:
    (repo / "broken").mkdir()
    (repo / "broken" / "manifest.json").write_text(json.dumps({"arch": "ReXNet_1_0"}))
    with pytest.raises(RepositoryError, match=r"broken/manifest.json: missing key"):
        scan_repository(repo)

