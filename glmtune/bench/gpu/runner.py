"""`python tools/gpu_check.py --out DIR [--tiny] [--only SECTION,...]`: every section in a process of its
own (its own peak memory; a crash or a hung kernel stops only that section) with a time budget; each result
is written the moment it is made, so a section killed at its budget keeps what it finished. The results go
to DIR/gpu_check.json (every figure, the machine, versions and commit), DIR/gpu_check.md (the tables for
docs/benchmarks.md) and DIR/gpu_check.log (the sections' own output)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> (budget in seconds on a GPU, with --tiny); the GPU budgets add up to 7.5 minutes
SECTIONS = {"correctness": (45, 180), "training": (300, 300), "serving": (75, 180), "estimate": (30, 120)}
RESERVE = {"gpu": 45, "tiny": 10}  # a section starts no new case with less than this left of its budget


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.py", description="Check and measure glmtune on a GPU in one command (docs/gpu.md).")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for gpu_check.json, .md and .log")
    parser.add_argument("--tiny", action="store_true",
                        help="the same sections with tiny shapes (about a minute on a CPU); the tests run this")
    parser.add_argument("--only", default=None, metavar="SECTION,...",
                        help=f"run only these sections, of {', '.join(SECTIONS)}")
    parser.add_argument("--shared", default=None, metavar="DIR",
                        help="the shared folder (fixtures/golden, fixtures/tokenizers, data/seed_mixed); "
                             "default $GLMTUNE_SHARED, else ../shared")
    parser.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                        help="another time budget for a section (repeatable), e.g. training=600 on a slower GPU")
    parser.add_argument("--commit", default=None, help="the glmtune commit, where the copy has no git history")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.child:
        return _run_child(args)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        print(f"gpu_check: error: unknown section {', '.join(unknown) or '(none given)'}; the sections are "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    budgets = {name: times[1 if args.tiny else 0] for name, times in SECTIONS.items()}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = 0.0
        if name not in SECTIONS or not value > 0:
            print(f"gpu_check: error: --budget {item!r}: write SECTION=SECONDS with a section of "
                  f"{', '.join(SECTIONS)} and a positive number", file=sys.stderr)
            return 2
        budgets[name] = value
    shared = Path(args.shared or _default_shared()).expanduser().resolve()
    device = args.device or _default_device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        print(f"gpu_check: error: --device {device!r}: give cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.startswith("cuda") and _default_device() != "cuda":
        print("gpu_check: error: --device cuda, but PyTorch sees no CUDA GPU here (a CPU build of torch, or no "
              "driver); run with --tiny on the CPU, or on a GPU machine", file=sys.stderr)
        return 2
    if device == "cpu" and not args.tiny:
        print("gpu_check: error: the full-size check needs a GPU (6B-9B models); on the CPU run it with --tiny",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"gpu_check: error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.log").write_text("", encoding="utf-8")
    except OSError as e:
        print(f"gpu_check: error: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return _run_parent(args, out, shared, device, only, budgets)


def _default_shared() -> Path:
    from glmtune.paths import shared_dir

    return shared_dir()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_parent(args, out: Path, shared: Path, device: str, only: list[str], budgets: dict[str, float]) -> int:
    from glmtune.bench.gpu.report import render

    started = time.time()
    results: dict[str, Any] = {"command": " ".join(["python tools/gpu_check.py"] + sys.argv[1:]),
                               "tiny": args.tiny, "device": device, "shared": str(shared),
                               "machine": machine_facts(device), "versions": versions(),
                               "commit": args.commit or commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "sections": {}}
    with tempfile.TemporaryDirectory(prefix="glmtune-gpu-check-") as work:
        for name in SECTIONS:
            if name not in only:
                results["sections"][name] = {"status": "not run", "items": []}
                continue
            print(f"gpu_check: {name} ...", flush=True)
            section = _run_section(args, name, budgets[name], Path(work), out, shared, device)
            results["sections"][name] = section
            print(f"gpu_check: {name}: {section['status']} in {section['seconds']:.0f} s "
                  f"(budget {section['budget_s']} s)", flush=True)
            _write(out, results, render)
    results["wall_s"] = round(time.time() - started, 1)
    ran = [s for s in results["sections"].values() if s["status"] != "not run"]
    results["ok"] = all(s["status"] == "ok" for s in ran)
    _write(out, results, render)
    print(f"gpu_check: {'all sections passed' if results['ok'] else 'some sections did not pass'} in "
          f"{results['wall_s']:.0f} s; results in {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    return 0 if results["ok"] else 1


def _write(out: Path, results: dict[str, Any], render) -> None:
    from glmtune.files import write_text

    write_text(out / "gpu_check.json", json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n")
    write_text(out / "gpu_check.md", render(results))


def _run_section(args, name: str, budget: float, work: Path, out: Path, shared: Path, device: str) -> dict[str, Any]:
    reserve = RESERVE["tiny" if args.tiny else "gpu"]
    items_file = work / f"{name}.jsonl"
    started = time.time()
    command = [sys.executable, "-m", "glmtune.bench.gpu.runner", "--child", name, "--out", str(out),
               "--work", str(work), "--shared", str(shared), "--device", device,
               "--deadline", str(started + budget - min(reserve, budget / 4))] + (["--tiny"] if args.tiny else [])
    status, error = "ok", None
    with open(out / "gpu_check.log", "a", encoding="utf-8") as log:
        log.write(f"\n===== section {name} =====\n")
        log.flush()
        try:
            # the sections share one tokenized-data cache inside the work folder, not the user's
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLMTUNE_CACHE": str(work / "cache")}
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=budget, env=env)
            if finished.returncode != 0:
                status, error = "failed", f"the section's process exited with {finished.returncode}"
        except subprocess.TimeoutExpired:
            status, error = "timeout", f"stopped at its time budget of {budget} s"
    items = read_items(items_file)
    if status == "ok" and any(item.get("ok") is False for item in items):
        status = "failed"
    if status != "ok" and error and "exited" in error:
        error += ": " + _log_tail(out / "gpu_check.log")
    return {"status": status, "seconds": round(time.time() - started, 1), "budget_s": budget,
            **({"error": error} if error else {}), "items": items}


def _log_tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-chars:].strip()


def read_items(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run_child(args) -> int:
    """One section in this process; every result appended to WORK/SECTION.jsonl as it is made."""
    from glmtune.bench.gpu.shapes import Shapes

    work = Path(args.work)
    shapes = Shapes(Path(args.shared), work, args.tiny)
    items_file = work / f"{args.child}.jsonl"

    def record(item: dict[str, Any]) -> None:
        with open(items_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        print(f"  {item.get('name')}: {'ok' if item.get('ok') else 'skipped' if item.get('ok') is None else 'FAILED'}"
              + (f" ({item['error']})" if item.get("error") else ""), flush=True)

    try:
        if args.child == "correctness":
            from glmtune.bench.gpu import correctness

            correctness.run(shapes, args.device, record)
        elif args.child == "training":
            from glmtune.bench.gpu import training

            training.run(shapes, args.device, record, deadline=args.deadline)
        elif args.child == "serving":
            from glmtune.bench.gpu import serving

            serving.run(shapes, args.device, record)
        elif args.child == "estimate":
            from glmtune.bench.gpu import estimate

            estimate.run(shapes, args.device, record, read_items(work / "training.jsonl"))
    except Exception as e:  # the section's own failure, recorded; the next section still runs
        import traceback

        record({"name": f"{args.child} section", "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-3000:]})
        return 1
    return 0


def machine_facts(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                             "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_count=torch.cuda.device_count(),
                     cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(),
                     capability=f"{props.major}.{props.minor}")
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "bitsandbytes",
                 "fastapi", "uvicorn", "pydantic", "httpx"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def commit() -> str | None:
    """The checkout's commit (with "-dirty" when files differ from it), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
