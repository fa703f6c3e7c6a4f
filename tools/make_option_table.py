"""Print the option tables of docs/training.md from glmtune's config dataclasses.

    python tools/make_option_table.py            # print the tables
    python tools/make_option_table.py --write    # replace the tables in docs/training.md

A test checks that docs/training.md holds exactly what this prints, so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glmtune.config import TrainConfig, section_of

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"
MARKER = "## Options\n"


def option_tables() -> str:
    lines = []
    for section, group in section_of(TrainConfig):
        lines += ["", f"### {section}", "", "| option | default | meaning |", "| --- | --- | --- |"]
        for f in group:
            meta = f.metadata
            choices = f" One of: {', '.join(map(str, meta['choices']))}." if meta.get("choices") else ""
            lines.append(f"| `{f.name}` | `{f.default}` | {meta['help']}{choices} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {DOC}")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(option_tables())
        return 0
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(text[: text.index(MARKER) + len(MARKER)] + option_tables(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
