"""What changing the demo's training data, not its model, does to prompt following (measured, not options).

    .venv/bin/python benchmarks/demo_data_variants.py [--data-dir data/demo-quality] [--only NAME ...]

Each variant copies the prepared demo data (``benchmarks/demo_quality.py`` prepares it the same way), rewrites
the training items in ``metadata.csv`` (held-out items are never touched, so the eval set and its prompts
stay the same), and runs the demo from the encode stage on, with the demo VAE already trained:

* ``hue copies``: every training emoji gets copies with its hues rotated by 120 and 240 degrees about the
  grey axis (white, grey and black stay), each captioned by the offline captioner, so the copies' prompts
  name their new colours: more examples of each colour word;
* ``no titles``: the training captions lose the emoji's name ("An emoji with a round head, ..."), for all
  training items or for half of them, so that the model cannot tell an emoji by its name alone.

The row is ``benchmarks/demo_quality.py``'s; the eval is the same (guidance 4, 3 seeds per item).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import time
from pathlib import Path

import numpy as np
from demo_quality import EVAL, HEADER, ROOT, cli, copy_base, prepare, read_results, row
from PIL import Image

SPLIT = (0.1, 42)  # train.val_fraction and train.split_seed of the demo


def _held_out(md5: str) -> bool:
    """Whether the training split holds this item out: ``split_ids`` places an item by a hash of its own id
    (one id alone gets no fallback), so a copy's side is known before it joins the data set."""
    from sd_core.encode.pairs import split_ids

    return bool(split_ids([md5], *SPLIT)[1])


def _hue_rotation(degrees: float) -> np.ndarray:
    """The RGB matrix that turns hues by ``degrees`` about the grey axis (Rodrigues' formula)."""
    t = np.deg2rad(degrees)
    u = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(t) * np.eye(3) + (1 - np.cos(t)) * np.outer(u, u) + np.sin(t) * cross


def hue_copies(data: Path, rows: list[dict], angles: tuple[float, ...] = (120.0, 240.0)) -> list[dict]:
    from sd_core.caption.offline import OfflineCaptioner

    captioner, seen, out = OfflineCaptioner(), {r["md5"] for r in rows}, list(rows)
    for r in rows:
        if _held_out(r["md5"]):
            continue
        pixels = np.asarray(Image.open(data / r["file_name"]).convert("RGB"), dtype=np.float64) / 255.0
        for a in angles:
            turned = Image.fromarray((np.clip(pixels @ _hue_rotation(a).T, 0, 1) * 255).round().astype(np.uint8))
            buf = io.BytesIO()
            turned.save(buf, "JPEG", quality=95)
            md5 = hashlib.md5(buf.getvalue()).hexdigest()
            if md5 in seen or _held_out(md5):  # a copy must not land in the held-out split
                continue
            seen.add(md5)
            name = f"images/hue{a:.0f}_{Path(r['file_name']).name}"
            (data / name).write_bytes(buf.getvalue())
            out.append({**r, "file_name": name, "md5": md5, "image_url": f"{r['image_url']}#hue{a:.0f}",
                        "prompt": captioner.caption_one(Image.open(io.BytesIO(buf.getvalue())), r["image_title"])})
    return out


def no_titles(share: float):
    def rewrite(data: Path, rows: list[dict]) -> list[dict]:
        from sd_core.encode.pairs import _unit_hash

        out = []
        for r in rows:
            cut = r["prompt"].find(" emoji with ")
            if not _held_out(r["md5"]) and _unit_hash(r["md5"], 7) < share and cut > 0:
                r = {**r, "prompt": "An" + r["prompt"][cut:]}
            out.append(r)
        return out
    return rewrite


VARIANTS = {
    "the demo preset (unchanged data)": lambda data, rows: rows,
    "hue copies (120 and 240 degrees)": hue_copies,
    "no titles in the training captions": no_titles(1.0),
    "no titles in half of the training captions": no_titles(0.5),
}


def run(base: Path, name: str, rewrite) -> dict:
    dest = base.parent / f"{base.name}-data-variants" / "".join(c if c.isalnum() else "-" for c in name)[:60]
    copy_base(base, dest)
    with open(base / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    rows = rewrite(dest, rows)
    with open(dest / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    args = ["demo", "--data-dir", str(dest), "--from", "encode", "--no-progress"]
    for s in EVAL:
        args += ["--set", s]
    start = time.perf_counter()
    r = cli(*args)
    if r.returncode:
        return {"name": name, "error": (r.stderr or r.stdout)[-800:]}
    return read_results(dest, f"{name} ({len(rows)} items)", time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "demo-quality")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args()
    base = args.data_dir.resolve()
    prepare(base, [])
    print(HEADER.format(last="encode → sample"))
    for name, rewrite in VARIANTS.items():
        if not args.only or name in args.only:
            print(row(run(base, name, rewrite)), flush=True)


if __name__ == "__main__":
    main()
