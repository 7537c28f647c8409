"""Continuous batching for greedy decoding: new prompts join a batch that is already decoding.

`ContinuousDecoder(engine).run(take, deliver, max_rows)` decodes on the static KV cache where the engine does
(`continuous_static.SlotDecoder`: fixed slots, one CUDA graph replay a step), else greedily as the engine's dynamic loop does
(`InferEngine._greedy`: the model's forward over its KV cache, M-RoPE positions +1 a step, argmax of the float32
logits). Every `engine.check_every` steps it hands back the rows that ended (`deliver(key, Answer)`) and drops
them, and asks `take(free)` for at most `free` new prompts, each `(key, record, max_new_tokens)`. A new group is
prefilled on its own, then joined to the running batch: the shorter of the two KV caches and attention masks is
padded on the left (masked positions, as a left-padded prompt's are) and the group decodes with the others from
the next step. `run` returns once no row is left and `take` gives nothing.

Masked padding is not attended to, so a row's answer does not depend on the rows beside it: in float32 it is the
tokens of decoding it alone (tests/test_continuous.py). In bf16 a batch of another shape can round a near-tie the
other way, as for any batching. The server (`serve/batching.py`) runs it for greedy requests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ocrtune.models.continuous_static import SlotDecoder
from ocrtune.models.generate import InferEngine, _next_token, _select_rows
from ocrtune.models.patches.forward import prompt_embeds
from ocrtune.models.static_decode import cache_kw, cache_of, prefill_inputs


def reason(engine: InferEngine) -> str | None:
    """None when `engine` can decode continuously; otherwise why not (its requests then go in whole batches)."""
    why = engine.fast_reason()
    if why is not None:
        return why
    penalty = getattr(getattr(engine._hf_model(), "generation_config", None), "repetition_penalty", None)
    if penalty not in (None, 1.0):
        return f"generation_config.repetition_penalty={penalty}"
    return None


class ContinuousDecoder:
    def __init__(self, engine: InferEngine, min_join: int | None = None):
        """`min_join`: on the static cache, how many slots must be free before new rows join (default: an eighth)."""
        self.engine, self.min_join = engine, min_join
        self.stats = {"joins": 0, "rows": 0, "steps": 0, "max_rows": 0}

    @torch.no_grad()
    def run(self, take, deliver, max_rows: int) -> None:
        eng = self.engine
        was_training = eng.model.training
        eng.model.eval()
        try:
            if eng.static_reason() is None:  # on the static KV cache, in slots (CUDA graphs on CUDA)
                SlotDecoder(eng, self.stats, self.min_join).run(eng._hf_model(), take, deliver, max(1, max_rows))
            else:
                self._loop(eng._hf_model(), take, deliver, max(1, max_rows))
        finally:
            eng.model.train(was_training)

    def _loop(self, hf, take, deliver, max_rows: int) -> None:
        batch, step = None, 0
        while True:
            if batch is None or step % self.engine.check_every == 0:
                if batch is not None:
                    batch = self._hand_back(batch, deliver)
                free = max_rows - (batch.rows if batch is not None else 0)
                new = take(free) if free > 0 else []
                if new:
                    batch = self._join(hf, batch, new, deliver)
                if batch is None:
                    return
            try:
                batch.step(hf, self._stops)
            except Exception as e:  # the batch can't go on (out of memory, a model error): fail its rows, keep serving
                for key in batch.keys:
                    deliver(key, e)
                batch = None
                continue
            step += 1
            self.stats["steps"] += 1

    def _hand_back(self, batch: "_Batch", deliver) -> "_Batch | None":
        ended = batch.ended.nonzero().squeeze(1).tolist()
        if not ended:
            return batch
        n, limit = batch.n.tolist(), batch.limit.tolist()
        for j in ended:
            deliver(batch.keys[j], self.engine._answer(batch.tokens[j, :min(n[j], limit[j])].tolist()))
        if len(ended) == batch.rows:
            return None
        batch.select((~batch.ended).nonzero().squeeze(1))
        return batch

    def _join(self, hf, batch: "_Batch | None", new: list, deliver) -> "_Batch | None":
        self._stops = torch.tensor(self.engine.stop_ids(), device=self.engine.device)
        group = self._prefill(hf, new, deliver)
        if group is None:
            return batch
        self.stats["joins"] += 1
        self.stats["rows"] += group.rows
        if batch is None:
            joined = group
        else:
            batch.extend(group)
            joined = batch
        self.stats["max_rows"] = max(self.stats["max_rows"], joined.rows)
        return joined

    def _prefill(self, hf, new: list, deliver) -> "_Batch | None":
        """The new prompts encoded and prefilled as one left-padded group; a prompt that fails alone (an unreadable
        image) is answered with its error and the others go on."""
        eng = self.engine
        try:
            return _Batch.prefill(eng, hf, new, self._stops)
        except Exception as e:
            if len(new) == 1:
                deliver(new[0][0], e)
                return None
        groups = [self._prefill(hf, [item], deliver) for item in new]
        groups = [g for g in groups if g is not None]
        if not groups:
            return None
        for g in groups[1:]:
            groups[0].extend(g)
        return groups[0]


class _Batch:
    """The running batch: its KV cache, attention mask, last M-RoPE positions, the tokens made so far (a row ends
    at its first stop token or at its own `max_new_tokens`), and each row's key."""

    def __init__(self, cache, mask, last, tokens, n, limit, ended, prev, keys, cache_kw: str):
        self.cache, self.mask, self.last, self.cache_kw = cache, mask, last, cache_kw  # the model's cache keyword
        self.tokens, self.n, self.limit, self.ended, self.prev, self.keys = tokens, n, limit, ended, prev, keys

    @property
    def rows(self) -> int:
        return len(self.keys)

    @classmethod
    def prefill(cls, eng: InferEngine, hf, new: list, stops: torch.Tensor) -> "_Batch":
        keys, records, limits = zip(*new)
        encoded = eng._encode_all(list(records))
        batch = eng._batch(encoded)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pos = eng._positions(hf, encoded, batch)
        out = hf(**prefill_inputs(hf, batch, prompt_embeds(hf, batch)), attention_mask=mask, position_ids=pos,
                 use_cache=True)
        first = _next_token(out.logits, None, None)
        dev, rows = ids.device, ids.shape[0]
        limit = torch.tensor([max(1, int(x)) for x in limits], device=dev)
        tokens = torch.zeros((rows, int(limit.max()) + 1), dtype=torch.long, device=dev)  # + a scratch column
        tokens[:, 0] = first
        n = torch.ones(rows, dtype=torch.long, device=dev)
        return cls(cache_of(out), mask, pos[:, :, -1:], tokens, n, limit, torch.isin(first, stops) | (n >= limit),
                   first, list(keys), cache_kw(hf.forward))

    def step(self, hf, stops: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        self.last = self.last + 1
        out = hf(input_ids=self.prev[:, None], attention_mask=self.mask, position_ids=self.last, use_cache=True,
                 **{self.cache_kw: self.cache})
        self.cache = cache_of(out)
        tok = _next_token(out.logits, None, None)
        # an ended row decodes on until it is handed back; its tokens past the end go to the scratch column
        self.tokens.scatter_(1, torch.minimum(self.n, self.limit)[:, None], tok[:, None])
        self.n = self.n + 1
        self.ended = self.ended | torch.isin(tok, stops) | (self.n >= self.limit)
        self.prev = tok

    def select(self, keep: torch.Tensor) -> None:
        _select_rows(self.cache, keep)
        self.mask, self.last, self.tokens = self.mask[keep], self.last[:, keep], self.tokens[keep]
        self.n, self.limit, self.ended, self.prev = self.n[keep], self.limit[keep], self.ended[keep], self.prev[keep]
        self.keys = [self.keys[i] for i in keep.tolist()]

    def extend(self, other: "_Batch") -> None:
        """`other`'s rows appended: the shorter cache and mask padded on the left, the token buffers to one width."""
        la, lb = self.mask.shape[1], other.mask.shape[1]
        length = max(la, lb)
        layers_a, layers_b = _layers(self.cache), _layers(other.cache)
        for a, b in zip(layers_a, layers_b, strict=True):
            a.keys = torch.cat([_pad_left(a.keys, length - la), _pad_left(b.keys, length - lb)])
            a.values = torch.cat([_pad_left(a.values, length - la), _pad_left(b.values, length - lb)])
        self.mask = torch.cat([F.pad(self.mask, (length - la, 0)), F.pad(other.mask, (length - lb, 0))])
        width = max(self.tokens.shape[1], other.tokens.shape[1])
        self.tokens = torch.cat([F.pad(self.tokens, (0, width - self.tokens.shape[1])),
                                 F.pad(other.tokens, (0, width - other.tokens.shape[1]))])
        self.last = torch.cat([self.last, other.last], dim=1)
        self.n, self.limit = torch.cat([self.n, other.n]), torch.cat([self.limit, other.limit])
        self.ended, self.prev = torch.cat([self.ended, other.ended]), torch.cat([self.prev, other.prev])
        self.keys = self.keys + other.keys


def _layers(cache) -> list:
    """The per-layer key/value holders of a DynamicCache (transformers 5.x)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers):
        raise NotImplementedError(f"{type(cache).__name__} has no per-layer keys/values to join")
    return layers


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, heads, length, dim] with `n` zero positions before the first (masked: never attended to)."""
    return F.pad(x, (0, 0, n, 0)) if n else x
