"""QLoRA on the default model, then merged: do the merged weights answer as the quantized base + adapter did?

    python tools/merge_roundtrip.py --bits 4 --out /tmp/roundtrip4
    python tools/merge_roundtrip.py --bits 8 --out /tmp/roundtrip8 --base-alone

Runs the commands a user runs: `glmtune train --method qlora` (a few steps on the shipped sample data),
`glmtune predict --adapter`, `glmtune export --merge`, `glmtune predict --model MERGED` on the first rows of
the sample dev set, and prints one JSON line: how many answers are identical, the export's own check line
and each command's wall time. With --base-alone it also compares the quantized base's logits with those of
its dequantized weights (no adapter), which is what an 8-bit merge cannot reproduce.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def glmtune(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "glmtune", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"glmtune {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return round(time.perf_counter() - start, 1), done.stdout + done.stderr


def predictions(path: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines()]


def base_alone(bits: int) -> dict:
    import torch

    from glmtune.models.kbit import Quantization, dequantize_bitsandbytes
    from glmtune.models.loader import load_model

    loaded = load_model("smollm2-135m", quantization=Quantization(bits))
    ids = loaded.tokenizer("What is the capital of France? Answer briefly.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        quantized = loaded.model(input_ids=ids).logits
        dequantize_bitsandbytes(loaded.model)
        plain = loaded.model(input_ids=ids).logits
    return {"max_abs_logit_diff": round((quantized - plain).abs().max().item(), 3),
            "max_abs_logit": round(quantized.abs().max().item(), 3),
            "same_top_token": round((quantized.argmax(-1) == plain.argmax(-1)).float().mean().item(), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--out", required=True, help="a folder to write into (replaced)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20, help="sample dev rows to answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base-alone", action="store_true", help="also compare the base with its dequantized weights")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = ROOT / "glmtune" / "sample_data"
    rows = out / "dev.jsonl"
    rows.write_text("".join((data / "dev.jsonl").read_text(encoding="utf-8").splitlines(True)[: args.rows]),
                    encoding="utf-8")
    answer = ["--input", str(rows), "--max-new-tokens", str(args.max_new_tokens)]
    times = {}
    times["train"], _ = glmtune("train", "--method", "qlora", "--quantization-bit", str(args.bits), "--max-steps",
                                str(args.steps), "--batch-size", "4", "--train-file", str(data / "train.jsonl"),
                                "--output-dir", str(out / "run"))
    times["predict_adapter"], _ = glmtune("predict", "--adapter", str(out / "run" / "adapter"), *answer,
                                          "--output", str(out / "adapter.jsonl"))
    times["export"], text = glmtune("export", "--adapter", str(out / "run" / "adapter"), "--output",
                                    str(out / "merged"), "--merge")
    times["predict_merged"], _ = glmtune("predict", "--model", str(out / "merged"), *answer,
                                         "--output", str(out / "merged.jsonl"))
    adapter, merged = predictions(out / "adapter.jsonl"), predictions(out / "merged.jsonl")
    result = {"bits": args.bits, "rows": len(adapter), "identical": sum(a == m for a, m in zip(adapter, merged)),
              "non_empty": sum(bool(a) for a in adapter),
              "export_check": next((line.strip() for line in text.splitlines() if "check:" in line), None),
              "seconds": times}
    if args.base_alone:
        result["base_alone"] = base_alone(args.bits)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
