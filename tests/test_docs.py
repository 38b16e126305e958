"""The README and docs/*.md as a user meets them: every relative link and anchor resolves, the
README's tour runs as written through the real command line, and the README stays short."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
OWN = [README, ROOT / "CHANGELOG.md"] + [ROOT / "docs" / f"{p}.md" for p in
                                          ("sweeps", "data", "performance", "reliability", "gpu")]

# Given to every training command of the tour, in place of its own values: a small, quick run on the CPU.
BUDGET = ["data.train_samples=1000", "data.test_samples=200", "train.epochs=1", "device=cpu"]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HREF = re.compile(r"""<(?:a|img)\s[^>]*?(?:href|src)=["']([^"']+)["']""")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code blanked out."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        lines.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation other than '-' and '_'
    dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    text = text.lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page: Path) -> list[str]:
    """The targets of a page's links and images (a link's text may span lines)."""
    text = "\n".join(prose(page.read_text()))
    return LINK.findall(text) + HREF.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_slug_follows_github():
    assert slug("Exported subnetworks (`scoretrain export`)") == "exported-subnetworks-scoretrain-export"
    assert slug("`/batchnorm/<NN>`") == "batchnormnn"
    assert slug("The run store is the ledger") == "the-run-store-is-the-ledger"
    assert slug("k and width sweeps") == "k-and-width-sweeps"


def test_readme_is_at_most_200_lines():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; keep it a guide of at most 200 (the rest goes to docs/)"


@pytest.mark.parametrize("page", OWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_speak_of_the_project_not_of_its_making(page):
    hits = [line for line in page.read_text().splitlines()
            if re.search(r"issue [0-9]+|(second|third|earlier|next) session|this work\b", line, re.I)]
    assert not hits, "\n".join(hits)


def tour() -> list[str]:
    """The `scoretrain ...` lines of the README's fenced blocks marked `<!-- tour -->`, in order,
    without their comments."""
    commands, lines = [], README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "<!-- tour -->":
            continue
        j = i + 1
        while not lines[j].strip():
            j += 1
        assert FENCE.match(lines[j].strip()), f"README.md:{i + 1}: <!-- tour --> is not followed by a fenced block"
        j += 1
        while not FENCE.match(lines[j].strip()):
            words = shlex.split(lines[j], comments=True)
            if words:
                assert words[0] == "scoretrain", f"README.md:{j + 1}: a tour line that is not a scoretrain command"
                commands.append(shlex.join(words))
            j += 1
    return commands


def trains(words: list[str]) -> bool:
    """fit of a config, or sweep of a config (not --resume, --status or --dry-run)."""
    return words[1] in ("fit", "sweep") and not {"--resume", "--status", "--dry-run"} & set(words)


def test_the_tour_covers_the_commands():
    used = {shlex.split(c)[1] for c in tour()}
    assert {"fit", "eval", "inspect", "export", "sweep", "compare", "config", "data"} <= used


def test_the_readme_tour_runs(tmp_path):
    """Each tour command, in order, through `python -m scoretrain` in a fresh folder where
    `configs` is the repository's (the shipped MNIST is found from the package), with a small
    budget appended to the training commands; each must exit 0."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, SCORETRAIN_DATA=str(tmp_path / "cache"), PYTHONPATH=str(ROOT), COLUMNS="120")
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    ran = 0
    for command in tour():
        words = shlex.split(command)
        if not has_onnx and any(w.endswith(".onnx") for w in words):
            continue  # the onnx extra is not installed here
        budget = BUDGET if trains(words) else []  # in place of the command's own value of a key
        args = [w for w in words[1:] if w.split("=", 1)[0] not in {b.split("=", 1)[0] for b in budget}] + budget
        proc = subprocess.run([sys.executable, "-m", "scoretrain", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        ran += 1
    assert ran >= 10
