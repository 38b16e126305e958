"""Regenerate the spec reference in docs/spec.md from the keys' help texts in
scoretrain/run/config.py: the part between the spec-reference markers is replaced by
config.reference_markdown(), the rest of the page is kept.
    python tools/spec_doc.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = ROOT / "docs" / "spec.md"
START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"


def split(text: str) -> tuple[str, str, str]:
    """The page before the generated part (through the start marker), the generated part, and the rest."""
    head, found, rest = text.partition(START)
    body, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise SystemExit(f"{PAGE}: expected the markers {START} and {END}")
    return head + START, body, END + tail


def generated() -> str:
    from scoretrain.run import config

    return "\n" + config.reference_markdown()


def main() -> int:
    head, _, tail = split(PAGE.read_text())
    PAGE.write_text(head + generated() + tail)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
