"""Continuous batching on the static KV cache: a fixed number of slots, each decoding step one CUDA graph replay.

`ContinuousDecoder` (continuous.py) runs `SlotDecoder` where its engine decodes on the static cache
(`InferEngine.static_reason()` is None: on CUDA by default). Every slot is a row of the static decoder's step
(`static_decode.Step`): all rows write their token's keys and values at one shared cache column, which moves one
to the right a step. A prompt joins a free slot between steps: prefilled (in parts of similar length, as the
static decoder's batches are), its keys and values copied into the columns just left of the current one, and its
slot's attention mask opened on those columns only, so nothing its slot held before is attended to. A row ends at
its first stop token or its own `max_new_tokens` (checked every `check_every` steps, one host sync) and its slot is
free at once; a free slot decodes tokens nobody reads (it attends at least to its own token, so never a NaN).

When a joining prompt does not fit left of the current column, or its answer right of it, the cache is rebuilt
(`_Slots.grow`): a longer one, the live rows' columns copied to the same place left of its current column, the step
captured again. Its length leaves room for one more answer of the longest `max_new_tokens` seen, so a server running
for hours rebuilds about once per answer's length of steps, not per request; where that room does not fit the card,
the cache is made exactly as long as the rows need, and if that does not fit either, the joining rows fail with the
out-of-memory error while the rows already decoding go on.

In float32 a row's answer is the tokens of decoding it alone (tests/test_continuous.py, on the CPU, where the step
runs eagerly)."""
from __future__ import annotations

import logging

import torch

from ocrtune.models import static_decode
from ocrtune.models.patches.forward import prompt_embeds

log = logging.getLogger("ocrtune")


class SlotDecoder:
    """Decodes the rows `take` hands it in at most `slots` slots, handing each answer to `deliver` as it ends.
    New rows are taken once `min_join` slots are free (default: an eighth of them) or none is live: a join costs a
    prefill forward and its bookkeeping, several decoding steps' worth on a small model, so rows join in groups."""

    def __init__(self, engine, stats: dict, min_join: int | None = None):
        self.engine, self.stats, self.min_join = engine, stats, min_join
        self.graphs = engine.cuda_graphs

    def run(self, hf, take, deliver, slots: int) -> None:
        state: _Slots | None = None
        step, check = 0, True
        try:
            while True:
                if check or step % self.engine.check_every == 0:
                    check = False
                    if state is not None:
                        state.hand_back(deliver)
                    live = state.live if state is not None else 0
                    free = slots - live
                    group = self.min_join if self.min_join is not None else max(1, slots // 8)
                    new = take(free) if free > 0 and (free >= group or live == 0) else []
                    if new:
                        state = state or _Slots(self.engine, hf, slots, self.graphs, self.stats)
                        state.join(new, deliver)
                    if state is None or state.live == 0:
                        if new:  # every new row failed to join: ask again
                            check = True
                            continue
                        return
                try:
                    state.step()
                except static_decode.GraphCaptureError as e:  # the warm-up step ran, its capture failed: decode on eagerly
                    log.warning("continuous batching: capturing the decoding step failed (%s); decoding it eagerly", e)
                    self.graphs = state.graphs = False
                    state.runner = static_decode.Replayer(state.step_fn, state.device, False, self.stats)
                    state.col += 1
                except Exception as e:  # the batch can't go on (out of memory, a model error): fail its rows
                    state.fail(deliver, e)
                    state, check = None, True
                    continue
                step += 1
                self.stats["steps"] += 1
        finally:
            if state is not None:
                state.close()


class _Slots:
    """The static cache, the step over it, and which row each slot holds (host-side bookkeeping)."""

    def __init__(self, engine, hf, slots: int, graphs: bool, stats: dict):
        self.engine, self.hf, self.rows, self.graphs, self.stats = engine, hf, slots, graphs, stats
        self.device = engine.device
        self.stops = torch.tensor(engine.stop_ids(), device=self.device)
        self.keys: list = [None] * slots  # the request key each slot holds (None: free)
        self.first_col = [0] * slots  # each live row's first prompt column
        self.start = torch.zeros(slots, dtype=torch.long, device=self.device)  # column of each row's first token
        self.limit = torch.ones(slots, dtype=torch.long, device=self.device)  # each row's max_new_tokens
        self.longest_answer = 1
        self.cache = self.step_fn = self.runner = None
        self.col, self.length = 0, 0  # the column the next step writes; the cache's length

    @property
    def live(self) -> int:
        return sum(k is not None for k in self.keys)

    # ------------------------------------------------------------------ joining

    def join(self, new: list, deliver) -> None:
        """Prefill `new` ((key, record, max_new_tokens) each) into free slots; a prompt that fails to encode, or a
        group that can't be prefilled, is answered with its error."""
        eng = self.engine
        try:  # by the encoding threads; one by one only where one fails
            encoded = eng._encode_all([record for _, record, _ in new])
            items = [(key, max(1, int(limit))) for key, _, limit in new]
        except Exception:
            items, encoded = [], []
            for key, record, limit in new:
                try:
                    encoded.append(eng._encode_all([record])[0])
                    items.append((key, max(1, int(limit))))
                except Exception as e:
                    deliver(key, e)
        if not items:
            return
        try:
            self._prefill(items, encoded)
        except Exception as e:  # out of memory for a longer cache, a prompt the model refuses: these rows fail
            for key, _ in items:
                deliver(key, e)
            return
        self.stats["joins"] += 1
        self.stats["rows"] += len(items)
        self.stats["max_rows"] = max(self.stats["max_rows"], self.live)

    def _prefill(self, items: list, encoded: list) -> None:
        eng, hf = self.engine, self.hf
        batch = eng._batch(encoded)
        positions = eng._positions(hf, encoded, batch)
        plen = batch["input_ids"].shape[1]
        limits = [limit for _, limit in items]
        self.longest_answer = max(self.longest_answer, *limits)
        if self.cache is None or plen > self.col or self.col + max(limits) > self.length:
            self.grow(plen, max(limits))
        free = [i for i, k in enumerate(self.keys) if k is None][:len(items)]
        slots = torch.tensor(free, device=self.device)
        c = self.col
        first = static_decode.prefill_rows(hf, self.cache, batch, positions, prompt_embeds(hf, batch), slots, c,
                                           self.stats)
        static_decode.set_length(self.cache, c)  # the next step writes at column c (a new cache starts at 0)
        step = self.step_fn
        step.open[slots] = False
        step.open[slots, 0, 0, c - plen:c] = batch["attention_mask"].bool()
        step.pos[:, slots] = positions[:, :, -1:]
        step.tok[slots, 0] = first
        step.gen[slots, c] = first
        self.start[slots] = c
        self.limit[slots] = torch.tensor(limits, device=self.device)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for slot, (key, _), n in zip(free, items, lengths):
            self.keys[slot], self.first_col[slot] = key, c - int(n)

    def grow(self, prompt: int, answer: int) -> None:
        """A new cache (and step) with room for a prompt of `prompt` tokens left of the current column and an answer of
        `answer` tokens right of it: the live rows' columns are copied to the same place left of the new current
        column, and the step is captured again at the next call."""
        span = max((self.col - f for k, f in zip(self.keys, self.first_col) if k is not None), default=0)
        col = max(span, prompt)
        left = max((int(lim) - (self.col - int(s)) for k, s, lim in zip(self.keys, self.start.tolist(),
                                                                        self.limit.tolist()) if k is not None), default=0)
        need = col + max(answer, left)
        try:
            cache, step, length = self._build(need + self.longest_answer, col, span)
        except torch.OutOfMemoryError:
            cache = step = None
            self.longest_answer = answer  # the spare room asked for was too much: later rebuilds ask for less
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cache, step, length = self._build(need, col, span)
        if self.runner is not None:
            self.runner.close()
        shift = col - self.col
        self.first_col = [f + shift for f in self.first_col]
        self.start += shift
        self.cache, self.step_fn, self.col, self.length = cache, step, col, length
        self.runner = static_decode.Replayer(step, self.device, self.graphs, self.stats)
        self.stats["rebuilds"] = self.stats.get("rebuilds", 0) + 1

    def _build(self, length: int, col: int, span: int) -> tuple:
        """A cache of `length` columns and its step, the next token at `col`, the live rows' `span` columns moved in."""
        from transformers import StaticCache
        cache = StaticCache(config=self.hf.config, max_cache_len=length)
        # allocated here, where running out of memory can still be answered with a shorter cache
        static_decode.allocate(self.hf, cache, self.rows, self.device)
        gen = torch.zeros((self.rows, length + 1), dtype=torch.long, device=self.device)
        step = static_decode.Step(self.hf, cache, static_decode.cache_kw(self.hf.model.language_model.forward),
                                  torch.zeros((self.rows, col), dtype=torch.long, device=self.device),
                                  torch.zeros((3, self.rows, 1), dtype=torch.long, device=self.device), gen, length,
                                  col=col + 1)
        if self.cache is not None and span:
            self._move(cache, step, span, col)
        return cache, step, length

    def _move(self, cache, step, span: int, col: int) -> None:
        """The old cache's last `span` columns before its current one, into the new cache before `col`."""
        old, src, dst = self.step_fn, slice(self.col - span, self.col), slice(col - span, col)
        for new_layer, layer in zip(cache.layers, self.cache.layers):  # both allocated when built
            new_layer.keys[:, :, dst] = layer.keys[:, :, src]
            new_layer.values[:, :, dst] = layer.values[:, :, src]
        static_decode.set_length(cache, col)
        step.open[..., dst] = old.open[..., src]
        step.gen[:, col - span:col + 1] = old.gen[:, self.col - span:self.col + 1]
        step.pos.copy_(old.pos)
        step.tok.copy_(old.tok)

    # ------------------------------------------------------------------ decoding

    def step(self) -> None:
        if self.col >= self.length:  # the rows still held all ended (each answer had room): not handed back yet
            self.grow(0, 1)
        self.runner()
        self.col += 1

    def hand_back(self, deliver) -> None:
        """Answer the rows that ended (a stop token among their tokens so far, or max_new_tokens reached)."""
        live = torch.tensor([k is not None for k in self.keys], device=self.device)
        if not bool(live.any()):
            return
        gen = self.step_fn.gen
        cols = torch.arange(gen.shape[1], device=self.device)
        made = (cols >= self.start[:, None]) & (cols <= self.col)
        ended = live & (((torch.isin(gen, self.stops) & made).any(dim=1)) | (self.col - self.start + 1 >= self.limit))
        slots = ended.nonzero().squeeze(1).tolist()
        if not slots:
            return
        start, limit = self.start.tolist(), self.limit.tolist()
        rows = gen[slots].tolist()
        for slot, row in zip(slots, rows):
            n = min(self.col - start[slot] + 1, limit[slot])
            deliver(self.keys[slot], self.engine._answer(row[start[slot]:start[slot] + n]))
            self.keys[slot] = None

    def fail(self, deliver, error: BaseException) -> None:
        for slot, key in enumerate(self.keys):
            if key is not None:
                deliver(key, error)
                self.keys[slot] = None
        self.close()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
