"""The eval stage: prompt following that reads images back with the captioner (honest at both ends: real
images score 100 %, noise scores chance), distribution scores where weights exist, and promotion: a worse
refresh never replaces the champion unless forced."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_core.caption.offline import OfflineCaptioner
from sd_core.demo.emoji_art import build_demo_items
from sd_core.config import ConfigError, config_to_toml, load_config
from sd_core.encode.pairs import split_ids, split_marker
from sd_core.eval.attributes import (
    PIXEL_ATTRIBUTES,
    agree,
    attribute_values,
    chance_rate,
    follow_rate,
    parse_attributes,
    varying_attributes,
)
from sd_core.eval.bootstrap import Readings, intervals, point_scores
from sd_core.eval.config import EvalConfig, PromoteIf
from sd_core.eval.gate import compare
from sd_core.eval.stage import promotion_rules
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


def test_kappa_counts_agreement_beyond_the_readings_own_chance() -> None:
    """Fixed numbers: 4 items asking red, red, green, blue, one image each."""
    asked = {"skin color": ["red", "red", "green", "blue"]}

    def stats(read: list[str | None]) -> dict[str, float]:
        r = Readings(asked, {"guided": {"skin color": [[v] for v in read]}})
        return point_scores(r, ["skin color"])[1]["skin color"]["guided"]

    # every reading right: p_o 1, chance Σ P_asked·P_read = .5·.5 + .25·.25 + .25·.25 = .375, κ 1
    assert stats(["red", "red", "green", "blue"]) == pytest.approx({"agreement": 1, "chance": .375, "kappa": 1})
    # a model that always draws red agrees half the time, all of it chance: κ 0 (the white-background effect)
    assert stats(["red"] * 4) == pytest.approx({"agreement": .5, "chance": .5, "kappa": 0})
    # 3 of 4 right, one red read as green: p_o .75, P_read (.25 red, .5 green, .25 blue), chance .3125
    assert stats(["red", "green", "green", "blue"]) == pytest.approx(
        {"agreement": .75, "chance": .3125, "kappa": (.75 - .3125) / (1 - .3125)})
    # a reading that states nothing never agrees, and counts in the readings' distribution
    assert stats([None, "red", "green", "blue"])["agreement"] == .75
    # agreement is a shared content word, in the chance term too ('light green' agrees with 'green')
    assert stats(["red", "red", "light green", "blue"]) == pytest.approx({"agreement": 1, "chance": .375, "kappa": 1})
    # undefined when chance is 1 (every asked and read value the same)
    only = Readings({"background": ["white"] * 3}, {"guided": {"background": [["white"]] * 3}})
    assert point_scores(only, ["background"])[1]["background"]["guided"]["kappa"] is None


def test_headline_counts_only_the_attributes_that_vary() -> None:
    captioner = OfflineCaptioner()
    images, titles = demo_images(60)
    prompts = captioner.caption(images, titles)
    asked = attribute_values(prompts, PIXEL_ATTRIBUTES)
    varying, top = varying_attributes(asked, 0.9)
    assert top["background"] >= 0.9 and "background" not in varying  # nearly every demo emoji is on white
    assert "skin color" in varying and top["skin color"] < 0.5
    # the real images read back: κ 1 on every varying attribute; pure noise: κ near 0, where the raw share
    # still credits the white backgrounds it happens to read
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in images]
    read = {name: {a: [[v] for v in vals] for a, vals in attribute_values(texts, PIXEL_ATTRIBUTES).items()}
            for name, texts in (("real", prompts), ("guided", captioner.caption(noise, titles)))}
    scores, table = point_scores(Readings(asked, read), varying)
    assert scores["prompt_kappa_real"] == 1.0 and abs(scores["prompt_kappa"]) < 0.1
    assert all(table[a]["real"]["kappa"] == 1.0 for a in varying)


def _result(asked: dict, guided: list[list[str]], loss: list[float], *, items: int) -> dict:
    """An evaluation result as evaluate() writes it, from readings of one attribute."""
    r = Readings(asked, {"guided": {"skin color": guided}, "g0": {"skin color": [["yellow"] * 2] * items}}, loss)
    scores, table = point_scores(r, ["skin color"])
    return {"scores": scores, "varying": {"attributes": ["skin color"]},
            "paired": {"items": list(range(items)), "seeds": [0, 1], "seed_stride": 2, **r.to_json()}}


def test_promotion_rejects_only_what_is_worse_at_the_confidence() -> None:
    colours = ["red", "green", "blue", "yellow"]
    rng = np.random.default_rng(1)
    n = 48
    asked = {"skin color": [colours[i % 4] for i in range(n)]}

    hard = 0.05 * rng.standard_normal(n)  # how hard each held-out item is, for every model alike

    def run(follows: float, loss: float) -> dict:  # a model reads back its prompt with probability `follows`
        guided = [[v if rng.random() < follows else str(rng.choice(colours)) for _ in range(2)]
                  for v in asked["skin color"]]
        return _result(asked, guided, list(loss + hard + 0.003 * rng.standard_normal(n)), items=n)

    gate = PromoteIf()
    assert gate.confidence == 0.9 and set(gate.scores) == {"prompt_kappa", "held_out_loss"}
    champion = run(0.6, 0.20)
    judge = lambda new, rules=gate.scores: compare(new, champion, rules, confidence=0.9, replicates=1000)  # noqa: E731
    # the same model again (other sampling noise): never worse at 90 % in 20 tries
    same = [judge(run(0.6, 0.20)) for _ in range(20)]
    assert not any(v.worse for v in same), [v.worse for v in same if v.worse]
    # a model that ignores its prompts, and one whose loss is 10 % higher on every item: rejected, and why
    blind = judge(run(0.0, 0.20))
    assert len(blind.worse) == 1 and blind.worse[0].startswith("prompt_kappa") and "90 % interval" in blind.worse[0]
    lossy = judge({**champion, "paired": {**champion["paired"], "loss": [x * 1.1 for x in champion["paired"]["loss"]]},
                   "scores": {**champion["scores"], "held_out_loss": champion["scores"]["held_out_loss"] * 1.1}})
    assert len(lossy.worse) == 1 and lossy.worse[0].startswith("held_out_loss")
    lo, hi = lossy.differences["held_out_loss"]["interval"]
    assert lo == pytest.approx(hi, rel=0.2) and lo > 0.01
    # itself: every difference 0, the interval [0, 0]
    assert judge(champion).differences["prompt_kappa"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    # a score one side lacks cannot decide; one without an interval is compared by value and margin
    assert judge({**champion, "scores": {"prompt_kappa": 0.0}}, {"fid": 0.1}).worse == []
    with_fid = judge({**champion, "scores": {**champion["scores"], "fid": 30.0}}, {"fid": 0.1})
    assert with_fid.worse == []  # the champion has no fid
    champion["scores"]["fid"] = 20.0
    assert "no interval" in judge({**champion, "scores": {**champion["scores"], "fid": 30.0}}, {"fid": 0.1}).worse[0]


def test_held_out_loss_decides_only_between_comparable_models() -> None:
    tol = {"prompt_kappa": 0.05, "held_out_loss": 0.01}
    champion = {"prompt_kappa": 0.60, "held_out_loss": 0.120}
    # a v-prediction run's held-out loss is a v-MSE: against an ε champion only the other scores decide
    v_run = {"prediction_type": "v_prediction", "scores": {"prompt_kappa": 0.62, "held_out_loss": 0.600}}
    eps_champion = {"scores": champion}  # recorded before v-prediction existed: ε
    rules, note = promotion_rules(tol, v_run, eps_champion)
    assert rules == {"prompt_kappa": 0.05} and "held_out_loss not compared" in note
    assert promotion_rules(tol, {**v_run, "prediction_type": "epsilon"}, eps_champion) == (tol, "")
    # the same between two models whose latents or prompt embeddings come from another VAE or text encoder
    a, b = ({"held_out_basis": x, "scores": {"prompt_kappa": 0.6, "held_out_loss": 0.1}} for x in "ab")
    rules, note = promotion_rules(tol, a, b)
    assert rules == {"prompt_kappa": 0.05} and "another VAE, text encoder or noise schedule" in note
    assert promotion_rules(tol, a, {**b, "held_out_basis": "a"}) == (tol, "")


def test_promote_if_config() -> None:
    # the form before intervals still loads: those scores, with those margins, at the default confidence
    old = EvalConfig(promote_if={"prompt_following": 0.05, "held_out_loss": 0.03})
    assert old.promote_if == PromoteIf(confidence=0.9, scores={"prompt_following": 0.05, "held_out_loss": 0.03})
    with pytest.raises(ValueError, match="unknown scores"):
        EvalConfig(promote_if={"beauty": 0.1})
    with pytest.raises(ConfigError, match="eval.promote_if.confidence"):
        load_config(sets=["eval.promote_if.confidence=1.5"])
    with pytest.raises(ConfigError, match="eval.promote_if.scores"):
        load_config(sets=["eval.promote_if.scores.prompt_kapa=0.1"])
    cfg = load_config(sets=["eval.promote_if.confidence=0.8"])
    assert cfg.eval.promote_if.confidence == 0.8 and cfg.eval.promote_if.scores == PromoteIf().scores
    # eval.min_items and train.val_min_items are one setting: the trainer makes the split the eval scores
    assert load_config().train.val_min_items == load_config().eval.min_items == 48
    assert load_config(sets=["eval.min_items=30"]).train.val_min_items == 30
    assert load_config(sets=["train.val_min_items=30"]).eval.min_items == 30
    with pytest.raises(ConfigError, match="eval.min_items .20. and train.val_min_items .30. differ"):
        load_config(sets=["eval.min_items=20", "train.val_min_items=30"])
    # what `emoji-sd config` prints loads back
    printed = tmp_toml(config_to_toml(load_config(sets=["eval.min_items=30"])))
    assert load_config(printed).eval == load_config(sets=["eval.min_items=30"]).eval


def tmp_toml(text: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "printed.toml"
    path.write_text(text)
    return path


def test_held_out_split_reaches_min_items_and_never_takes_a_trained_item() -> None:
    ids = [f"{i:032x}" for i in range(228)]
    plain = split_ids(ids, 0.1, 42)
    train, held = split_ids(ids, 0.1, 42, min_items=48)
    assert len(plain[1]) < 48 <= len(held) and set(plain[1]) <= set(held) and not set(train) & set(held)
    assert len(split_ids(ids[:40], 0.1, 42, min_items=48)[1]) <= 0.25 * 40 + 5  # a small set keeps ~3/4 to train
    # as the collection grows, a held-out item may move into training, a trained one never into held out
    before = set(ids[i] for i in split_ids(ids[:100], 0.1, 42, 48)[0])
    for n in (120, 228, 600):
        grown_train, grown_held = split_ids(ids[:n], 0.1, 42, 48)
        assert not before & {ids[i] for i in grown_held}
    # where the fraction already holds out min_items, the split (and so the run key) is what it was
    big = [f"{i:032x}" for i in range(2000)]
    assert split_ids(big, 0.1, 42, 48) == split_ids(big, 0.1, 42) and split_marker(big, 0.1, 42, 48) == {}
    assert split_marker(ids, 0.1, 42, 48) == {"held_out_items": len(held)} and split_marker(ids, 0.0, 42, 48) == {}


def test_history_rows_written_before_intervals_stay_readable(tmp_path) -> None:
    from sd_core.eval.stage import HISTORY_FIELDS, _append_history, read_history
    from sd_core.store.catalog import Catalog

    cat = Catalog(tmp_path)
    run = cat.run_dir("run-new")
    (run / "model").mkdir(parents=True)
    old_header = HISTORY_FIELDS[:14]
    cat.eval_history_csv.parent.mkdir(parents=True, exist_ok=True)
    cat.eval_history_csv.write_text(",".join(old_header) + "\n" + "2024-01-01T00:00:00+00:00,run-old,promoted,"
                                    "228,20,900,0.17,0.79,0.53,1.0,0.52,,,\n")
    n = 6
    asked = {"skin color": ["red", "green", "blue"] * 2}
    result = {"items": n, "seeds_per_item": 2, "confidence": 0.9,
              **_result(asked, [[v, v] for v in asked["skin color"]], [0.1] * n, items=n)}
    result["intervals"] = intervals(Readings.from_json(result["paired"]), ["skin color"], confidence=0.9,
                                    replicates=200)
    _append_history(cat, run, result, "promoted")
    text = cat.eval_history_csv.read_text().splitlines()
    assert text[1].startswith("2024-01-01T00:00:00+00:00,run-old,promoted")  # the old row untouched
    assert text[0].split(",")[:14] == list(old_header)  # earlier columns keep their place
    old, new = read_history(cat)
    assert old["run"] == "run-old" and old["prompt_following"] == "0.79" and old["prompt_kappa"] == ""
    assert new["run"] == "run-new" and float(new["prompt_kappa"]) == 1.0 and new["prompt_kappa_lo"] == "1.0"
    assert new["kappa_attributes"] == "skin color" and set(new) == set(old)
    _append_history(cat, run, result, "rejected")  # and the next row goes on after them
    assert [r["status"] for r in read_history(cat)] == ["promoted", "promoted", "rejected"]


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
        # κ per attribute and the intervals are in the record, the report and the grid
        assert set(scored["intervals"]) >= {"prompt_kappa", "prompt_kappa_g0", "held_out_loss", "prompt_following"}
        assert scored["scores"]["prompt_kappa_real"] == 1.0 and scored["varying"]["attributes"]
        assert scored["images_drawn"] == 2 * scored["items"] * 2 and first["eval"].summary["images_drawn"] > 0
        assert "mean κ (headline)" in html.unescape(cat.report_html.read_text())

        # the same configuration from another training seed: as good as far as the eval can tell, so not
        # rejected (it replaces the champion)
        peer = run("train.seed=2", start="train")
        assert peer["train"].status == "ran" and peer["eval"].summary["decision"] == "promoted", peer["eval"].summary
        assert "not worse than" in peer["eval"].summary["reason"] and "90 % interval" in peer["eval"].summary["reason"]
        assert champion_run(cat) == cat.latest_run() != champion
        champion = champion_run(cat)

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
    assert [r["status"] for r in history][:4] == ["promoted", "promoted", "rejected", "promoted"] and len(history) == 5
    assert history[2]["versus"] == champion.name and float(history[2]["held_out_loss_diff_lo"]) > 0
    assert all(float(r["held_out_loss"]) > 0 for r in history)
    assert (cat.eval_history_csv.with_suffix(".png")).exists()
