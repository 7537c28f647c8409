"""Generation: batched greedy/sampled/beam decoding and token streaming over a model + template.

It lives in the `models` layer so that training (`--predict_with_generate`), `infer` and `serve` all use it
(`serve` through its `Engine` protocol, ocrtune/serve/engine.py).
The device/dtype choice is `ocrtune.models.dtypes`.

The fast path, used by `ocrtune eval`, dataset-mode `infer`, `serve`'s batcher and
evaluation during training:

* `iter_answers`/`answer_rows` sort the rows by prompt length (image tokens + text, estimated from
  the image headers) so a batch holds little padding, and hand the answers back by row index;
* the prompts of the next batches are encoded (image decode + image processor + tokenizer) by a
  thread pool while the model generates the current batch;
* greedy decoding runs `_greedy`: a loop over the model's forward with its KV cache that drops rows
  once they emitted a stop token (the cache, attention mask, M-RoPE positions and prompt ids of the
  rows left are index-selected), and checks for finished rows every `check_every` steps only (one
  host sync per check; tokens after a row's stop token are cut off, they never change other rows).
  It feeds the model exactly what `model.generate` feeds it (3D M-RoPE positions from the model's
  own `get_rope_index`, positions +1 per step, `logits_to_keep=1` in the prefill, argmax over the
  float32 logits, the generation config's repetition penalty), so greedy outputs are the same tokens.
  Sampling, beam search, sharded models (`synced_gpus`), and generation configs with logits
  processors it does not reproduce use `model.generate`;
* on CUDA (`decode="auto"`, or `"static"` anywhere) greedy batches decode on a static KV cache instead, each
  token one CUDA graph replay (`ocrtune.models.static_decode`), the prompts' prefill in parts of similar length:
  no row dropping (rows that ended decode on until all have), no repetition penalty; `static_reason` says why a
  batch can't. Its cache holds prompt + max_new_tokens for every row from the start: a batch it can't fit decodes
  on the dynamic loop.
* every greedy path takes the prompts' M-RoPE positions made on the host by the encoding threads and, on a
  prepared Qwen2-VL model, their embeddings from `patches.forward.prompt_embeds` (the ViT's position ids made on
  the host, its attention one varlen call per block on CUDA).
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from ocrtune.data.images import image_size, open_image
from ocrtune.models import static_decode
from ocrtune.models.patches.forward import prompt_embeds
from ocrtune.models.static_decode import cache_of
from ocrtune.models.template import Template

log = logging.getLogger("ocrtune")

# generation-config fields whose non-default values add logits processors `_greedy` does not
# reproduce: such a model decodes through `model.generate` (repetition_penalty is reproduced)
_UNSUPPORTED_PROCESSORS = {"no_repeat_ngram_size": (None, 0), "encoder_repetition_penalty": (None, 1.0),
                           "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                           "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                           "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
                           "exponential_decay_length_penalty": (None,), "stop_strings": (None,),
                           "encoder_no_repeat_ngram_size": (None, 0), "epsilon_cutoff": (None, 0.0)}


def _is_image(x) -> bool:
    return hasattr(x, "size") and hasattr(x, "convert") and not isinstance(x, dict)


def default_workers() -> int:
    """Threads that encode prompts ahead of the model: the cores, at most 8 (image decode and the
    image processor release the GIL for most of their time)."""
    return max(1, min(8, (os.cpu_count() or 2)))


class _StopOnEvent:
    """A stopping criterion that ends generation when `event` is set (Ctrl-C while streaming)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Answer:
    text: str
    tokens: int  # tokens generated, the stop token included (what OpenAI's completion_tokens counts)
    finish_reason: str  # "stop": the model ended the answer; "length": max_new_tokens cut it
    ids: tuple[int, ...] = ()  # the generated token ids up to and including the stop token (what GRPO trains on)


class InferEngine:
    """Generation over a model + template. `fast=False` decodes every batch with `model.generate`
    (no row dropping); `workers` threads encode prompts ahead of the model (0: encode inline);
    `check_every` is how many decoding steps pass between checks for finished rows. `compile=True`
    (CUDA only, experimental, off by default) decodes greedy batches with `generate` over a static KV
    cache, which transformers compiles (CUDA graphs); prompts are then left-padded to a multiple of
    64 tokens so few shapes are compiled. It pays only when many batches follow the compilation; on
    the CPU the flag is ignored.
    `decode` picks the greedy loop of the fast path: "static" (static KV cache, the step replayed as a
    CUDA graph on CUDA, run eagerly on the CPU; `cuda_graphs=False` runs it eagerly on CUDA too),
    "dynamic" (`_greedy`, which drops finished rows), or "auto": static on CUDA, dynamic on the CPU (where
    there are no graphs to replay and dropping rows pays)."""

    DECODES = ("auto", "static", "dynamic")

    def __init__(self, model, processor, template: Template, fast: bool = True, workers: int | None = None,
                 check_every: int = 4, compile: bool = False, decode: str = "auto", cuda_graphs: bool = True):
        if decode not in self.DECODES:
            raise ValueError(f"decode must be one of {self.DECODES}, got {decode!r}")
        self.model, self.processor, self.template = model, processor, template
        self.tokenizer = processor.tokenizer
        self.fast, self.check_every, self.compile = fast, max(1, check_every), compile
        self.decode_mode, self.cuda_graphs = decode, cuda_graphs
        self._static_off: str | None = None  # why the static decoder failed on this model (set once, logged once)
        self._static_failed: str | None = None  # its failure on the batch in hand, until another path decodes it
        self.workers = default_workers() if workers is None else max(0, workers)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._fast_off: str | None = None  # why the fast loop is off for this model (set once, logged once)
        self._length_cache: dict = {}
        self.last_path: str | None = None  # how the last batch was decoded: static-graph, static, fast, generate
        self.stats = {"fast_batches": 0, "generate_batches": 0, "rows_dropped_early": 0, "static_batches": 0,
                      "static_steps": 0, "graph_replays": 0, "static_oom": 0}

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- prompts

    def encode_prompt(self, record: dict) -> dict:
        """One record's prompt (all messages but a final assistant reply), encoded for generation.
        Raises BadImage for an unusable image."""
        images = [im if _is_image(im) else open_image(im) for im in record.get("images") or []]
        enc = self.template.encode(_prompt(record), images, add_generation_prompt=True)
        enc["positions"] = self.row_positions(enc)
        return enc

    def row_positions(self, enc: dict) -> torch.Tensor | None:
        """One encoded prompt's [3, length] M-RoPE positions, made on the host (by the encoding threads, ahead of
        the model): what `_prompt_positions` gives its row in a left-padded batch. None for other model families."""
        hf = self._hf_model()
        if not hasattr(getattr(hf, "model", None), "get_rope_index") or "mm_token_type_ids" not in enc:
            return None
        ids = torch.as_tensor(enc["input_ids"])[None]
        row = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "mm_token_type_ids": torch.as_tensor(enc["mm_token_type_ids"])[None]}
        if "image_grid_thw" in enc:
            row["image_grid_thw"] = enc["image_grid_thw"]
        try:
            return self._prompt_positions(hf, row)[:, 0]
        except Exception:  # noqa: BLE001  the batch's positions are then made the model's way, whose error is the one to see
            return None

    def prompt_length(self, record: dict) -> int:
        """The prompt's token count (images included) from the image headers alone, for sorting rows
        by length; 0 where it can't be told cheaply (URLs, unreadable images: encoding reports those)."""
        try:
            sizes = []
            for im in record.get("images") or []:
                if _is_image(im):
                    sizes.append(im.size)
                else:
                    path = im if isinstance(im, str) else (im.get("path") if isinstance(im, dict) else None)
                    if isinstance(path, str) and path.startswith(("http://", "https://")) and not (
                            isinstance(im, dict) and im.get("bytes")):
                        return 0  # never fetch a URL twice just to sort
                    sizes.append(image_size(im))
            msgs = _prompt(record)
            counts = tuple(self.template.image_token_count(w, h) for w, h in sizes)
            key = (tuple((m["role"], m["content"]) for m in msgs), counts)
            if key not in self._length_cache:
                if len(self._length_cache) > 100_000:
                    self._length_cache.clear()
                self._length_cache[key] = self.template.token_count(msgs, list(sizes))
            return self._length_cache[key]
        except Exception:
            return 0

    def _executor(self) -> ThreadPoolExecutor | None:
        if self.workers <= 0:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ocrtune-encode")
            return self._pool

    def close(self) -> None:
        """Stop the encoding threads (they also end with the process)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _encode_all(self, records: list[dict]) -> list[dict]:
        """Encoded prompts of `records` (already encoded ones pass through), in parallel when there are
        several; the first failing record's exception is raised."""
        todo = [i for i, r in enumerate(records) if "input_ids" not in r]
        pool = self._executor() if len(todo) > 1 else None
        out = list(records)
        if pool is None:
            for i in todo:
                out[i] = self.encode_prompt(records[i])
            return out
        futures = {i: pool.submit(self.encode_prompt, records[i]) for i in todo}
        for i in todo:
            out[i] = futures[i].result()
        return out

    def _positions(self, hf, encoded: list[dict], batch: dict) -> torch.Tensor:
        """[3, rows, length] M-RoPE positions of `batch` (the left-padded `encoded`): the rows' own, made on the
        host when they were encoded, left-padded with 1 (a padded slot's position is never attended to); else
        the model's get_rope_index over the batch on the device."""
        rows = [e.get("positions") for e in encoded]
        if any(r is None for r in rows):
            return self._prompt_positions(hf, batch)
        n = batch["input_ids"].shape[1]
        pos = torch.ones((3, len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            pos[:, i, n - r.shape[1]:] = r
        if batch["input_ids"].is_cuda:
            return pos.pin_memory().to(batch["input_ids"].device, non_blocking=True)
        return pos.to(batch["input_ids"].device)

    def _batch(self, records: list[dict]) -> dict:
        """Left-padded prompts (generation appends on the right)."""
        encoded = self._encode_all(records)
        n = max(len(e["input_ids"]) for e in encoded)
        if self._compiled():
            n = -(-n // 64) * 64  # few distinct shapes for the compiled static-cache decoding
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), n), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), n), dtype=torch.long)
        types = torch.zeros((len(encoded), n), dtype=torch.long)
        for i, e in enumerate(encoded):
            k = len(e["input_ids"])
            ids[i, n - k:] = torch.as_tensor(e["input_ids"])
            types[i, n - k:] = torch.as_tensor(e["mm_token_type_ids"])
            mask[i, n - k:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
        vis = [e for e in encoded if "pixel_values" in e]
        if vis:
            dtype = next(self.model.parameters()).dtype
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in vis]).to(dtype)
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in vis])
        device = self.device
        if device.type == "cuda":
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(device) for k, v in batch.items()}

    # ---------------------------------------------------------------- settings

    def stop_ids(self) -> list[int]:
        ids = [self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.pad_token_id]
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for i in ([gen] if isinstance(gen, int) else (gen or [])):
            if i not in ids:
                ids.append(i)
        return [i for i in ids if i is not None]

    def _gen_kwargs(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1) -> dict:
        kw = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "pad_token_id": self.tokenizer.pad_token_id,
              "eos_token_id": self.stop_ids()}
        if temperature and temperature > 0:
            # a sampled image/video placeholder would read as an image with no pixels where the answer is fed back
            # (GRPO's training forward, a chat's next turn); greedy decoding is left exactly as generate's
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                      suppress_tokens=self.vision_token_ids() or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def vision_token_ids(self) -> list[int]:
        cfg = getattr(self._hf_model(), "config", None)
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return [i for i in (getattr(cfg, n, None) for n in names) if isinstance(i, int)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _hf_model(self):
        """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so its
        forward runs the adapter too)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def fast_reason(self, temperature: float | None = 0.0, num_beams: int = 1) -> str | None:
        """None when greedy decoding can use `_greedy`; otherwise why `model.generate` is used."""
        if not self.fast:
            return "fast=False"
        if temperature and temperature > 0:
            return "sampling"
        if num_beams and num_beams > 1:
            return "beam search"
        if getattr(self.model, "synced_gpus", False):
            return "sharded model (synced_gpus: every rank must run the same forward passes)"
        if self._fast_off:
            return self._fast_off
        hf = self._hf_model()
        if not hasattr(getattr(hf, "model", None), "get_rope_index"):
            return f"{type(hf).__name__} has no model.get_rope_index (not a Qwen-VL model)"
        cfg = getattr(hf, "generation_config", None)
        for name, defaults in _UNSUPPORTED_PROCESSORS.items():
            v = getattr(cfg, name, None)
            if v not in defaults and not (isinstance(v, (list, dict)) and not v):
                return f"generation_config.{name}={v!r}"
        return None

    def static_reason(self, temperature: float | None = 0.0, num_beams: int = 1) -> str | None:
        """None when greedy batches decode on the static KV cache (`static_decode`); otherwise why not
        (they then take the fast loop if `fast_reason` is None, else `model.generate`)."""
        why = self.fast_reason(temperature, num_beams)
        if why is not None:
            return why
        if self.decode_mode == "dynamic":
            return "decode='dynamic'"
        if self.decode_mode == "auto" and self.device.type != "cuda":
            return "decode='auto' on the CPU (the static cache pays through CUDA graphs)"
        if self._static_off:
            return self._static_off
        return static_decode.model_reason(self._hf_model())

    # ---------------------------------------------------------------- generation

    def generate(self, records: list[dict], max_new_tokens: int = 512, **kw) -> list[str]:
        """Answers for a batch of records (or already encoded prompts), in order."""
        return [a.text for a in self.generate_answers(records, max_new_tokens, **kw)]

    @torch.no_grad()
    def generate_answers(self, records: list[dict], max_new_tokens: int = 512, temperature: float = 0.0,
                         top_p: float = 1.0, num_beams: int = 1) -> list[Answer]:
        """Like `generate`, with each answer's generated token count and why it ended. The records
        are one batch as given (`answer_rows` sorts and batches many rows)."""
        was_training = self.model.training
        self.model.eval()
        try:
            encoded = self._encode_all(records)
            batch = self._batch(encoded)
            why = self.fast_reason(temperature, num_beams)
            if why is None and self._compiled():
                out = self.model.generate(**batch, **self._gen_kwargs(max_new_tokens), cache_implementation="static")
                self.last_path = "static-compiled"
                self.stats["generate_batches"] += 1
                return [self._answer(t) for t in out[:, batch["input_ids"].shape[1]:]]
            if why is None and self.static_reason() is None:
                answers = self._static(batch, encoded, max_new_tokens)
                if answers is not None:
                    return answers
            if why is None:
                try:
                    answers = self._greedy(batch, encoded, max_new_tokens)
                    self.last_path = "fast"
                    self.stats["fast_batches"] += 1
                    self._static_off_for_good()
                    return answers
                except (TypeError, AttributeError, KeyError, NotImplementedError) as e:  # an API this transformers lacks
                    self._fast_off = f"the fast greedy loop failed ({type(e).__name__}: {e})"
                    log.warning("%s; decoding with model.generate from now on", self._fast_off)
            out = self.model.generate(**batch, **self._gen_kwargs(max_new_tokens, temperature, top_p, num_beams))
            self.last_path = "generate"
            self.stats["generate_batches"] += 1
            self._static_off_for_good()
        finally:
            self._static_failed = None  # still set here: every path failed, the batch's fault, not the decoder's
            self.model.train(was_training)
        return [self._answer(t) for t in out[:, batch["input_ids"].shape[1]:]]

    def _static(self, batch: dict, encoded: list[dict], max_new_tokens: int) -> list[Answer] | None:
        """The batch decoded by `static_decode`; None when it fails (the static decoder goes off for good, with
        the reason in `static_reason`, once another path decodes the batch: a batch that fails on every path, e.g. a
        prompt the model refuses, says nothing about the decoder and must not turn it off in a long-lived server)."""
        if max_new_tokens < 1:
            return None
        hf = self._hf_model()
        graphs = self.cuda_graphs and self.device.type == "cuda"
        before = self.stats["graph_replays"]
        try:
            gen = static_decode.decode(hf, batch, self._positions(hf, encoded, batch), max_new_tokens, self.stop_ids(),
                                       self.check_every, graphs, self.stats, prompt_embeds(hf, batch))
        except torch.OutOfMemoryError:
            # its cache holds prompt + max_new_tokens for every row from the start; the dynamic loop grows with the
            # answers and drops finished rows, so the batch may fit there (if not, that loop's error is raised)
            self.stats["static_oom"] += 1
            if self.stats["static_oom"] == 1:
                log.warning("the static decoder ran out of memory (its KV cache is allocated for %d rows x %d tokens); "
                            "such batches decode on the dynamic loop", batch["input_ids"].shape[0],
                            batch["input_ids"].shape[1] + max_new_tokens)
            return None
        except (static_decode.GraphCaptureError, TypeError, AttributeError, KeyError, ValueError, IndexError,
                NotImplementedError, RuntimeError) as e:
            self._static_failed = f"the static decoder failed ({type(e).__name__}: {str(e)[:300]})"
            return None
        self.last_path = "static-graph" if self.stats["graph_replays"] > before else "static"
        self.stats["static_batches"] += 1
        return [self._answer(t) for t in gen.tolist()]

    def _static_off_for_good(self) -> None:
        if self._static_failed:
            self._static_off, self._static_failed = self._static_failed, None
            log.warning("%s; decoding with the dynamic loop from now on", self._static_off)

    def _compiled(self) -> bool:
        return bool(self.compile) and self.device.type == "cuda"

    def _answer(self, new_ids) -> Answer:
        """Count up to and including the first stop token; what follows it (generate's padding, or
        the tokens a row made before `_greedy` noticed it had ended) is not part of the answer."""
        ids, stops = [int(t) for t in new_ids], set(self.stop_ids())
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
        kept = ids if end is None else ids[:end]
        return Answer(self.decode(kept), end if end is not None else len(ids), "stop" if end is not None else "length",
                      tuple(kept))

    def _prompt_positions(self, hf, batch: dict) -> torch.Tensor:
        """[3, batch, length] M-RoPE positions of the left-padded prompts, as `generate` computes them."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "image_grid_thw" in batch:
            rope = hf.model.get_rope_index
            params = inspect.signature(rope).parameters
            kw = {"image_grid_thw": batch["image_grid_thw"], "attention_mask": mask}
            if "mm_token_type_ids" in params:
                kw["mm_token_type_ids"] = batch["mm_token_type_ids"]
            pos = rope(ids, **kw)[0]
        else:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1).unsqueeze(0).expand(3, -1, -1)
        return pos.to(ids.device)

    def _greedy(self, batch: dict, encoded: list[dict], max_new_tokens: int) -> list[Answer]:
        """Greedy decoding with finished rows dropped from the batch (see the module docstring)."""
        hf = self._hf_model()
        cache_kw = static_decode.cache_kw(hf.forward)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        dev, rows = ids.device, ids.shape[0]
        stops = torch.tensor(self.stop_ids(), device=dev)
        penalty = getattr(getattr(hf, "generation_config", None), "repetition_penalty", None)
        penalty = penalty if penalty not in (None, 1.0) else None
        pos = self._positions(hf, encoded, batch)
        out = hf(**static_decode.prefill_inputs(hf, batch, prompt_embeds(hf, batch)), attention_mask=mask,
                 position_ids=pos, use_cache=True)
        cache = cache_of(out)
        history = ids if penalty else None  # the tokens the repetition penalty looks at (padding included, as generate)
        gen = torch.empty((rows, max_new_tokens), dtype=torch.long, device=dev)
        gen[:, 0] = _next_token(out.logits, history, penalty)
        live = torch.arange(rows, device=dev)  # original row of each row still in the batch
        last = pos[:, :, -1:]
        done: dict[int, torch.Tensor] = {}
        step = 1
        while step < max_new_tokens:
            if step % self.check_every == 0:
                ended = torch.isin(gen[:, :step], stops).any(dim=1)
                n_ended = int(ended.sum())
                if n_ended == len(live):
                    break
                if n_ended and n_ended >= max(1, len(live) // 8):
                    keep = (~ended).nonzero().squeeze(1)
                    for j in ended.nonzero().squeeze(1).tolist():
                        done[int(live[j])] = gen[j, :step]
                    self.stats["rows_dropped_early"] += n_ended
                    gen, mask, last, live = gen[keep], mask[keep], last[:, keep], live[keep]
                    history = history[keep] if history is not None else None
                    _select_rows(cache, keep)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last = last + 1
            if history is not None:
                history = torch.cat([history, gen[:, step - 1:step]], dim=1)
            out = hf(input_ids=gen[:, step - 1:step], attention_mask=mask, position_ids=last, use_cache=True,
                     **{cache_kw: cache})
            cache = cache_of(out)
            gen[:, step] = _next_token(out.logits, history, penalty)
            step += 1
        for j, r in enumerate(live.tolist()):
            done[r] = gen[j, :step]
        del cache, out
        return [self._answer(done[r].tolist()) for r in range(rows)]

    # ---------------------------------------------------------------- many rows

    def iter_answers(self, rows, batch_size: int = 8, max_new_tokens: int = 512, sort: bool = True,
                     prefetch: int = 2, **kw) -> Iterator[tuple[int, Answer | BaseException]]:
        """(row index, Answer) for every row of `rows` (a list or any indexable dataset), batch by
        batch as they finish, not in row order. Rows are sorted by prompt length (longest first, so
        running out of memory shows at once) and encoded `prefetch` batches ahead by the thread pool.
        A row that can't be encoded (bad image, too long) yields its exception instead of an Answer;
        a failure of generation itself is raised."""
        n = len(rows)
        order = list(range(n))
        if sort and n > batch_size:
            lengths = [self.prompt_length(rows[i]) for i in order]
            order.sort(key=lambda i: -lengths[i])
        batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
        pool = self._executor()
        pending: deque = deque()

        def submit(b):
            if pool is None:
                return [(i, None) for i in b]
            return [(i, pool.submit(_try, self.encode_prompt, rows[i])) for i in b]

        nxt = 0
        while nxt < len(batches) and len(pending) < 1 + prefetch:
            pending.append(submit(batches[nxt]))
            nxt += 1
        try:
            while pending:
                jobs = pending.popleft()
                if nxt < len(batches):  # keep the pool `prefetch` batches ahead while this one generates
                    pending.append(submit(batches[nxt]))
                    nxt += 1
                encoded, index = [], []
                for i, fut in jobs:
                    res = fut.result() if fut is not None else _try(self.encode_prompt, rows[i])
                    if isinstance(res, BaseException):
                        yield i, res
                    else:
                        encoded.append(res)
                        index.append(i)
                if encoded:
                    yield from zip(index, self.generate_answers(encoded, max_new_tokens, **kw))
        finally:
            for jobs in pending:
                for _, fut in jobs:
                    if fut is not None:
                        fut.cancel()

    def answer_rows(self, rows, batch_size: int = 8, max_new_tokens: int = 512, **kw) -> list[Answer | BaseException]:
        """`iter_answers` in row order."""
        out: list = [None] * len(rows)
        for i, a in self.iter_answers(rows, batch_size, max_new_tokens, **kw):
            out[i] = a
        return out

    def generate_rows(self, rows, batch_size: int = 8, max_new_tokens: int = 512, **kw) -> list[str]:
        """Answer texts in row order; the first row that can't be encoded raises its error."""
        answers = self.answer_rows(rows, batch_size, max_new_tokens, **kw)
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return [a.text for a in answers]

    def stream(self, record: dict, max_new_tokens: int = 512, stop: threading.Event | None = None,
               usage: dict | None = None, **kw) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated. Setting `stop` ends generation early.
        The prompt is encoded before the first piece, so a bad image raises here, not in the thread.
        At the end `usage` (if given) gets the answer's `tokens` and `finish_reason`, as in `Answer`."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer
        self.model.eval()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        batch = self._batch([record])
        stop = stop or threading.Event()
        kwargs = {**batch, **self._gen_kwargs(max_new_tokens, **kw), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([_StopOnEvent(stop)])}
        errors, outputs = [], []

        def work():
            try:
                with torch.no_grad():
                    outputs.append(self.model.generate(**kwargs))
            except Exception as e:  # surfaced in the consumer's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()  # consumer left early (Ctrl-C, break): end generation too
            thread.join()
        if errors:
            raise errors[0]
        if usage is not None and outputs:
            answer = self._answer(outputs[0][0, batch["input_ids"].shape[1]:])
            usage.update(tokens=answer.tokens, finish_reason=answer.finish_reason)


def _prompt(record: dict) -> list[dict]:
    msgs = record["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # handed to the caller as the row's result
        return e


def _select_rows(cache, keep: torch.Tensor) -> None:
    """Keep only rows `keep` of a KV cache (DynamicCache in transformers 4.5x-5.x)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
    else:
        cache.reorder_cache(keep)


def _next_token(logits: torch.Tensor, history: torch.Tensor | None, penalty: float | None) -> torch.Tensor:
    """Greedy choice from the last position's logits, in float32 as `generate` takes it, with
    transformers' RepetitionPenaltyLogitsProcessor applied first when the generation config has one."""
    scores = logits[:, -1, :].float()
    if penalty is not None and history is not None:
        picked = torch.gather(scores, 1, history)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        scores = scores.scatter(1, history, picked)
    return scores.argmax(dim=-1)
