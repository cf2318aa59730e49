"""The eval stage: prompt following that reads images back with the captioner (honest at both ends: real
images score 100 %, noise scores chance), distribution scores where weights exist, and promotion: a worse
refresh never replaces the champion unless forced."""

from __future__ import annotations

import html
import io
import json

import numpy as np
import pytest
from PIL import Image

from sd_core.caption.offline import OfflineCaptioner
from sd_core.demo.emoji_art import build_demo_items
from sd_core.eval.attributes import PIXEL_ATTRIBUTES, agree, chance_rate, follow_rate, parse_attributes
from sd_core.eval.config import EvalConfig
from sd_core.eval.stage import compare, promotion_rules
from sd_core.ingest.convert import ConvertConfig, to_rgb_jpeg

CAPTION = ("Frog emoji with a round head, simple eyes, plain mouth, neutral expression, green skin color, "
           "no action, with a white background.")


def demo_images(n: int) -> tuple[list[Image.Image], list[str]]:
    items = build_demo_items(n, seed=2)
    images = [Image.open(io.BytesIO(to_rgb_jpeg(it.body, ConvertConfig()).jpeg)).convert("RGB") for it in items]
    return images, [it.title for it in items]


def test_attributes_are_read_back_from_the_template() -> None:
    a = parse_attributes(CAPTION)
    assert a == {"head shape": "round head", "eyes": "simple", "mouth": "plain", "expression": "neutral",
                 "skin color": "green", "background": "white"}
    assert parse_attributes("a frog") == {}
    assert agree("round head", "round") and agree("green", "light green") and not agree("green", "yellow")


def test_real_images_score_100_and_noise_scores_chance() -> None:
    images, titles = demo_images(60)
    captioner = OfflineCaptioner()
    prompts = captioner.caption(images, titles)  # what the caption stage wrote
    real = follow_rate(prompts, captioner.caption(images, titles), PIXEL_ATTRIBUTES)
    assert real == {**{a: 1.0 for a in PIXEL_ATTRIBUTES}, "all": 1.0}
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in images]
    noisy = follow_rate(prompts, captioner.caption(noise, titles), PIXEL_ATTRIBUTES)
    chance = chance_rate(prompts, PIXEL_ATTRIBUTES)
    print(f"noise images: {noisy['all']:.3f}, chance level {chance:.3f}")
    assert noisy["all"] <= chance + 0.1 and noisy["all"] < 0.5


def test_promotion_rule() -> None:
    champion = {"prompt_following": 0.60, "held_out_loss": 0.120}
    tol = {"prompt_following": 0.05, "held_out_loss": 0.03}
    assert compare({"prompt_following": 0.56, "held_out_loss": 0.123}, champion, tol) == []
    worse = compare({"prompt_following": 0.50, "held_out_loss": 0.200}, champion, tol)
    assert len(worse) == 2 and worse[0].startswith("prompt_following 0.5 vs champion 0.6")
    assert compare({"prompt_following": 0.9}, champion, tol) == []  # a score one side lacks cannot decide
    with pytest.raises(ValueError, match="unknown scores"):
        EvalConfig(promote_if={"beauty": 0.1})
    # a v-prediction run's held-out loss is a v-MSE: against an ε champion only the other scores decide
    v_run = {"prediction_type": "v_prediction", "scores": {"prompt_following": 0.62, "held_out_loss": 0.600}}
    eps_champion = {"scores": champion}  # recorded before v-prediction existed: ε
    rules, note = promotion_rules(tol, v_run, eps_champion)
    assert rules == {"prompt_following": 0.05} and "held_out_loss not compared" in note
    assert compare(v_run["scores"], champion, rules) == [] and len(compare(v_run["scores"], champion, tol)) == 1
    assert promotion_rules(tol, {**v_run, "prediction_type": "epsilon"}, eps_champion) == (tol, "")
    # the same between two models whose latents or prompt embeddings come from another VAE or text encoder
    a, b = ({"held_out_basis": x, "scores": {"prompt_following": 0.6, "held_out_loss": 0.1}} for x in "ab")
    rules, note = promotion_rules(tol, a, b)
    assert rules == {"prompt_following": 0.05} and "another VAE, text encoder or noise schedule" in note
    assert promotion_rules(tol, a, {**b, "held_out_basis": "a"}) == (tol, "")


def test_distribution_scores_with_a_tiny_clip(tmp_path) -> None:
    """FID, KID and CLIP score through torchmetrics with a tiny CLIP built from a config and saved like a hub repo."""
    from tiny_models import _tiny_clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sd_core.eval.distribution import distribution_scores, weights_reachable

    tok = _tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16), projection_dim=16)
    folder = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tok
                  ).save_pretrained(folder)
    assert weights_reachable(str(folder)) is None
    images, titles = demo_images(12)
    cfg = EvalConfig(features=str(folder), clip_model=str(folder))
    scores, skipped = distribution_scores(cfg, lambda: images[:6], images[6:], [CAPTION] * 6)
    assert skipped == {} and set(scores) == {"fid", "kid", "clip_score"}
    assert all(np.isfinite(v) for v in scores.values()) and scores["fid"] > 0
    same, _ = distribution_scores(cfg, lambda: images[:6], images[:6], [CAPTION] * 6)
    assert same["fid"] < scores["fid"]  # a set against itself is closer than against other emoji
    off, why = distribution_scores(EvalConfig(features=None, clip_model=str(tmp_path / "missing")), lambda: [], [],
                                   [])
    assert off == {} and why["fid"].startswith("not configured") and "cannot be reached" in why["clip_score"]


def test_worse_refresh_is_rejected_and_sampling_keeps_the_champion(tmp_path, prefect_harness):
    from test_pipeline import by_stage, config

    from flows.pipeline import pipeline
    from sd_core.demo.site import DemoSite
    from sd_core.diffusion.champion import champion_run, served_model
    from sd_core.eval.stage import eval_set, evaluate, read_history
    from sd_core.store.catalog import Catalog

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(40, seed=9), per_page=12) as site:
        def run(*sets: str, **kw):
            return by_stage(pipeline(config(site, tmp_path, "train.steps=30", "eval.items=6", *sets),
                                     progress=False, **kw))

        first = run()
        assert first["eval"].status == "ran" and first["eval"].summary["decision"] == "promoted"
        champion = champion_run(cat)
        assert champion == cat.latest_run() and served_model(cat) == champion / "model"
        assert (champion / "scores" / "grid.png").exists() and cat.eval_json(champion).exists()
        # the real held-out images are also read after a round trip through the model's VAE (the UNet's ceiling)
        scored = json.loads(cat.eval_json(champion).read_text())
        assert 0 <= scored["scores"]["prompt_following_vae"] <= scored["scores"]["prompt_following_real"] == 1.0
        assert set(scored["per_attribute"]["skin color"]) == {"guided", "g0", "real", "vae"}
        assert "through the model's VAE" in html.unescape(cat.report_html.read_text())

        again = run(start="eval")
        assert again["eval"].status == "reused" and again["sample"].status == "reused"

        # a deliberately worse refresh: another seed, 2 steps (a new run, trained from scratch)
        worse = run("train.steps=2", "train.seed=1", start="train")
        e = worse["eval"].summary
        assert worse["train"].status == "ran" and e["decision"] == "rejected", e
        assert "held_out_loss" in e["reason"] and cat.latest_run() != champion
        assert champion_run(cat) == champion and served_model(cat) == champion / "model"
        assert worse["sample"].status == "reused"  # still the champion's samples
        samples = json.loads((cat.samples_dir / "samples_key.json").read_text())
        assert samples["model"] == str(champion / "model")
        rejected = cat.latest_run()
        verdict = json.loads(cat.eval_json(rejected).read_text())
        assert verdict["status"] == "rejected" and verdict["champion_scores"]["held_out_loss"] < \
            verdict["scores"]["held_out_loss"]
        assert "rejected" in cat.report_html.read_text()

        # --promote forces it
        forced = run("train.steps=2", "train.seed=1", start="eval", force=["eval"], promote=True)
        assert forced["eval"].summary["decision"] == "promoted" and "forced" in forced["eval"].summary["reason"]
        assert champion_run(cat) == rejected and forced["sample"].status == "ran"

        # a new VAE: the next run's latents live in another space, so held-out losses no longer compare; each
        # model is still scored in its own space (the champion's loss, scored again now, is what it was)
        revae = run("train.steps=2", "train.seed=1", "vae.steps=26", start="vae")
        assert revae["vae"].status == "ran" and revae["encode"].status == "ran"
        assert "held_out_loss not compared: the champion has another VAE" in revae["eval"].summary["reason"]
        cfg = config(site, tmp_path, "train.steps=2", "train.seed=1", "vae.steps=26", "eval.items=6")
        items = eval_set(cat, cfg.eval, cfg.train.val_fraction, cfg.train.split_seed)
        again = evaluate(rejected / "model", cfg=cfg.eval, captioner_cfg=cfg.caption, catalog=cat, items=items)
        assert again["scores"]["held_out_loss"] == pytest.approx(verdict["scores"]["held_out_loss"], rel=1e-5)

    history = read_history(cat)
    assert [r["status"] for r in history][:3] == ["promoted", "rejected", "promoted"] and len(history) == 4
    assert all(float(r["held_out_loss"]) > 0 for r in history)
    assert (cat.eval_history_csv.with_suffix(".png")).exists()
