"""Continuous batching: many answers decoded together, one token each per step, by one loaded model.

Reading the weights dominates a decoding step on a CPU or a consumer GPU, so a step for 20 sequences costs
little more than a step for one. A sequence joins the batch between steps and leaves it as soon as it ends,
so a short answer never waits for a long one.

How a sequence goes through:
- **Prefill.** Its prompt runs alone (batch of one), in chunks of `prefill_chunk` tokens, a few chunks per
  step, so a long prompt does not hold everyone's next token for seconds. Chunk boundaries depend on the
  prompt only, never on what else is running, so the numbers are the ones it would get alone. ChatGLM-6B's
  prompt attends both ways and is prefilled whole.
- **Shared head.** Prompts of one served model usually start with the same tokens (the template's head, a
  default system prompt). A sequence may say how many of its first tokens are that head: they are always
  prefilled as a chunk of their own, so their keys and values are the same numbers every time, and are then
  computed once per served model and copied into each new sequence's cache.
- **Join.** Its keys and values are joined to the batch's cache, right-aligned: every row's newest token sits
  in the last column, shorter rows are padded on the left and a padding mask hides those columns. Positions
  are each row's own, so padding changes no position. Columns that no row uses any more are cut off.
- **Decode.** One forward over all rows per step, each row feeding the token it sampled last.

Each sequence has its own sampling (temperature, top_p, repetition penalty as transformers applies them) and
its own random generator, seeded by its request: a seeded answer is the same whatever else is running.

Adapters (several served over one base):
- LoRA: every adapted layer adds each row's own adapter's update (glmtune.inference.multi_lora), so rows of
  different adapters, and of the bare base, share a batch.
- P-Tuning v2: a prefix is keys and values in front of every layer's, seen by every token, with no position.
  That is exactly what a row's cache holds when it starts with the prefix, so a P-Tuning row is a base row
  whose cache starts with its adapter's prefix, and it shares the batch with every other row.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glmtune.oom import is_out_of_memory

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per prefill forward
DEFAULT_CACHE_BYTES = 2 * 1024 ** 3  # the batch's key/value cache a server allows unless told otherwise
MAX_HEADS = 16  # shared heads kept (one per served model and head)

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [kv_heads, length, head_dim]


@dataclass(frozen=True)
class Sampling:
    """One sequence's decoding: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Route:
    """Which adapter a sequence runs under: a LoRA adapter's name among `adapters` (None: the base), or a
    P-Tuning prefix."""

    lora: str | None = None
    adapters: object | None = None  # the MultiLora holding `lora`
    prefix: KeyValues | None = None

    @property
    def prefix_length(self) -> int:
        return self.prefix[0][0].shape[1] if self.prefix else 0


BASE_ROUTE = Route()


class Sequence:
    """One answer being generated. `finished` becomes "stop" (a stop token) or "length" (max_new_tokens) when
    the batcher ends it; a caller that ends it earlier (cancelled, a stop string) calls `remove`."""

    def __init__(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 route: Route = BASE_ROUTE, owner=None, head: int = 0):
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.route = route
        self.owner = owner  # the caller's handle (the engine's job)
        # the first `head` prompt tokens are the served model's shared head (prefilled alone, cached); 0: none
        self.head = head if 0 < head < len(prompt) else 0
        self.tokens = list(prompt)  # the prompt and the answer so far: what repetition penalty looks at
        self.generated = 0
        self.finished: str | None = None
        self.random: torch.Generator | None = None
        # while prefilling: its own cache and how many prompt tokens it holds
        self.cache = None
        self.filled = 0
        self.position: torch.Tensor | None = None  # the next token's position ids: [] or [2]
        self.pending: int | None = None  # the token sampled last, fed at the next decode step
        self.alone = False  # prefill it alone (a prefill together with others ran out of memory)

    @property
    def span(self) -> int:
        """The most cache columns this sequence can take: prefix, prompt and the longest answer."""
        return self.route.prefix_length + len(self.prompt) + self.max_new_tokens


class _LinearPositions:
    """Positions count the real tokens from 0 and attention is causal: every transformers model, ChatGLM2/3.
    Models take a 2D padding mask over the cache's columns plus the new ones."""

    chunked = True

    def prefill(self, ids: list[int], start: int, end: int, columns: int, device) -> dict:
        return {"position_ids": torch.arange(start, end, device=device)[None],
                "attention_mask": torch.ones(1, columns, dtype=torch.long, device=device)}

    def first_answer_position(self, ids: list[int], device) -> torch.Tensor:
        return torch.tensor(len(ids), device=device)

    def decode(self, positions: torch.Tensor, columns: torch.Tensor) -> dict:
        return {"position_ids": positions[:, None], "attention_mask": columns.long()}

    def advance(self, positions: torch.Tensor) -> torch.Tensor:
        return positions + 1


class _ChatGLMPositions:
    """ChatGLM-6B: the context before `<sop>` attends both ways (so the prompt is prefilled whole) and answer
    tokens keep the mask token's position while their block position counts up (2D positions)."""

    chunked = False

    def __init__(self, config):
        self.config = config
        self.two_d = bool(config.position_encoding_2d)

    def _layout(self, ids: list[int], device):
        from glmtune.models.chatglm.modeling import token_layout

        tensor = torch.tensor([ids], device=device)
        return token_layout(tensor, self.config, torch.ones_like(tensor), prefer_mask=True)

    def prefill(self, ids: list[int], start: int, end: int, columns: int, device) -> dict:
        positions, allowed = self._layout(ids, device)
        prefix = columns - len(ids)
        visible = torch.ones(1, 1, len(ids), prefix, dtype=torch.bool, device=device)
        return {"position_ids": positions, "attend_mask": torch.cat((visible, allowed), dim=-1)}

    def first_answer_position(self, ids: list[int], device) -> torch.Tensor:
        positions, _ = self._layout(ids, device)
        return self.advance(positions[0, ..., -1])

    def decode(self, positions: torch.Tensor, columns: torch.Tensor) -> dict:
        return {"position_ids": positions[..., None], "attend_mask": columns[:, None, None, :]}

    def advance(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.two_d:
            return positions + 1
        step = torch.zeros_like(positions)
        step[..., 1] = 1  # the block position
        return positions + step


def _positions_for(model):
    config = model.config
    if getattr(config, "model_type", None) == "chatglm" and hasattr(config, "position_encoding_2d"):
        return _ChatGLMPositions(config)
    return _LinearPositions()


def _new_cache(config):
    """A transformers cache for one sequence. Where every layer is a plain growing one (not a sliding window's),
    its layers become `_GrowingLayer`s, which rows can be padded, joined and cut by; otherwise it stays as it is
    and the batcher answers one sequence at a time."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_growing_layer() for _ in cache.layers]
    return cache


def _joinable(cache) -> bool:
    return bool(cache.layers) and all(getattr(layer, "joinable", False) for layer in cache.layers)


def _growing_layer():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """transformers' DynamicLayer, but appending writes into spare columns instead of concatenating: the
        plain layer copies the whole batch's cache at every step. `keys` and `values` are views of the filled
        part; assigning them (joining, cutting rows) replaces the buffer."""

        joinable = True
        spare = 64  # columns allocated ahead

        def __init__(self):
            super().__init__()

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        @property
        def keys(self):
            buffer = self.__dict__.get("_keys")
            return None if buffer is None else buffer[..., :self._keys_filled, :]

        @keys.setter
        def keys(self, tensor):
            self._keys, self._keys_filled = tensor, (0 if tensor is None else tensor.shape[-2])

        @property
        def values(self):
            buffer = self.__dict__.get("_values")
            return None if buffer is None else buffer[..., :self._values_filled, :]

        @values.setter
        def values(self, tensor):
            self._values, self._values_filled = tensor, (0 if tensor is None else tensor.shape[-2])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._keys, self._keys_filled = _append(self.__dict__.get("_keys"), self._keys_filled, key_states,
                                                    self.spare)
            self._values, self._values_filled = _append(self.__dict__.get("_values"), self._values_filled,
                                                        value_states, self.spare)
            return self.keys, self.values

    return GrowingLayer()


def _append(buffer: torch.Tensor | None, filled: int, new: torch.Tensor, spare: int) -> tuple[torch.Tensor, int]:
    """Writes `new` after the first `filled` columns of `buffer` (a bigger one when it is full)."""
    end = filled + new.shape[-2]
    if buffer is None or end > buffer.shape[-2] or buffer.shape[:-2] != new.shape[:-2]:
        shape = list(new.shape)
        shape[-2] = end + spare
        grown = new.new_empty(shape)
        if buffer is not None and filled:
            grown[..., :filled, :] = buffer[..., :filled, :]
        buffer = grown
    buffer[..., filled:end, :] = new
    return buffer, end


def cache_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes in the cache, every layer together, in the model's dtype."""
    config = model.config
    width = model.get_input_embeddings().weight.element_size()
    if getattr(config, "model_type", None) == "chatglm":
        if hasattr(config, "position_encoding_2d"):  # ChatGLM-6B: every head its own keys and values
            return config.num_layers * 2 * config.hidden_size * width
        return config.num_layers * 2 * config.kv_groups * config.kv_channels * width
    from glmtune.models.prefix_attention import prefix_shape

    shape = prefix_shape(config)
    return shape.num_layers * shape.kv_heads * (shape.key_dim + shape.value_dim) * width


def default_batch_tokens(bytes_per_token: int, context_length: int | None) -> int:
    """What --max-batch-tokens is unless given: as many tokens as DEFAULT_CACHE_BYTES hold, and at least one
    full context, so that any request the model takes can run."""
    return max(DEFAULT_CACHE_BYTES // max(bytes_per_token, 1), context_length or 0)


class StepFailed(Exception):
    """A forward failed; `sequences` are the ones it ends (the others go on at the next step)."""

    def __init__(self, sequences: list[Sequence], error: BaseException):
        super().__init__(str(error))
        self.sequences, self.error = sequences, error


class ContinuousBatcher:
    """The batch: `add` sequences, call `step` repeatedly (each call returns the tokens it produced), `remove` a
    sequence to end it early. Not thread-safe: one thread (the engine's worker) drives it."""

    def __init__(self, model, *, stop_ids: set[int], max_batch: int = 32, max_tokens: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model = model
        self.config = model.config
        self.stop_ids = set(stop_ids)
        self.max_batch = max_batch
        self.max_tokens = max_tokens  # cache columns times rows, padding included; None: no limit
        self.prefill_chunk = prefill_chunk
        self.positions = _positions_for(model)
        self.joining: list[Sequence] = []  # prefilling, in arrival order
        self.running: list[Sequence] = []  # the batch's rows, in cache row order
        self.cache = None
        self.columns: torch.Tensor | None = None  # [rows, length] bool: which cache columns hold a real token
        # whether sequences' caches can be joined into one batch (not where a layer is a sliding window's):
        # known before the first sequence is admitted, since otherwise one sequence at a time
        self.joinable = _joinable(_new_cache(self.config))
        if not self.joinable:
            log.warning("this model's cache layers cannot be joined across requests; answering one at a time")
        # (route, head tokens) -> per-layer (keys, values) of the head, prefix included; a few entries at most
        self.heads: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.head_hits = 0
        self.prefilled_together = 0  # sequences whose last chunk ran with others' (one forward)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def busy(self) -> bool:
        return bool(self.joining or self.running)

    @property
    def sequences(self) -> list[Sequence]:
        return self.joining + self.running

    def reserved(self, extra: Sequence | None = None) -> int:
        """Cache tokens the batch may come to hold (rows times the longest span: the padded layout's worst
        case), counting `extra` as if it had joined."""
        live = self.sequences + ([extra] if extra is not None else [])
        return len(live) * max((s.span for s in live), default=0)

    def fits(self, sequence: Sequence) -> bool:
        """Whether `sequence` may join now (it waits otherwise)."""
        live = self.sequences
        if not live:
            return True
        if not self.joinable or len(live) >= self.max_batch:
            return False
        return self.max_tokens is None or self.reserved(sequence) <= self.max_tokens

    def add(self, sequence: Sequence) -> None:
        sampling = sequence.sampling
        if sampling.temperature > 0:
            sequence.random = torch.Generator(device=self.device)
            sequence.random.manual_seed(sampling.seed if sampling.seed is not None
                                        else int(torch.randint(0, 2 ** 62, ()).item()))
        self.joining.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        """Ends a sequence now (finished, cancelled or failed): its rows and cache go."""
        if sequence in self.joining:
            self.joining.remove(sequence)
            sequence.cache = None
        elif sequence in self.running:
            keep = [i for i, s in enumerate(self.running) if s is not sequence]
            self.running = [self.running[i] for i in keep]
            self._keep_rows(keep)

    # -- a step ------------------------------------------------------------------------------------

    def step(self, emit: Callable[[Sequence, int], None] | None = None
             ) -> tuple[list[tuple[Sequence, int]], list[StepFailed]]:
        """Prefills up to `prefill_chunk` prompt tokens (at least one chunk), then decodes one token for every
        row. Returns the (sequence, token) pairs in order, and the failed forwards: their sequences are out of
        the batch, the rest unharmed. Sequences that ended (`finished`) are out of the batch already. `emit` gets
        each pair as soon as it exists: a prefilled sequence's first token before the other prefills and the
        decoding step (time to first token); it may `remove` the sequence."""
        produced: list[tuple[Sequence, int]] = []
        emit = emit or (lambda sequence, token: None)
        failures: list[StepFailed] = []
        budget = self.prefill_chunk
        last: list[Sequence] = []  # sequences whose last chunk runs in this step, together where they can
        for sequence in list(self.joining):
            if budget <= 0:
                break
            try:
                while budget > 0 and sequence.filled < len(sequence.prompt):
                    if self._groupable(sequence):
                        last.append(sequence)
                        budget -= len(sequence.prompt) - sequence.filled
                        break
                    budget -= self._prefill_chunk(sequence)
            except StepFailed as failed:
                failures.append(failed)
                continue
            if sequence.filled == len(sequence.prompt):
                self._prefilled([sequence], sequence.cache, None, produced, emit)
        if len(last) == 1:
            try:
                self._prefill_chunk(last[0])
            except StepFailed as failed:
                failures.append(failed)
            else:
                self._prefilled(last, last[0].cache, None, produced, emit)
        elif last:
            try:
                cache, columns = self._prefill_together(last)
            except StepFailed as failed:
                failures.append(failed)
            else:
                self._prefilled(last, cache, columns, produced, emit)
        if self.running:
            try:
                decoded = self._decode()
            except StepFailed as failed:
                failures.append(failed)
            else:
                produced += decoded
                for sequence, token in decoded:
                    emit(sequence, token)
        return produced, failures

    def _prefilled(self, sequences: list[Sequence], cache, columns: torch.Tensor | None,
                   produced: list[tuple[Sequence, int]], emit: Callable[[Sequence, int], None]) -> None:
        """Sequences whose prompts are in `cache` (one row each, `columns` marking its real columns; None: all
        real) take their first token and join the batch."""
        keep = []
        for row, sequence in enumerate(sequences):
            self.joining.remove(sequence)
            sequence.cache = None
            token = self._take(sequence, sequence.pending)
            if sequence.finished is None:
                keep.append(row)
            produced.append((sequence, token))
        if keep:
            if columns is None:
                columns = torch.ones(len(sequences), cache.get_seq_length(), dtype=torch.bool, device=self.device)
            self._join_rows(cache, columns, [sequences[row] for row in keep], keep)
        for sequence in sequences:
            emit(sequence, sequence.tokens[-1])

    def _groupable(self, sequence: Sequence) -> bool:
        """Whether what is left of `sequence`'s prompt can run in one forward with other sequences' last chunks:
        one chunk, over a cache that already holds something (its head or prefix), so that its padding always
        has a real column to attend to."""
        left = len(sequence.prompt) - sequence.filled
        return (self.positions.chunked and left <= self.prefill_chunk and sequence.cache is not None
                and sequence.cache.get_seq_length() > 0 and _joinable(sequence.cache) and not sequence.alone)

    @torch.inference_mode()
    def _prefill_together(self, group: list[Sequence]) -> tuple[object, torch.Tensor]:
        """The last chunk of several prompts in one forward, so the weights are read once for all of them (a
        forward of a few tokens costs nearly as much as one of many). Each row: its cache right-aligned, then
        its chunk right-aligned, padding masked. Returns the cache and its real columns, one row per sequence."""
        device = self.device
        held = [s.cache.get_seq_length() for s in group]
        width, length = max(held), max(len(s.prompt) - s.filled for s in group)
        cache = _new_cache(self.config)
        for index, layer in enumerate(cache.layers):
            keys = torch.cat([_pad_left(s.cache.layers[index].keys, width) for s in group])
            values = torch.cat([_pad_left(s.cache.layers[index].values, width) for s in group])
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        ids = torch.zeros(len(group), length, dtype=torch.long, device=device)
        positions = torch.zeros(len(group), length, dtype=torch.long, device=device)
        columns = torch.zeros(len(group), width + length, dtype=torch.bool, device=device)
        for row, (sequence, before) in enumerate(zip(group, held)):
            chunk = sequence.prompt[sequence.filled:]
            ids[row, length - len(chunk):] = torch.tensor(chunk, device=device)
            positions[row, length - len(chunk):] = torch.arange(sequence.filled, len(sequence.prompt), device=device)
            columns[row, width - before:width] = True
            columns[row, width + length - len(chunk):] = True
        try:
            logits = self._forward(group, cache, input_ids=ids, position_ids=positions,
                                   attention_mask=columns.long())
        except Exception as e:
            if is_out_of_memory(e):  # each alone next time: smaller forwards
                for sequence in group:
                    sequence.alone = True
                raise StepFailed([], e) from e
            for sequence in group:
                self.joining.remove(sequence)
                sequence.cache = None
            raise StepFailed(group, e) from e
        self.prefilled_together += len(group)
        for row, sequence in enumerate(group):
            sequence.filled = len(sequence.prompt)
            sequence.pending = self._choose(sequence, logits[row])
            sequence.position = self.positions.first_answer_position(sequence.prompt, device)
        return cache, columns

    def _forward(self, sequences: list[Sequence], cache, **inputs) -> torch.Tensor:
        """Last-position logits [rows, vocab] in fp32 for `inputs` over `cache`, with each row's adapter."""
        adapters = next((s.route.adapters for s in sequences if s.route.adapters is not None), None)
        with adapters.batch([s.route.lora for s in sequences]) if adapters is not None else contextlib.nullcontext():
            output = self.model(past_key_values=cache, use_cache=True, logits_to_keep=1, **inputs)
        return output.logits[:, -1, :].float()

    @torch.inference_mode()
    def _prefill_chunk(self, sequence: Sequence) -> int:
        """Runs the next chunk of `sequence`'s prompt; returns its length. The last chunk samples the first token."""
        device = self.device
        prompt = sequence.prompt
        if sequence.cache is None:
            sequence.cache = _new_cache(self.config)
            for layer, (keys, values) in enumerate(sequence.route.prefix or ()):
                sequence.cache.update(keys[None], values[None], layer)
        start = sequence.filled
        end = min(len(prompt), start + self.prefill_chunk) if self.positions.chunked else len(prompt)
        head_key = None
        if start == 0 and sequence.head and self.positions.chunked:
            end = sequence.head
            head_key = (id(sequence.route), tuple(prompt[:end]))
            cached = self.heads.get(head_key)
            if cached is not None:  # the same numbers this chunk would compute: copied, not recomputed
                for layer, (keys, values) in zip(sequence.cache.layers, cached):
                    layer.lazy_initialization(keys, values)
                    layer.keys, layer.values = keys.clone(), values.clone()
                sequence.filled = end
                self.head_hits += 1
                return 0
        prefix = sequence.route.prefix_length
        inputs = self.positions.prefill(prompt, start, end, prefix + end, device)
        try:
            logits = self._forward([sequence], sequence.cache,
                                   input_ids=torch.tensor([prompt[start:end]], device=device), **inputs)
        except Exception as e:
            self.joining.remove(sequence)
            sequence.cache = None
            raise StepFailed([sequence], e) from e
        sequence.filled = end
        if head_key is not None and _joinable(sequence.cache):
            if len(self.heads) >= MAX_HEADS:
                self.heads.pop(next(iter(self.heads)))
            self.heads[head_key] = [(layer.keys.clone(), layer.values.clone()) for layer in sequence.cache.layers]
        if end == len(prompt):
            sequence.pending = self._choose(sequence, logits[0])
            sequence.position = self.positions.first_answer_position(prompt, device)
        return end - start

    @torch.inference_mode()
    def _decode(self) -> list[tuple[Sequence, int]]:
        rows = self.running
        device = self.device
        tokens = torch.tensor([[s.pending] for s in rows], device=device)
        columns = torch.cat((self.columns, torch.ones(len(rows), 1, dtype=torch.bool, device=device)), dim=1)
        positions = torch.stack([s.position for s in rows])
        length = self.columns.shape[1]
        try:
            logits = self._forward(rows, self.cache, input_ids=tokens, **self.positions.decode(positions, columns))
        except Exception as e:
            for layer in self.cache.layers:  # layers before the failure already took the new column
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
            # Out of memory: the longest sequence goes (most likely the cause) and the rest retry next step;
            # any other failure ends every row of the forward (it would fail again).
            ended = [max(rows, key=lambda s: s.span)] if is_out_of_memory(e) else list(rows)
            for sequence in ended:
                self.remove(sequence)
            raise StepFailed(ended, e) from e
        self.columns = columns
        produced = []
        for row, sequence in enumerate(rows):
            sequence.position = self.positions.advance(sequence.position)
            produced.append((sequence, self._take(sequence, self._choose(sequence, logits[row]))))
        ended = [s for s in rows if s.finished is not None]
        for sequence in ended:
            self.remove(sequence)
        return produced

    def _take(self, sequence: Sequence, token: int) -> int:
        """Records a generated token and decides whether the sequence ends with it."""
        sequence.tokens.append(token)
        sequence.generated += 1
        sequence.pending = token
        if token in self.stop_ids:
            sequence.finished = "stop"
        elif sequence.generated >= sequence.max_new_tokens:
            sequence.finished = "length"
        return token

    def _choose(self, sequence: Sequence, logits: torch.Tensor) -> int:
        """The next token from one row's logits, as transformers' generate picks it with these settings."""
        from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

        sampling = sequence.sampling
        scores = logits[None]
        ids = None
        if sampling.repetition_penalty != 1.0:
            ids = torch.tensor([sequence.tokens], device=scores.device)
            scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(ids, scores)
        if sampling.temperature <= 0:
            return int(scores[0].argmax())
        scores = TemperatureLogitsWarper(sampling.temperature)(ids, scores)
        if sampling.top_p < 1.0:
            scores = TopPLogitsWarper(sampling.top_p)(ids, scores)
        probabilities = torch.softmax(scores[0], dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=sequence.random))

    # -- the cache ---------------------------------------------------------------------------------

    def _join_rows(self, cache, columns: torch.Tensor, sequences: list[Sequence], rows: list[int]) -> None:
        """Adds rows `rows` of a prefill's cache (`columns`: their real columns) to the batch as `sequences`,
        right-aligned."""
        if len(rows) != columns.shape[0]:
            index = torch.tensor(rows, device=columns.device)
            columns = columns[index]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        if not self.running:
            self.cache, self.columns = cache, columns
            self.running = list(sequences)
            return
        length = max(self.columns.shape[1], columns.shape[1])
        self._pad_to(length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat((mine.keys, _pad_left(theirs.keys, length)), dim=0)
            mine.values = torch.cat((mine.values, _pad_left(theirs.values, length)), dim=0)
        self.columns = torch.cat((self.columns, _pad_left(columns, length, dim=1)), dim=0)
        self.running += sequences

    def _pad_to(self, length: int) -> None:
        if self.columns.shape[1] == length:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = _pad_left(layer.keys, length), _pad_left(layer.values, length)
        self.columns = _pad_left(self.columns, length, dim=1)

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.cache, self.columns = None, None
            return
        index = torch.tensor(keep, device=self.columns.device)
        columns = self.columns[index]
        first = int(columns.any(0).int().argmax())  # columns before it are padding in every row left
        self.columns = columns[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:].contiguous()
            layer.values = layer.values[index, :, first:].contiguous()


def _pad_left(tensor: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    """`tensor` with zeros in front along `dim` (the sequence axis) up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat((tensor.new_zeros(shape), tensor), dim=dim)
