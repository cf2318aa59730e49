"""The caption template every captioner fills, and the checks a caption must pass.

Every caption follows one shape::

    '{title} emoji with a {head shape}, {eyes} eyes, {mouth} mouth, {expression} expression,
     {skin color} skin color, {action}, with a {background color} background.'
"""

from __future__ import annotations

import re

PROMPT_TEMPLATE_V1 = (
    "This picture is an emoji titled '{title}'. Describe it in one sentence that covers, in this order: "
    "1) the shape of the head, 2) the eyes, 3) the mouth, 4) the facial expression, 5) the skin color, "
    "6) the action it performs, if any, 7) the background color.\n"
    "Write the sentence in exactly this shape:\n"
    "'{title} emoji with a {head shape}, {eye description} eyes, {mouth description} mouth, "
    "{expression description} expression, {skin color} skin color, {action description}, "
    "with a {background color} background.'\n"
    "For example, for an emoji titled 'Pepe the Frog' a good answer is:\n"
    "'Pepe the frog emoji with a round head, big eyes, smiling mouth, happy expression, green skin color, "
    "no action, with a green background.'\n"
    "Write 'no action' when the emoji does nothing in particular. Answer with the sentence only."
)

# Appended to the prompt when a caption is asked for again after failing validation.
RETRY_SUFFIX = (
    "\nYour answer must be a single sentence that starts with '{title} emoji with a' and names the eyes, "
    "the mouth, the expression, the skin color and the background."
)

QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_LABEL = re.compile(r"^(?:caption|description|answer|output|response|sentence)\s*[:\-\u2013\u2014]\s*", re.I)
_REQUIRED_PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("emoji with a", re.compile(r"\bemoji with an?\b", re.I)),
    ("eyes", re.compile(r"\beyes?\b", re.I)),
    ("mouth", re.compile(r"\bmouth\b", re.I)),
    ("expression", re.compile(r"\bexpression\b", re.I)),
    ("skin color", re.compile(r"\bskin colou?r\b", re.I)),
    ("background", re.compile(r"\bbackground\b", re.I)),
)
MIN_CAPTION_CHARS = 40
MAX_CAPTION_CHARS = 400

# Captions in the template's shape, used where a run needs prompts and the config names none.
DEFAULT_PROMPTS = (
    "Purple Blob emoji with a round head, small black eyes, smiling mouth, happy expression, purple skin color, "
    "waving action, with a white background.",
    "Pepe the frog emoji with a round head, big eyes, smiling mouth, happy expression, green skin color, "
    "no action, with a green background.",
    "Cat emoji with a round head, closed eyes, open mouth, sleepy expression, orange skin color, no action, "
    "with a white background.",
)


def display_title(title: str) -> str:
    """The title as a caption starts with it: `:blob_wave:` becomes `blob wave`."""
    text = title.strip().strip(":").replace("_", " ")
    text = " ".join(text.split())
    return text or "Custom"


def title_words(title: str) -> list[str]:
    """Lower-case alphanumeric words of a title, with camelCase split."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", title)
    return re.findall(r"[a-z0-9]+", spaced.lower())


def render_prompt(template: str, title: str, *, strict: bool = False) -> str:
    """Fill `{title}` in the template, with the retry reminder appended when `strict`."""
    name = display_title(title)
    text = template.replace("{title}", name)
    return text + RETRY_SUFFIX.replace("{title}", name) if strict else text


def clean_caption(text: str) -> str:
    """One tidy line: no surrounding quotes, no leading label, single spaces, a final period."""
    line = " ".join(text.split())
    previous = None
    while line != previous:
        previous = line
        line = line.strip(QUOTES + " ")
        line = _LABEL.sub("", line)
        if line.endswith(".") and line[:-1].rstrip().endswith(tuple(QUOTES)):
            line = line[:-1]
    line = line.rstrip(",;:!? ")
    if line and not line.endswith("."):
        line += "."
    return line


def validate_caption(text: str, title: str) -> str | None:
    """None when `text` has the template's shape for this title, else a short reason."""
    if not text.strip():
        return "empty caption"
    if len(text) < MIN_CAPTION_CHARS:
        return f"too short ({len(text)} chars)"
    if len(text) > MAX_CAPTION_CHARS:
        return f"too long ({len(text)} chars)"
    expected = title_words(display_title(title))
    if expected and title_words(text)[:1] != expected[:1]:
        return f"does not start with the title '{display_title(title)}'"
    missing = [name for name, pattern in _REQUIRED_PARTS if not pattern.search(text)]
    if missing:
        return "missing " + ", ".join(repr(name) for name in missing)
    return None
