"""Training on several processes: data-parallel (DDP) under torchrun, DeepSpeed ZeRO and FSDP through the
Trainer's integrations (docs/distributed.md).

torchrun (or `accelerate launch`) starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK;
every process runs the same `glmtune train` and loads the same data and model, and the Trainer splits each
global batch between them. Only the main process (global rank 0) writes the run's files; the others take
part in every collective (evaluation, checkpoints) and write nothing of glmtune's own.
`glmtune train --nproc N` starts the N processes on this machine itself (`launch`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError


def world_size() -> int:
    """Processes in this run, as torchrun / accelerate launch set it (1 outside them)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """True in the one process that writes the run's files (global rank 0; always outside torchrun)."""
    return rank() == 0


def _joined() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process arrives here (nothing outside a process group). The Trainer's arguments
    join the process group when they are built, so this works once `training_arguments` ran."""
    if _joined():
        import torch.distributed as dist

        dist.barrier()


def same_on_all_ranks(value: Any) -> Any:
    """The main process's `value` in every process (e.g. a dated default output folder, which the processes
    would otherwise each date by their own clock)."""
    if not _joined():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def gathered(model):
    """Inside the block the model's trainable tensors are whole in every process, also where DeepSpeed ZeRO-3
    or FSDP (version 2) keep them in shards between steps, so that an adapter can be written from them.
    Gathering is a collective: every process must enter. Elsewhere (one process, DDP, ZeRO-1/2) nothing
    happens."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    swapped = []
    if world_size() > 1:
        import torch
        from torch.distributed.tensor import DTensor

        # FSDP2 holds each parameter as a DTensor shard: stand a whole copy in for it (all-gathered in the same
        # order in every process), and put the shard back afterwards.
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and isinstance(p, DTensor):
                    swapped.append((module, name, p))
        for module, name, p in swapped:
            module._parameters[name] = torch.nn.Parameter(p.full_tensor().detach().clone())
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def parameter_count(parameter) -> int:
    """Elements of a parameter, also of a ZeRO-3 partitioned one (whose own tensor is empty)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def check_deepspeed(path: str) -> None:
    """A DeepSpeed config must exist, be a JSON object, and deepspeed must be importable: said before anything
    is loaded or written, not by a traceback from inside the Trainer."""
    from glmtune.files import read_json_object, status

    p = Path(path)
    if status(p) is None:
        raise GlmtuneError(f"deepspeed config not found: {p} (examples/deepspeed_zero2.json and "
                           "examples/deepspeed_zero3_offload.json are ready-made ones)")
    try:
        read_json_object(p, "deepspeed config")
    except GlmtuneError as e:
        raise GlmtuneError(f"deepspeed config {e}") from None
    if importlib.util.find_spec("deepspeed") is None:
        raise GlmtuneError("--deepspeed needs the deepspeed package, which is not installed: pip install deepspeed "
                           "(on a machine with CUDA GPUs; see docs/distributed.md)")


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without `--nproc N` / `--nproc=N` (what every launched process runs)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            out.append(word)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m glmtune ARGV` in `nproc` processes on this machine through torchrun's own launcher
    (standalone rendezvous on a free local port). Their output goes straight to this terminal. Returns 0 when
    all succeed, 2 when the processes failed with glmtune's usage errors (exit 2), else the first failure's
    exit code."""
    if world_size() > 1:
        raise GlmtuneError("--nproc starts the processes itself; under torchrun or accelerate launch leave it out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import config_from_args, elastic_launch, get_args_parser

    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # glmtune reports failures itself
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1; on the CPU the processes share the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # torchrun --standalone: a rendezvous of this machine alone, on a free port
    parsed = get_args_parser().parse_args(["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                                           "--rdzv-endpoint", "localhost:0", "--rdzv-id", str(uuid.uuid4()),
                                           "-m", "glmtune", *argv])
    config, cmd, cmd_args = config_from_args(parsed)
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        failed = [c for c in codes if c > 0]  # the rest were stopped by the launcher (negative: a signal)
        if failed and all(c == 2 for c in failed):
            return 2
        print(f"glmtune: training failed: exit codes of the processes by rank: {codes}", file=sys.stderr)
        return failed[0] if failed else 1
    return 0
