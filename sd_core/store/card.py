"""The data directory's dataset card, ``README.md``: where the images came from, how many there are, who
captioned them, and that their licence is the source site's.

Its YAML header follows the Hugging Face dataset-card format; ``configs`` names the dataset's own files
(metadata.csv and images/*.jpg), so ``load_dataset(<data dir>)`` and a Hub upload of the folder read exactly
those and never the models, samples or caches beside them.
"""

from __future__ import annotations

import csv
from collections import Counter
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


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dataset_card(catalog: Catalog, *, captioner: str) -> str:
    """The card's Markdown for the dataset as metadata.csv, duplicates.csv and the quarantine list it now."""
    rows = read_metadata(catalog)
    tags = sorted({r.get("tag", "") for r in rows} - {""})
    sites = _sites(rows)
    duplicates = _count_rows(catalog.duplicates_csv)
    quarantined = _count_rows(catalog.quarantine_csv)
    flagged = sum(1 for r in rows if r.get("caption_flagged") == "True")
    tag_text = ", ".join(f"`{t}`" for t in tags) or "(none)"
    site_text = ", ".join(sites) or "(unknown)"
    title = f"{' / '.join(tags) or 'Emoji'} emoji from {sites[0] if sites else 'the web'}"
    return f"""---
pretty_name: {_yaml_str(title)}
license: other
license_name: source-site-terms
task_categories:
- text-to-image
tags:
- emoji
size_categories:
- {_size_category(len(rows))}
configs:
- config_name: default
  data_files:
  - split: train
    path:
    - metadata.csv
    - {IMAGES}/*.jpg
---

# {title}

{MARKER}

- **Source**: the images listed under the tag {tag_text} on {site_text}. Each row's `image_url` and
  `image_title` say where it was found and under which title.
- **Images**: {len(rows)} unique images (by md5 of the downloaded bytes), converted to RGB JPEG with
  transparency flattened on a background colour.
- **Duplicates**: {duplicates} listed URLs whose bytes equal an image already kept (not in the dataset;
  `duplicates.csv` names the original of each).
- **Quarantined**: {quarantined} downloads that did not decode as a usable image (not in the dataset;
  `quarantine/quarantine.csv` gives the reason of each).
- **Captions**: by {captioner}; {flagged} flagged by the caption checks (`caption_flagged`).

## Licence

The images are the work of the site's uploaders and carry the licence the source site grants (see its
terms), **not** emoji-sd's: the MIT licence of emoji-sd covers its code only. Check the site's terms
before you redistribute the images or publish a model trained on them. The captions are machine-written.

## Files

| path | what |
| --- | --- |
| `metadata.csv` | one row per image (columns below) |
| `{IMAGES}/*.jpg` | the images |
| `{IMAGES}/*.txt` | the caption of the image of the same name (kohya, SimpleTuner, OneTrainer), when written |

metadata.csv's columns: `file_name` (the image, relative to this folder), `image_url`, `image_title`, `tag`,
`md5`, `width`, `height`, `source_format`, `animated`, `prompt` (the caption), `captioner`, `caption_flagged`.

## Loading

```python
from datasets import load_dataset

ds = load_dataset("imagefolder", data_dir="path/to/this/folder", split="train")  # columns: image, prompt, ...
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
