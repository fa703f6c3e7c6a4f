"""Peak memory while glmtune loads an official-layout ChatGLM-6B checkpoint, against the weights' size.

Writes a random ChatGLM-6B checkpoint of the given shape in the official layout (fp16
`pytorch_model-0000N-of-0000M.bin` shards, their index, config.json with the official auto_map, the
tokenizer files), then loads it in a fresh process with glmtune's loader in float16 and reports the
process's peak resident memory above what the imports alone take: right after loading, and after reading
every weight once (loading may map the shards instead of reading them).

    python tools/measure_chatglm_load.py --hidden 2048 --layers 8 --shards 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The peak is read from /proc (VmHWM, KiB), which starts afresh in the new process; ru_maxrss would carry
# over the parent's peak through fork and exec.
MEASURE = """
import re, sys, torch
import glmtune.models.loader as loader
import transformers, glmtune.models.chatglm.modeling  # imports before the baseline
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = peak()
loaded = loader.load_model(sys.argv[1], dtype="float16")
after = peak()
params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
for p in loaded.model.parameters():  # read every weight, in case loading left some on disk (mmap)
    p.sum()
print(before, after, peak(), params)
"""


def write_checkpoint(folder: Path, hidden: int, layers: int, shards: int) -> int:
    import torch

    from glmtune.models.chatglm.configuration import ChatGLMConfig
    from glmtune.models.chatglm.modeling import ChatGLMForConditionalGeneration
    from glmtune.paths import shared_dir

    config = ChatGLMConfig(hidden_size=hidden, num_layers=layers, num_attention_heads=hidden // 128,
                           inner_hidden_size=4 * hidden)
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in ChatGLMForConditionalGeneration(config).state_dict().items()]
    per_shard = -(-len(names) // shards)
    index, total = {"metadata": {}, "weight_map": {}}, 0
    for i in range(shards):
        part = names[i * per_shard:(i + 1) * per_shard]
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        tensors = {n: torch.randn(shape, dtype=torch.float16) * 0.02 for n, shape in part}
        total += sum(t.numel() * 2 for t in tensors.values())
        torch.save(tensors, folder / shard)
        index["weight_map"].update({n: shard for n, _ in part})
        del tensors
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    official = json.loads((shared_dir() / "fixtures/tokenizers/chatglm-6b/official_config.json").read_text())
    official.update(hidden_size=hidden, num_layers=layers, num_attention_heads=hidden // 128,
                    inner_hidden_size=4 * hidden)
    (folder / "config.json").write_text(json.dumps(official))
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(shared_dir() / "fixtures/tokenizers/chatglm-6b" / name, folder)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = write_checkpoint(folder, args.hidden, args.layers, args.shards)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, check=True)
        before, after, touched, params = map(int, out.stdout.split()[-4:])
    gib = 1024 ** 3
    print(json.dumps({"weights_on_disk_gib": round(weights / gib, 3), "model_in_memory_gib": round(params / gib, 3),
                      "peak_rss_after_imports_gib": round(before * 1024 / gib, 3),
                      "peak_rss_growth_while_loading_gib": round((after - before) * 1024 / gib, 3),
                      "peak_rss_growth_after_reading_every_weight_gib": round((touched - before) * 1024 / gib, 3),
                      "growth_over_weights": round((touched - before) * 1024 / weights, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
