"""Check and measure glmtune on a GPU in one command; see docs/gpu.md.

    python tools/gpu_check.py --out DIR [--tiny] [--only correctness,training,serving,estimate]
"""

from glmtune.bench.gpu.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
