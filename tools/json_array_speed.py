"""Time reading JSON-array data files (not JSONL) of growing size: the cost must grow linearly.

    python tools/json_array_speed.py [--rows 50000 100000 200000]

Writes each file into a temporary folder (two-field rows, indented as editors save them), reads it with
glmtune's data reader (what `glmtune data validate` and `train` do) and prints size, rows and seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROW = {"context": "What is 2 + 2?", "target": "4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    args = parser.parse_args()

    from glmtune.data.formats import load_samples

    for rows in args.rows:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "data.json"
            path.write_text(json.dumps([ROW] * rows, indent=2), encoding="utf-8")
            start = time.perf_counter()
            samples, _ = load_samples(path)
            seconds = time.perf_counter() - start
            print(f"{path.stat().st_size / 1e6:.1f} MB, {len(samples):,} rows: {seconds:.2f} s")


if __name__ == "__main__":
    main()
