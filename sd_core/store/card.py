"""The data directory's dataset card, ``README.md``: where the images came from, how many there are, who
captioned them, and that their licence is the source site's.

Its YAML header follows the Hugging Face dataset-card format; ``configs`` names the dataset's own files
(metadata.csv and images/*.jpg), so ``load_dataset(<data dir>)`` and a Hub upload of the folder read exactly
those and never the models, samples or caches beside them.
"""

from __future__ import annotations

import csv
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from sd_core.store.catalog import IMAGES, Catalog
from sd_core.store.files import atomic_write_text
from sd_core.store.metadata import read_metadata

MARKER = ("<!-- written by emoji-sd's caption stage, which rewrites it on every run (delete this line to keep "
          "your own edits) -->")


def _count_rows(path) -> int:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return sum(1 for _ in csv.DictReader(f))
    except FileNotFoundError:
        return 0


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def _sites(rows: list[dict[str, str]]) -> list[str]:
    hosts = Counter()
    for r in rows:
        parts = urlsplit(r.get("image_url", ""))
        if parts.scheme and parts.netloc:
            hosts[f"{parts.scheme}://{parts.netloc}"] += 1
    return [h for h, _ in hosts.most_common()]


_LOCAL_KINDS = {"folder": "a folder of images", "dataset": "a dataset"}


def _local_sources(rows: list[dict[str, str]]) -> list[str]:
    """The kinds of local source the rows come from (``image_url`` = ``folder:…`` or ``dataset:…``)."""
    return sorted({k for r in rows if (k := r.get("image_url", "").split(":", 1)[0]) in _LOCAL_KINDS})


def source_text(facts: dict[str, Any], *, tag_word: str = "tag") -> str:
    """Where the images came from, for a card: the tag(s) on the site(s) (or the URL list's hosts), a folder, a
    dataset."""
    tags = ", ".join(f"`{t}`" for t in facts["tags"]) or "(none)"
    parts = [f"{_LOCAL_KINDS[k]} (named {tags})" for k in facts.get("local_sources", [])]
    if facts["sites"] or not parts:
        parts.insert(0, f"the images listed under the {tag_word} {tags} on {', '.join(facts['sites']) or '(unknown)'}")
    return " and ".join(parts)


def dataset_summary(catalog: Catalog, md5s: set[str] | None = None) -> dict[str, Any]:
    """What the data directory holds (only the rows of ``md5s`` when given): counts, sources and captioners."""
    rows = [r for r in read_metadata(catalog) if md5s is None or r.get("md5") in md5s]
    return {
        "images": len(rows),
        "tags": sorted({r.get("tag", "") for r in rows} - {""}),
        "sites": _sites(rows),
        "local_sources": _local_sources(rows),
        "captioners": dict(Counter(r.get("captioner") or "unknown" for r in rows).most_common()),
        "flagged": sum(1 for r in rows if r.get("caption_flagged") == "True"),
        "duplicates": _count_rows(catalog.duplicates_csv),
        "quarantined": _count_rows(catalog.quarantine_csv),
    }


def dataset_card(catalog: Catalog, *, captioner: str | None = None, repo_id: str | None = None) -> str:
    """The card's Markdown for the dataset as metadata.csv, duplicates.csv and the quarantine list hold it now
    (its YAML header is ``huggingface_hub``'s ``DatasetCardData``; ``repo_id``: the Hub repository it is pushed to,
    for the loading snippet)."""
    from huggingface_hub import DatasetCardData

    facts = dataset_summary(catalog)
    tags, sites = facts["tags"], facts["sites"]
    duplicates, quarantined, flagged = facts["duplicates"], facts["quarantined"], facts["flagged"]
    local = facts["local_sources"]
    origin = sites[0] if sites else _LOCAL_KINDS[local[0]] if local else "the web"
    title = f"{' / '.join(tags) or 'Emoji'} emoji from {origin}"
    by_captioner = ", ".join(f"{name}: {n}" for name, n in facts["captioners"].items()) or "none yet"
    captioner = captioner or ", ".join(facts["captioners"]) or "no captioner yet"
    header = DatasetCardData(
        pretty_name=title, license="other", license_name="source-site-terms", task_categories=["text-to-image"],
        tags=["emoji", "emoji-sd"], size_categories=[_size_category(facts["images"])],
        configs=[{"config_name": "default", "data_files": [{"split": "train",
                                                            "path": ["metadata.csv", f"{IMAGES}/*.jpg"]}]}],
    ).to_yaml()
    where = repo_id or "path/to/this/folder"
    loader = (f'ds = load_dataset("{repo_id}", split="train")  # columns: image, prompt, ...' if repo_id else
              f'ds = load_dataset("imagefolder", data_dir="{where}", split="train")  # columns: image, prompt, ...')
    return f"""---
{header}
---

# {title}

{MARKER}

- **Source**: {source_text(facts)}. Each row's `image_url` and `image_title` say where it was found
  (a URL, or `folder:<path>` / `dataset:<md5>`) and under which title.
- **Images**: {facts["images"]} unique images (by md5 of the downloaded bytes), converted to RGB JPEG with
  transparency flattened on a background colour.
- **Duplicates**: {duplicates} listed URLs whose bytes equal an image already kept (not in the dataset;
  `duplicates.csv` names the original of each).
- **Quarantined**: {quarantined} downloads that did not decode as a usable image (not in the dataset;
  `quarantine/quarantine.csv` gives the reason of each).
- **Captions**: by {captioner}; {flagged} flagged by the caption checks (`caption_flagged`). Rows per
  captioner (metadata.csv's `captioner`): {by_captioner}.

## Licence

The images are the work of the site's uploaders and carry the licence the source site grants (see its
terms), **not** emoji-sd's: the MIT licence of emoji-sd covers its code only. Check the site's terms
before you redistribute the images or publish a model trained on them. The captions are machine-written,
but those whose `captioner` is `user` (given by the source or edited by hand).

## Files

| path | what |
| --- | --- |
| `metadata.csv` | one row per image (columns below) |
| `{IMAGES}/*.jpg` | the images |
| `{IMAGES}/*.txt` | the caption of the image of the same name (kohya, SimpleTuner, OneTrainer), when written |

metadata.csv's columns: `file_name` (the image, relative to this folder), `image_url`, `image_title`, `tag`,
`md5`, `width`, `height`, `source_format`, `animated`, `fit` (how training makes a non-square image square),
`source_caption` (the caption the source gave), `prompt` (the caption), `captioner`, `caption_flagged`.

## Loading

```python
from datasets import load_dataset

{loader}
```
"""


def write_dataset_card(catalog: Catalog, *, captioner: str) -> bool:
    """Write ``README.md`` when its content changed; True when it wrote. A README.md without the marker
    line (one a person wrote or kept) is left as it is."""
    text = dataset_card(catalog, captioner=captioner)
    try:
        old = catalog.dataset_card.read_text("utf-8")
    except FileNotFoundError:
        old = None
    if old is not None and (old == text or MARKER not in old):
        return False
    atomic_write_text(catalog.dataset_card, text)
    return True
