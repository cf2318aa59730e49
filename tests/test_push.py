"""`emoji-sd push`: everything up to the upload. What each repository would get (the export's files as its
manifest lists them, with a card for the repository; the dataset's rows, images and captions with its card),
and one line each when there is no token or no network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from huggingface_hub import DatasetCard, ModelCard
from served_data_dir import RUN, tiny_served_data_dir
from tiny_diffusion import one_torch_thread

from sd_core.diffusion.export import CARD, MANIFEST, verify_export
from sd_core.publish import served_model
from sd_core.publish.hub import PushError, hub_token, staged
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_metadata


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("served")
    return tiny_served_data_dir(root)


def test_what_the_model_and_dataset_repositories_would_get(served: Catalog) -> None:
    export = served_model(served)
    assert export == served.run_dir(RUN) / "model"
    manifest = verify_export(export)
    with staged(served, export, repo_id="someone/emoji-model", dataset_repo_id="someone/emoji-data") as uploads:
        model, dataset = uploads
        assert (model.repo_type, dataset.repo_type) == ("model", "dataset")
        assert model.files == sorted([MANIFEST, CARD, *manifest["files"]])
        for name in manifest["files"]:  # the very bytes of the export (hard links), not copies that could drift
            assert os.path.samefile(model.folder / name, export / name)
        card = ModelCard.load(model.folder / CARD)
        assert card.data.datasets == ["someone/emoji-data"] and card.data.pipeline_tag == "text-to-image"
        assert 'from_pretrained("someone/emoji-model")' in card.text
        assert (export / CARD).read_text("utf-8") != (model.folder / CARD).read_text("utf-8")  # export's own kept

        rows = read_metadata(served)
        images = {r["file_name"] for r in rows}
        assert set(dataset.files) == {"README.md", "metadata.csv", *images,
                                      *(n.removesuffix(".jpg") + ".txt" for n in images)}
        assert not any(f.startswith(("models/", "cache/", "state/", "samples/")) for f in dataset.files)
        dcard = DatasetCard.load(dataset.folder / CARD)
        assert dcard.data.task_categories == ["text-to-image"]
        assert 'load_dataset("someone/emoji-data", split="train")' in dcard.text
        staging = model.folder.parent
    assert not staging.exists()  # the staging folder goes when the push is done


def test_a_damaged_champion_and_bad_ids_are_refused(served: Catalog, tmp_path: Path) -> None:
    export = served_model(served)
    with pytest.raises(ValueError, match="--repo-id 'no-slash' is not a Hub repository id"):
        with staged(served, export, repo_id="no-slash"):
            pass
    with pytest.raises(ValueError, match="--dataset-repo-id 'a/b/c'"):
        with staged(served, export, repo_id="a/b", dataset_repo_id="a/b/c"):
            pass
    import shutil

    damaged = tmp_path / "model"
    shutil.copytree(export, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is damaged"):
        with staged(served, damaged, repo_id="a/b"):
            pass


def push_cli(data_dir: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "push", "--data-dir", str(data_dir),
                           "--repo-id", "someone/emoji-model", *extra], capture_output=True, text=True, timeout=180,
                          env=env)


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(Path(__file__).parents[1])}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_no_token_and_no_network_are_one_line_each(served: Catalog, tmp_path: Path, monkeypatch) -> None:
    env = clean_env(tmp_path)
    no_token = push_cli(served.root, env)
    assert no_token.returncode == 1 and len(no_token.stderr.splitlines()) == 1, no_token.stderr
    assert "no Hugging Face token" in no_token.stderr

    port = closed_port()
    offline = push_cli(served.root, {**env, "HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
                       "--dataset-repo-id", "someone/emoji-data")
    assert offline.returncode == 1 and len(offline.stderr.splitlines()) == 1, offline.stderr
    assert f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}" in offline.stderr
    assert not list(served.state_dir.glob(".push-*"))

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PushError, match="no Hugging Face token"):
        hub_token()


def test_dry_run_lists_the_uploads(served: Catalog, tmp_path: Path) -> None:
    r = push_cli(served.root, clean_env(tmp_path), "--dry-run", "--dataset-repo-id", "someone/emoji-data")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("model someone/emoji-model: ") and "README.md" in lines[0]
    assert lines[1].startswith(f"dataset someone/emoji-data: {1 + 1 + 2 * len(read_metadata(served))} files")
