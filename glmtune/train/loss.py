"""Causal-LM loss that projects to the vocabulary only where a label exists, a chunk at a time.

A causal LM computes logits (batch x sequence x vocabulary, in float32) at every position, although
only answer positions carry labels; the prompt's logits are thrown away. Here the decoder runs once,
the hidden states of labelled positions are gathered, and only those go through the output layer, a
few hundred rows at a time, so no [tokens, vocabulary] float32 tensor exists at once (for ChatGLM-6B's
130,528-word vocabulary one row is half a megabyte). With a frozen output layer the gradient for the
hidden states is computed chunk by chunk during the forward pass and kept ([tokens, hidden], small);
a trainable output layer gets its chunks recomputed in the backward pass instead.
The result equals the model's own loss; for architectures that change logits after the output layer
(soft-capping, scaling) that would not hold, so the first batch is checked against the model's own
loss and the plain path is used where they disagree.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from transformers import Trainer

from glmtune.data.collate import REAL_TOKENS, SAMPLE_LENGTHS
from glmtune.data.preprocess import IGNORE_INDEX
from glmtune.train.checkpoints import AtomicCheckpoints
from glmtune.train.neftune import EmbeddingNoise

log = logging.getLogger(__name__)


def _parts(model):
    """(decoder, output layer) of a causal LM, looking through a peft wrapper; None where unknown."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


LOGIT_CHUNK_ELEMENTS = 1 << 23  # float32 logits per chunk: 32 MiB


def chunk_rows(vocab_size: int) -> int:
    return max(1, LOGIT_CHUNK_ELEMENTS // vocab_size)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, for a frozen, bias-free output layer.
    The softmax gradient is turned into the hidden states' gradient chunk by chunk while the logits are
    at hand, so the backward pass only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            logits = (hidden[start:start + rows] @ weight.T).float()
            picked = targets[start:start + rows]
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, picked[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(norm[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(picked), device=probs.device), picked] -= 1.0
                grad[start:start + rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of cross_entropy(head(hidden), targets), never holding more than one chunk of logits."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else head.out_features
    rows = chunk_rows(vocab)
    if type(head) is torch.nn.Linear and head.bias is None and not weight.requires_grad:
        return _FrozenHeadCrossEntropy.apply(hidden, weight, targets, rows)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        part = (head, hidden[start:start + rows], targets[start:start + rows])
        grad_needed = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
        total = total + (checkpoint(_chunk_loss, *part, use_reentrant=False) if grad_needed else _chunk_loss(*part))
    return total


def labelled_loss_sum(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies over labelled positions, number of those positions)."""
    decoder, head = _parts(model)
    labels = inputs["labels"]
    features = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**features, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return chunked_cross_entropy(head, hidden[:, :-1][keep], targets[keep]), keep.sum()


def labelled_positions_loss(model, inputs: dict[str, torch.Tensor], num_items: int | torch.Tensor | None = None):
    """Mean token cross-entropy over labelled positions (divided by `num_items` when given)."""
    total, count = labelled_loss_sum(model, inputs)
    return total / (num_items if num_items is not None else count.clamp(min=1))


def model_inputs(batch: dict) -> dict:
    """The batch without glmtune's own bookkeeping (real-token count, sample lengths), as the model takes it."""
    return {k: v for k, v in batch.items() if k not in (REAL_TOKENS, SAMPLE_LENGTHS)}


class LabelledLossTrainer(AtomicCheckpoints, Trainer):
    """The Trainer with `labelled_positions_loss`, after one check that it equals the model's own loss.
    `labelled_logits=False` keeps the model's own loss (logits at every position), for comparisons.
    Checkpoints are written atomically (glmtune.train.checkpoints)."""

    def __init__(self, *args, answer_metrics=None, labelled_logits: bool = True, eval_collator=None,
                 loraplus_lr_ratio: float | None = None, neftune_noise_alpha: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        # glmtune's NEFTune, not the Trainer's (whose scale would count a padding-free row as one sample)
        self.embedding_noise = EmbeddingNoise(self.model, neftune_noise_alpha) if neftune_noise_alpha else None
        self.eval_collator = eval_collator  # evaluation batches' own collator; default the training one
        self.batch_tokens = {"real": 0, "in_batches": 0}  # this process's training batches, padding included
        # DeepSpeed ZeRO and FSDP hold the weights sharded and gather each module's in its forward: the output
        # layer's weight, read directly here, would be a shard. They keep the model's own loss.
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        self.fast_loss: bool | None = None if labelled_logits and not sharded and _parts(self.model) else False
        self.answer_metrics = answer_metrics  # callable(model) -> {name: value}, from answers to dev prompts

    def _track_num_input_tokens(self, inputs):
        """Tokens seen are the real ones the collator counted: with packed rows neither an attention mask
        nor the pad token tells them apart. Real and batch tokens are also added up for the padding share."""
        if REAL_TOKENS not in inputs:
            return super()._track_num_input_tokens(inputs)
        self.batch_tokens["real"] += int(inputs[REAL_TOKENS])
        self.batch_tokens["in_batches"] += inputs["input_ids"].numel()
        count = torch.as_tensor(inputs[REAL_TOKENS], device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()

    def padding_share(self) -> float | None:
        """The share of this process's training batch tokens that were padding; None before any batch."""
        total = self.batch_tokens["in_batches"]
        return 1 - self.batch_tokens["real"] / total if total else None

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        training_collator, self.data_collator = self.data_collator, self.eval_collator
        try:  # the loader keeps the collator it was built with
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A plain model that trains a few of its tensors (P-Tuning v2) checkpoints only those: a 6B base
        is not copied into every checkpoint. Resuming loads them over the same base (non-strictly)."""
        from peft import PeftModel
        from safetensors.torch import save_file

        model = self.accelerator.unwrap_model(self.model)
        params = dict(model.named_parameters())
        trained = {n: p.detach().cpu().contiguous() for n, p in params.items() if p.requires_grad}
        if isinstance(model, PeftModel) or state_dict is not None or len(trained) == len(params):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_file(trained, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})

    def create_optimizer(self, model=None):
        """LoRA+: peft's optimizer with B's learning rate loraplus_lr_ratio times A's, of the optimizer class and
        settings the Trainer would use."""
        if self.loraplus_lr_ratio and self.optimizer is None:
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
            self.optimizer = create_loraplus_optimizer(self.model, optimizer_cls, lr=self.args.learning_rate,
                                                       loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                       loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return super().create_optimizer(model)

    def _check_fast_loss(self, model, inputs) -> bool:
        # two rows are enough, unless the batch says where its samples start (those offsets span every row)
        sample = inputs if "cu_seq_lens_q" in inputs else {k: v[:2] for k, v in inputs.items()}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            reference = model(**sample).loss
            ours = labelled_positions_loss(model, sample)
        model.train(was_training)
        same = bool(torch.isfinite(reference)) and torch.allclose(ours.float(), reference.float(), rtol=1e-3, atol=1e-3)
        if not same:
            log.info("this model changes logits after its output layer; computing logits at every position")
        return same

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.embedding_noise is not None:
            self.embedding_noise.take_lengths(inputs)
        inputs = model_inputs(inputs)
        # A wrapper (DDP, DeepSpeed, FSDP, DataParallel) does its work in its own forward (DDP arms its
        # gradient all-reduce there): running the decoder inside it directly would skip that, so a wrapped
        # model trains through its forward and the model's own loss.
        wrapped = model is not self.model
        if self.fast_loss is None and not wrapped:
            self.fast_loss = self._check_fast_loss(model, inputs)
        # Logits are needed only by a compute_metrics function (glmtune evaluates by generating instead).
        if wrapped or not self.fast_loss or (return_outputs and self.compute_metrics is not None):
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = labelled_positions_loss(model, inputs, num_items_in_batch)
        # Normalised by the whole accumulated batch's label count, the loss needs no division by the
        # accumulation steps; across processes the count is global, and DDP averages the gradients.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def _without_repeats(self, batch: dict) -> tuple[dict, int]:
        """(the batch without the rows that only pad the processes' last batches to one size, 1), or the batch and
        0 where all its rows are such repeats (still computed: sharded models run their collectives in every
        forward). With several processes accelerate repeats dev samples so that every process gets full
        batches; the first `remainder` rows of the last batches, in process order, are the real ones."""
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return batch, 1
        rows = len(batch["labels"])
        keep = min(max(state.remainder - self.accelerator.process_index * rows, 0), rows)
        if keep == 0:
            return batch, 0
        return {k: v[:keep] if torch.is_tensor(v) and v.dim() and len(v) == rows else v for k, v in batch.items()}, 1

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Eval loss as one number with one meaning: mean cross-entropy per answer token over the whole
        dev set (the Trainer's own averages per-batch means, which shifts with batch composition)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        started = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        count = torch.zeros((), dtype=torch.int64, device=self.args.device)
        with torch.no_grad():
            for batch in self.get_eval_dataloader(dataset):
                batch = model_inputs(self._prepare_inputs(batch))
                batch, counted = self._without_repeats(batch)
                if self.fast_loss is None:
                    self.fast_loss = self._check_fast_loss(model, batch)
                with self.compute_loss_context_manager():
                    if self.fast_loss is False:
                        outputs = model(**batch)
                        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                        batch_sum, batch_count = outputs.loss.float() * n, n
                    else:
                        batch_sum, batch_count = labelled_loss_sum(model, batch)
                total += batch_sum.double() * counted
                count += batch_count * counted
        model.train(was_training)
        # Each process evaluated its shard of the dev set: add the shards up.
        total = self.accelerator.reduce(total, reduction="sum")
        count = self.accelerator.reduce(count, reduction="sum")
        runtime = time.perf_counter() - started
        metrics = {f"{metric_key_prefix}_loss": float(total) / max(int(count), 1),
                   f"{metric_key_prefix}_runtime": round(runtime, 3), f"{metric_key_prefix}_tokens": int(count)}
        if self.answer_metrics is not None:
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.answer_metrics(model).items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
