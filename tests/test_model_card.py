"""The model card of an export and the dataset card: Hugging Face format (read back by huggingface_hub), the
figures they give are the data directory's and the eval stage's, the card lives outside the export's checksums,
and the code in the card loads the export and draws what emoji-sd draws."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image
from served_data_dir import RUN, VAL_FRACTION, tiny_served_data_dir
from tiny_diffusion import one_torch_thread

from sd_core.diffusion.card import model_card, write_model_card
from sd_core.diffusion.export import CARD, CARD_GRID, CARD_SAMPLES, MANIFEST, load_pipeline, model_digest, verify_export
from sd_core.diffusion.generate import generate
from sd_core.encode.pairs import split_ids
from sd_core.sample.config import SampleConfig
from sd_core.sample.stage import run_sampling
from sd_core.store.card import dataset_card, write_dataset_card
from sd_core.store.catalog import Catalog
from sd_core.store.files import read_json
from sd_core.store.metadata import read_metadata


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("served")
    return tiny_served_data_dir(root)


def card_code(text: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return code


def run_card_code(code: str, cwd: Path) -> Image.Image:
    """Run the card's snippet as a user would (in a fresh namespace, in ``cwd``); the image it saved."""
    before = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "__card__"})  # noqa: S102
    finally:
        os.chdir(before)
    return Image.open(cwd / "emoji.png").convert("RGB")


def same_picture(a: Image.Image, b: Image.Image) -> bool:
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return a.size == b.size and diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_scratch_card_reads_back_with_the_runs_figures(served: Catalog) -> None:
    export = served.run_dir(RUN) / "model"
    card = ModelCard.load(export / CARD)
    data = card.data
    assert (data.license, data.pipeline_tag, data.library_name) == ("other", "text-to-image", "diffusers")
    assert {"emoji", "emoji-sd", "text-to-image"} <= set(data.tags) and data.base_model is None
    assert data.datasets is None  # no Hub dataset named yet (push adds it)
    text = card.text
    rows = read_metadata(served)
    _, held = split_ids([r["md5"] for r in rows], VAL_FRACTION, 42)
    assert f"{len(rows)} images, {len(rows) - len(held)} trained on and {len(held)} held out" in text
    assert "tag(s) `Blobs` on http://127.0.0.1:8765" in text and "offline (16 images)" in text
    assert "| learning rate | 0.001 → 0.0001" in text and "| steps trained | 3 |" in text
    scores = read_json(served.eval_json(served.run_dir(RUN)))["scores"]
    row = next(line for line in text.splitlines() if line.startswith("| `prompt_following` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == [f"{scores[k]:.4g}" for k in ("prompt_following", "prompt_following_g0",
                                                        "prompt_following_real", "prompt_following_vae")]
    assert f"| `held_out_loss` | {scores['held_out_loss']:.4g} |" in text
    assert "Decision: **promoted**" in text and "`fid` (not configured" in text
    assert model_digest(export) in text


def test_the_card_is_outside_the_checksums(served: Catalog) -> None:
    export = served.run_dir(RUN) / "model"
    manifest = verify_export(export)
    assert CARD not in manifest["files"] and (export / CARD).exists()
    digest = model_digest(export)
    assert read_json(served.current_json)["digest"] == digest  # written by the eval stage, before the card
    write_model_card(export, catalog=served)
    (export / CARD).write_text("edited by hand\n")
    assert verify_export(export) and model_digest(export) == digest
    write_model_card(export, catalog=served)


def test_scratch_card_code_loads_the_export_and_draws_what_emoji_sd_draws(served: Catalog, tmp_path: Path) -> None:
    export = served.run_dir(RUN) / "model"
    code = card_code((export / CARD).read_text("utf-8"))
    assert f'from_pretrained("{export.resolve()}")' in code
    image = run_card_code(code, tmp_path)
    prompt = re.search(r'^prompt = (".*")$', code, flags=re.M).group(1)
    ours = generate(load_pipeline(export), [json.loads(prompt)], [0], guidance_scale=7.5, steps=30)[0][0]
    assert image.size == (64, 64) and same_picture(image, ours)
    held = [r["prompt"] for r in read_metadata(served)]
    assert json.loads(prompt) in held  # a caption of the data, not an example prompt


def test_sampling_adds_the_grid_and_its_settings_to_the_card(served: Catalog) -> None:
    export = served.run_dir(RUN) / "model"
    summary = run_sampling(SampleConfig(steps=2, images_per_prompt=2, guidance_sweep=(), held_out_prompts=2), served)
    assert summary["status"] == "ran" and summary["prompts"] == 2
    assert (export / CARD_GRID).read_bytes() == (served.samples_dir / "grid.png").read_bytes()
    about = read_json(export / CARD_SAMPLES)
    assert [i["seed"] for i in about["images"]] == [0, 1, 0, 1]
    text = (export / CARD).read_text("utf-8")
    assert f"![samples]({CARD_GRID})" in text and "columns: seeds 0…1" in text and "2 ddim steps" in text
    assert verify_export(export)["files"].keys().isdisjoint({CARD, CARD_GRID, CARD_SAMPLES})
    # its load snippet draws the grid's first prompt
    assert json.dumps(about["images"][0]["prompt"]) in card_code(text)


def test_card_for_a_hub_repository_names_it_and_its_dataset(served: Catalog, tmp_path: Path) -> None:
    export = served.run_dir(RUN) / "model"
    card = model_card(export, catalog=served, repo_id="someone/emoji-model", dataset_repo_id="someone/emoji-data")
    path = tmp_path / CARD
    card.save(path)
    back = ModelCard.load(path)
    assert back.data.datasets == ["someone/emoji-data"]
    assert 'from_pretrained("someone/emoji-model")' in back.text and "# emoji-model" in back.text
    assert "[someone/emoji-data](https://huggingface.co/datasets/someone/emoji-data)" in back.text


def test_dataset_card_is_read_back_by_datasetcard(served: Catalog, tmp_path: Path) -> None:
    copy = Catalog(tmp_path / "data")
    shutil.copytree(served.root, copy.root, ignore=shutil.ignore_patterns("models", "samples"))
    copy.dataset_card.unlink(missing_ok=True)
    assert write_dataset_card(copy, captioner="emoji-sd's offline template captioner")
    card = DatasetCard.load(copy.dataset_card)
    assert card.data.license == "other" and card.data.task_categories == ["text-to-image"]
    assert card.data.size_categories == ["n<1K"] and card.data.pretty_name == "Blobs emoji from http://127.0.0.1:8765"
    assert card.data.configs[0]["data_files"][0]["path"] == ["metadata.csv", "images/*.jpg"]
    assert "**Images**: 16 unique images" in card.text and "Rows per\n  captioner (metadata.csv's `captioner`): offline: 16" in card.text
    assert 'load_dataset("imagefolder", data_dir=' in card.text
    hub = DatasetCard(dataset_card(copy, repo_id="someone/emoji-data"))
    assert 'load_dataset("someone/emoji-data", split="train")' in hub.text


def test_fine_tune_cards_load_as_they_say(tiny_sd: Path, tmp_path: Path) -> None:
    """The attn2 and LoRA exports' cards: their code, run as it is, draws what emoji-sd's loader draws."""
    from test_finetune import finetune

    for kind in ("pretrained_attn2", "pretrained_attn2_lora"):
        extra = {"lora": {"rank": 4, "alpha": 4}} if kind.endswith("lora") else {}
        export = finetune(tiny_sd, tmp_path / kind, kind, **extra).out_dir / "model"
        write_model_card(export)
        card = ModelCard.load(export / CARD)
        assert card.data.base_model is None  # a local folder is no Hub id; a hub base is named (below)
        assert ("lora" in card.data.tags) == kind.endswith("lora")
        work = tmp_path / f"{kind}-run"
        work.mkdir()
        image = run_card_code(card_code(card.text), work)
        prompt = json.loads(re.search(r'^prompt = (".*")$', card.text, flags=re.M).group(1))
        ours = generate(load_pipeline(export), [prompt], [0], guidance_scale=7.5, steps=30)[0][0]
        assert same_picture(image, ours), kind
    hub = tmp_path / "hub-base"
    shutil.copytree(export, hub)
    manifest = json.loads((hub / MANIFEST).read_text())
    (hub / MANIFEST).write_text(json.dumps({**manifest, "base_model": "CompVis/stable-diffusion-v1-4"}))
    card = model_card(hub, repo_id="someone/emoji-lora")
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4"
    assert 'pipe.load_lora_weights("someone/emoji-lora"' in card.text
