"""`glmtune export`: turn a trained adapter into what deployment wants, and prove the result answers the same.

- LoRA / QLoRA with merge: the base with the update folded into its weights, as an ordinary checkpoint
  (transformers families: loadable by plain transformers; native ChatGLM: the official weight names, a
  drop-in for the original folder). Over a quantized base the int layers are dequantized first, so the
  merged weights are the ones the adapter was trained against.
- LoRA without merge: a clean adapter folder, weights cast to dtype (a plain peft folder comes out as a
  glmtune adapter folder for the base it was exported for).
- P-Tuning v2: the final prefix table in one small file (the projection MLP folded away), itself an
  adapter folder.

Everything is written into a hidden sibling folder and renamed into place at the end, so a failure never
leaves a half-written output.
"""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmtune.config import DEFAULT_MODEL
from glmtune.errors import GlmtuneError, one_line
from glmtune.files import check_output_folder, lstat, path_error, remove_stale, staged_folder
from glmtune.methods.adapter import ADAPTER_FILE, EXPORT_FILE, FORMAT_VERSION

DTYPES = ("float16", "bfloat16", "float32")
# The quality check's prompts: different lengths, so the batch is left-padded as in real use.
PROMPTS = ("Hi!", "What is the capital of France?",
           "Write one calm sentence about the sea, for a child who cannot sleep.", "你好，请用一句话介绍你自己。")
CHECK_TOKENS = 16
log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    output: Path
    kind: str  # "merged", "adapter" or "prefix"
    dtype: str
    files: list[str]
    check: str | None  # one line on the quality check; None when skipped

    def summary(self) -> str:
        what = {"merged": "merged model (LoRA folded into the base weights)", "adapter": "LoRA adapter",
                "prefix": "P-Tuning v2 prefix (an adapter folder)"}[self.kind]
        return "\n".join([f"exported {what} to {self.output}",
                          f"  dtype {self.dtype}; files: {', '.join(self.files)}",
                          f"  check: {self.check or 'skipped'}"])


def export_model(adapter: str | Path, output: str | Path, *, model: str | None = None, merge: bool = False,
                 dtype: str | None = None, overwrite: bool = False, check: bool = True,
                 device: str | None = None) -> ExportReport:
    """Export the adapter in `adapter` (see the module docstring) to the folder `output`."""
    adapter_dir, out = Path(adapter), Path(output)
    if dtype is not None and dtype not in DTYPES:
        raise GlmtuneError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    _check_output(out, overwrite)
    _refuse_overlap(out, adapter_dir, "adapter folder")
    for path in remove_stale_staging(out):
        log.info("removed %s, left by an interrupted export", path)
    info, pre_seq_len = _adapter_info(adapter_dir, model)
    if merge and info["method"] == "ptuning":
        raise GlmtuneError(f"{adapter_dir} is a P-Tuning v2 adapter: a prefix is not a weight delta and cannot be "
                           "merged into the base; export it without --merge (one small prefix file)")
    if pre_seq_len is not None and not model:
        raise GlmtuneError(f"{adapter_dir} is an official P-Tuning checkpoint ({ADAPTER_FILE} is missing); name "
                           "its base model with --model")
    if info["method"] != "ptuning":
        from glmtune.export.merge import adapter_weights_file

        adapter_weights_file(adapter_dir)  # a damaged LoRA folder is refused before any model loads
    base = model or info.get("base_model")
    if info["method"] != "ptuning" and base:  # and one that does not fit the base (load_tuned_model checks P-Tuning's)
        _check_base_config(info, adapter_dir, base)
    if base and base != DEFAULT_MODEL and Path(base).is_dir():
        _refuse_overlap(out, Path(base), "base model folder")
    if info["method"] == "ptuning":
        return _export_prefix(adapter_dir, out, info, model, dtype or "float32", check, device, pre_seq_len)
    if merge:
        return _export_merged(adapter_dir, out, info, model, dtype, check, device)
    return _export_adapter(adapter_dir, out, info, model, dtype or "float32", check, device)


# ---------------------------------------------------------------- the three kinds

def _export_merged(adapter_dir: Path, out: Path, info: dict[str, Any], model: str | None, dtype: str | None,
                   check: bool, device: str | None) -> ExportReport:
    from glmtune.export.merge import (checkpoint_dtype, copy_side_files, dequantize_base, fold_lora, save_native,
                                      save_transformers)
    from glmtune.models.kbit import Quantization, bitsandbytes_bits, is_bitsandbytes_model
    from glmtune.families import is_native

    loaded = _load_base(info, adapter_dir, model, device)  # float32: the check compares before any cast
    stored_bnb = is_bitsandbytes_model(loaded.model)  # also a checkpoint stored in bitsandbytes' format
    bnb_bits = bitsandbytes_bits(loaded.model) if stored_bnb else 0
    loaded.model = _attach_lora(loaded.model, adapter_dir)
    template = info.get("template") or "auto"
    before = _probe(loaded, template) if check else None
    quantized = dequantize_base(loaded.model)
    loaded.model = fold_lora(loaded.model).eval()  # in place: one model in memory
    record = loaded.quantization.record() if loaded.quantization.bits else None
    if quantized and record is None:
        record = {"backend": "bitsandbytes" if stored_bnb else "chatglm", "stored": True}
    line = None
    if check:
        kind = Quantization(**record).describe() if quantized and "bits" in record else "quantized"
        note = f" ({kind} base with the adapter vs the merged dequantized weights)" if quantized else ""
        # Lossless unless the base was bitsandbytes 8-bit: its matmul also rounds the activations to int8,
        # which the merged float model does not (docs/serving.md gives the measured difference).
        rounds_activations = bnb_bits == 8
        line = _compare(before, _probe(loaded, template), exact=not rounds_activations, note=note)
    name = dtype or checkpoint_dtype(loaded.path)
    with _staging(out) as tmp:
        if is_native(loaded.family):
            files = save_native(loaded.model, loaded.path, tmp, getattr(torch, name))
        else:
            files = save_transformers(loaded.model, tmp, getattr(torch, name))
        files += copy_side_files(loaded.path, tmp)
        files.append(_write_record(tmp, "merged", loaded.name, loaded.family, adapter_dir, info, name, record, line))
    return ExportReport(out, "merged", name, sorted(files), line)


def _export_adapter(adapter_dir: Path, out: Path, info: dict[str, Any], model: str | None, dtype: str,
                    check: bool, device: str | None) -> ExportReport:
    from glmtune.export.merge import export_adapter_weights

    loaded = None
    if check:
        loaded = _load_base(info, adapter_dir, model, device)
    elif model:
        _check_base_config(info, adapter_dir, model)
    with _staging(out) as tmp:
        files = export_adapter_weights(adapter_dir, tmp, getattr(torch, dtype))
        written = dict(info)
        if model:  # the base it was exported for; a folder by its absolute path, as training records it
            written["base_model"] = os.path.abspath(os.path.expanduser(model)) if Path(model).expanduser().is_dir() \
                else model
        (tmp / ADAPTER_FILE).write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        files.append(ADAPTER_FILE)
        line = None
        if loaded is not None:  # the original and the exported adapter, one after the other over one base
            template = info.get("template") or "auto"
            loaded.model = _attach_lora(loaded.model, adapter_dir)
            before = _probe(loaded, template)
            try:
                loaded.model.load_adapter(str(tmp), adapter_name="exported", is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise RuntimeError(f"the exported adapter does not load: {e}") from e
            loaded.model.set_adapter("exported")
            line = _compare(before, _probe(loaded, template), exact=dtype == "float32",
                            note="" if dtype == "float32" else f" (weights stored in {dtype})")
        files.append(_write_record(tmp, "adapter", written["base_model"], info["family"], adapter_dir, info, dtype,
                                   None, line))
    return ExportReport(out, "adapter", dtype, sorted(files), line)


def _export_prefix(adapter_dir: Path, out: Path, info: dict[str, Any], model: str | None, dtype: str,
                   check: bool, device: str | None, pre_seq_len: int | None) -> ExportReport:
    from safetensors.torch import load_file

    from glmtune.export.prefix import final_table, use_table, write_prefix
    from glmtune.methods.adapter import load_tuned_model, write_adapter_info
    from glmtune.models.loader import fingerprint

    # load_tuned_model checks the base fits (or, for an official checkpoint, that it is a ChatGLM one)
    loaded, info = load_tuned_model(model, adapter_dir, dtype="float32", device=device, pre_seq_len=pre_seq_len)
    template = info.get("template") or "auto"
    before = _probe(loaded, template) if check else None
    key, table = final_table(loaded.model)
    parameters = {"pre_seq_len": int(table.shape[0]), "prefix_projection": False, "prefix_hidden_size": None}
    with _staging(out) as tmp:
        files = [write_prefix(tmp, key, table, getattr(torch, dtype))]
        write_adapter_info(tmp, method="ptuning", family=loaded.family, base_model=loaded.name,
                           fingerprint=fingerprint(loaded.model.config), template=template, parameters=parameters,
                           extra={"quantization_bit": loaded.quantization_bit,
                                  "quantization": loaded.quantization.record(),
                                  "prompt_template": info.get("prompt_template")})
        files.append(ADAPTER_FILE)
        line = None
        if check:  # the model as the exported file makes it: the stored table in place of the encoder
            use_table(loaded.model, load_file(str(tmp / files[0]))[key])
            line = _compare(before, _probe(loaded, template), exact=dtype == "float32",
                            note="" if dtype == "float32" else f" (prefix stored in {dtype})")
        files.append(_write_record(tmp, "prefix", loaded.name, loaded.family, adapter_dir, info, dtype, None, line))
    return ExportReport(out, "prefix", dtype, sorted(files), line)


# ---------------------------------------------------------------- loading

def _adapter_info(adapter_dir: Path, model: str | None) -> tuple[dict[str, Any], int | None]:
    """The adapter's info (checked before any model loads), and for an official ChatGLM P-Tuning checkpoint
    the prefix length its weights have. A plain peft LoRA folder gets the info of `model` (or the local
    base its config names) as its base."""
    from glmtune.methods import get_method
    from glmtune.methods.adapter import is_plain_peft, plain_peft_info, read_adapter_info
    from glmtune.methods.ptuning import KEY_PREFIX, OFFICIAL_FILES, official_checkpoint_info, read_weights

    if not adapter_dir.is_dir():
        raise GlmtuneError(f"adapter folder not found: {adapter_dir}")
    if is_plain_peft(adapter_dir):
        return plain_peft_info(adapter_dir, model), None
    weights = next((adapter_dir / f for f in OFFICIAL_FILES if (adapter_dir / f).is_file()), None)
    if (adapter_dir / ADAPTER_FILE).is_file() or weights is None:
        info = read_adapter_info(adapter_dir)
        get_method(info["method"])  # an unknown method is refused here
        return info, None
    state = read_weights(weights)  # an official checkpoint: its prefix length is the table's row count
    table = state.get(KEY_PREFIX + "embedding.weight")
    if table is None:
        read_adapter_info(adapter_dir)  # raises the usual "not a glmtune adapter" message
    return official_checkpoint_info(adapter_dir, int(table.shape[0])), int(table.shape[0])


def _load_base(info: dict[str, Any], adapter_dir: Path, model: str | None, device: str | None):
    """The adapter's base (or `model`), quantized as the adapter records, in float32; refused if the adapter
    does not fit it."""
    from glmtune.methods.adapter import check_base_fits
    from glmtune.models.kbit import Quantization
    from glmtune.models.loader import default_device, fingerprint, load_model

    name = model or info["base_model"]
    loaded = load_model(name, dtype="float32", device=device or default_device(),
                        quantization=Quantization.from_record(info))
    check_base_fits(info, loaded.family, fingerprint(loaded.model.config), adapter_dir, name)
    loaded.model.eval()
    return loaded


def _check_base_config(info: dict[str, Any], adapter_dir: Path, model: str) -> None:
    """Without loading weights: the family and those fingerprint values config.json states must match."""
    from glmtune.methods.adapter import check_base_config

    check_base_config(info, adapter_dir, model)


def _attach_lora(model, adapter_dir: Path):
    """The base with the LoRA adapter applied but not merged (over int layers peft uses the LoRA layer that
    refuses to merge into them)."""
    from peft import PeftModel

    from glmtune.methods.lora import fit_quantized, read_lora_config
    from glmtune.models.loader import load_errors

    try:
        config = fit_quantized(model, read_lora_config(adapter_dir))
        adapted = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False, config=config)
    except load_errors() as e:
        raise GlmtuneError(f"cannot load the LoRA adapter in {adapter_dir}: {one_line(e)}") from None
    return adapted.eval()


# ---------------------------------------------------------------- the quality check

@torch.inference_mode()
def _probe(loaded, template: str) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy answers to PROMPTS (one left-padded batch, as Generator builds it), as token ids (stricter than
    the decoded text, which hides special and unknown tokens), and the logits of the first answer token."""
    from glmtune.data.formats import Message
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator, generation_config

    generator = Generator(loaded, template)
    inputs = generator.inputs([[Message("user", p)] for p in PROMPTS])
    config = generation_config(GenerationOptions(max_new_tokens=CHECK_TOKENS), loaded.tokenizer.pad_token_id,
                               generator.stop_ids)
    output = loaded.model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1]:]
    answers = [[t for t in row.tolist() if t != loaded.tokenizer.pad_token_id] for row in output]
    return answers, loaded.model(**inputs).logits[:, -1].float().cpu()


def _compare(before, after, *, exact: bool, note: str = "") -> str:
    """One line on how the export's answers and logits compare with the original's. Where the export is
    lossless (`exact`), different answers are a bug and raise."""
    (answers, logits), (new_answers, new_logits) = before, after
    same = sum(a == b for a, b in zip(answers, new_answers))
    total = len(answers)
    line = (f"greedy answers to {total} prompts identical" if same == total else
            f"greedy answers identical for {same} of {total} prompts")
    line += f"; max |logit diff| {(logits - new_logits).abs().max().item():.1e}{note}"
    if exact and same != total:
        raise GlmtuneError(f"the export was not written: its answers differ from the adapter's, which a lossless "
                           f"export must not ({line}); please report this as a glmtune bug")
    return line


# ---------------------------------------------------------------- the output folder

def _check_output(out: Path, overwrite: bool) -> None:
    if lstat(out) is None:
        check_output_folder(out)  # a name too long, a file on the way, an unwritable place
        return
    if out.is_dir() and not out.is_symlink():
        check_output_folder(out)
        if not any(out.iterdir()):
            return  # an empty folder is fine
    if not overwrite:
        raise GlmtuneError(f"{out} already exists and is not an empty folder; pass --overwrite to replace it")
    if not os.access(out.absolute().parent, os.W_OK | os.X_OK):
        raise GlmtuneError(f"cannot replace {out}: its folder is not writable")


def _refuse_overlap(out: Path, source: Path, what: str) -> None:
    """Replacing `out` must never delete what the export reads from."""
    target, source_path = out.resolve(), source.resolve()
    if target == source_path or target in source_path.parents:
        raise GlmtuneError(f"the output {out} would replace the {what} {source}; choose another output folder")


def _hidden(out: Path, kind: str, pid: int | str) -> Path:
    """`.OUT.kind-PID` beside `out` (the name cut so that it stays within the file system's limit)."""
    return out.parent / f".{out.name[:200]}.{kind}-{pid}"


def _owner(path: Path) -> int | None:
    pid = path.name.rpartition("-")[2]
    return int(pid) if pid.isdigit() else 0  # no process id: nobody's


def remove_stale_staging(out: Path) -> list[Path]:
    """What killed exports into `out` left beside it (a staging folder can be hundreds of MB): removed when
    the process that wrote it is gone, as checkpoint staging folders are when a run starts again."""
    removed = []
    for kind in ("export", "replaced"):
        removed += remove_stale(out.parent, f".{glob.escape(out.name[:200])}.{kind}-*", owner=_owner)
    return removed


@contextmanager
def _staging(out: Path):
    """A fresh hidden sibling of `out` to write into; on success it replaces `out`, on failure it goes."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(out, e, "cannot write") from None
    with staged_folder(out, _hidden(out, "export", os.getpid()), _hidden(out, "replaced", os.getpid())) as tmp:
        yield tmp
        gc.collect()  # memory-mapped base files may still be open on some platforms


def _write_record(folder: Path, kind: str, base_model: str, family: str, adapter_dir: Path, info: dict[str, Any],
                  dtype: str, quantization: dict[str, Any] | None, check: str | None) -> str:
    from glmtune import __version__

    record = {"format": FORMAT_VERSION, "glmtune_version": __version__, "kind": kind, "base_model": base_model,
              "family": family, "adapter": str(adapter_dir.resolve()), "method": info["method"],
              "template": info.get("template") or "auto", "prompt_template": info.get("prompt_template"),
              "dtype": dtype, "merged_from_quantization": quantization, "check": check}
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return EXPORT_FILE
