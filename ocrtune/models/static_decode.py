"""Greedy decoding on a static KV cache, one CUDA graph replay per token on CUDA.

`InferEngine` hands a batch here after choosing this path (`InferEngine.static_reason`). The prefill is
the model's own forward over transformers' `StaticCache` (room for the prompt plus `max_new_tokens`),
fed what `model.generate` feeds it (the prompts' M-RoPE positions, `logits_to_keep=1`). Every decoding
step after it has the same shapes: the language model over [batch, 1] tokens with

* the cache's own in-place writes (`StaticLayer.update` writes at its device-side length counter),
* a [batch, 1, 1, cache length] boolean mask, one slot opened per step (padding stays closed), handed
  to the model ready-made (`attention_mask={"full_attention": mask}`, transformers skips building it:
  its mask builder syncs with the host, which a CUDA graph can't hold),
* positions +1 per step from the prompt's last M-RoPE position (text positions offset by rope_deltas),
* argmax over the float32 logits, written into the answer buffer at a device-side column counter;
* on sdpa models, the step's attention packs the query heads that share a K/V head into that head's query
  rows (`packed_gqa_sdpa`, what newer transformers' sdpa does for one query token) instead of copying
  K/V once per query head (`repeat_kv`, older transformers' way with a mask): a decoding step reads the
  cache once instead of `heads / kv heads` times.

All of a step's state lives in tensors that the step updates in place, so the step is a pure function
of device memory: on CUDA the first decoding step runs eagerly (on a side stream: the warm-up that
creates the kernels' handles and workspaces), then the step is captured into a `torch.cuda.CUDAGraph`
(capturing runs nothing), and every later step is one `replay()`. On the CPU the same step runs eagerly (what the tests check).
Rows keep their place in the batch until every row has emitted a stop token (checked every
`check_every` steps, one host sync each); what a row decodes after its stop token is cut off by the
engine and never touches another row.
"""
from __future__ import annotations

import functools
import inspect

import torch

DECODE_ATTENTION = "ocrtune_decode"  # the attention name the decoding step selects on an sdpa model
SDPA_LIKE = ("sdpa", "ocrtune_varlen")  # ocrtune_varlen: sdpa, save for packed training rows


def model_reason(hf) -> str | None:
    """None when `hf` (a transformers Qwen-VL model) can decode here; otherwise why not."""
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        return "this transformers has no StaticCache"
    inner = getattr(hf, "model", None)
    if getattr(inner, "language_model", None) is None or getattr(hf, "lm_head", None) is None:
        return f"{type(hf).__name__} has no model.language_model and lm_head"
    attn = _attention(hf)
    if attn not in SDPA_LIKE + ("eager",):
        return f"attention implementation {attn!r} (the static decoder builds sdpa/eager masks only)"
    types = set(getattr(inner.language_model.config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer types {sorted(types)} (sliding-window layers need their own masks)"
    devices = set((getattr(hf, "hf_device_map", None) or {}).values())
    if len(devices) > 1:  # one graph is captured on one device's stream; accelerate's hooks copy across devices
        return f"the model is split over devices {sorted(map(str, devices))} (device_map)"
    penalty = getattr(getattr(hf, "generation_config", None), "repetition_penalty", None)
    if penalty not in (None, 1.0):
        return f"generation_config.repetition_penalty={penalty!r} (its token history grows each step)"
    return None


class GraphCaptureError(RuntimeError):
    """Capturing the decoding step into a CUDA graph failed (the batch is decoded again another way)."""


def decode(hf, batch: dict, positions: torch.Tensor, max_new_tokens: int, stops: list[int], check_every: int = 4,
           graphs: bool = True, stats: dict | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy tokens [rows, steps] for the left-padded `batch` (steps <= max_new_tokens: decoding ends once
    every row has a stop token). `positions`: the prompts' [3, rows, length] M-RoPE positions. `graphs`:
    replay a CUDA graph of the step (CUDA only; ignored on the CPU). `embeds`: the prompts' input embeddings
    (`patches.forward.prompt_embeds`), which lets the prefill run in parts of similar length (`length_parts`).
    `stats` counts `static_steps` (steps decoded after the prefill), `graph_replays` and `prefill_parts`."""
    from transformers import StaticCache
    stats = stats if stats is not None else {}
    ids = batch["input_ids"]
    rows, plen = ids.shape
    dev = ids.device
    total = plen + max_new_tokens
    cache = StaticCache(config=hf.config, max_cache_len=total)
    gen = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=dev)
    gen[:, 0] = _prefill(hf, cache, batch, positions, embeds, stats)
    if max_new_tokens == 1:
        return gen

    step_fn = Step(hf, cache, cache_kw(hf.model.language_model.forward), batch["attention_mask"], positions[:, :, -1:],
                    gen, total)
    stop_ids = torch.tensor(stops, device=dev)
    runner = Replayer(step_fn, dev, graphs, stats)
    step = 1
    try:
        while step < max_new_tokens:
            if step % check_every == 0 and bool(torch.isin(gen[:, :step], stop_ids).any(dim=1).all()):
                break
            runner(capture=step + 1 < max_new_tokens)
            stats["static_steps"] = stats.get("static_steps", 0) + 1
            step += 1
    finally:
        runner.close()
    return gen[:, :step]


class Replayer:
    """Runs a step function (a pure function of device memory, `Step`) once a call: on CUDA with `graphs`, the first
    call eagerly on a side stream (the warm-up that creates the kernels' handles and workspaces), after which the
    step is captured into a CUDA graph (capturing runs nothing) that every later call replays; elsewhere eagerly.
    `stats["graph_replays"]` counts the replays."""

    def __init__(self, step, device: torch.device, graphs: bool, stats: dict):
        self.step, self.device, self.stats = step, device, stats
        self.graphs = graphs and device.type == "cuda"
        self.graph = None

    def __call__(self, capture: bool = True) -> None:
        """One step; `capture=False`: no graph is captured after this step (no step follows it)."""
        if self.graph is not None:
            self.graph.replay()
            self.stats["graph_replays"] = self.stats.get("graph_replays", 0) + 1
        elif self.graphs:
            side = _side_stream(self.device)
            _on_stream(side, self.step)
            if capture:
                self.graph = _capture(self.step, side)
        else:
            self.step()

    def close(self) -> None:
        """The last replay ends before the graph and its memory go."""
        if self.graph is not None:
            torch.cuda.current_stream(self.device).synchronize()
            self.graph = None


def _prefill(hf, cache, batch: dict, positions: torch.Tensor, embeds: torch.Tensor | None, stats: dict) -> torch.Tensor:
    """Fill `cache` with the prompts' keys and values; returns each row's first token. Left padding to the longest
    prompt would make a batch of formula images (34 to 280 tokens) mostly padding, so with `embeds` the rows run in
    parts of similar length (`prefill_rows`). Otherwise one forward over the batch writes the cache itself."""
    mask2d = batch["attention_mask"]
    rows, plen = mask2d.shape
    parts = length_parts(mask2d.sum(dim=1).tolist()) if embeds is not None and fillable(cache) else [(None, plen)]
    if len(parts) == 1:
        stats["prefill_parts"] = stats.get("prefill_parts", 0) + 1
        out = hf(**prefill_inputs(hf, batch, embeds), attention_mask=mask2d, position_ids=positions, use_cache=True,
                 **{cache_kw(hf.forward): cache})
        return out.logits[:, -1, :].float().argmax(dim=-1)
    allocate(hf, cache, rows, mask2d.device)
    first = prefill_rows(hf, cache, batch, positions, embeds, torch.arange(rows, device=mask2d.device), plen, stats,
                         parts)
    set_length(cache, plen)
    return first


def prefill_rows(hf, cache, batch: dict, positions: torch.Tensor, embeds: torch.Tensor | None, slots: torch.Tensor,
                 end: int, stats: dict, parts: list | None = None) -> torch.Tensor:
    """Prefill the left-padded `batch` into rows `slots` of the static `cache` (`allocate`d), each prompt's last
    token at column `end - 1`; returns each row's first token. The rows run in `parts` (default: `length_parts` where `embeds` are
    given, else one), each part's forward on its own shorter padding into a dynamic cache that is copied into the
    static one (the part's padding columns too: its attention mask closes them)."""
    mask2d = batch["attention_mask"]
    rows, plen = mask2d.shape
    if parts is None:
        parts = length_parts(mask2d.sum(dim=1).tolist()) if embeds is not None else [(list(range(rows)), plen)]
    stats["prefill_parts"] = stats.get("prefill_parts", 0) + len(parts)
    first = torch.empty(rows, dtype=torch.long, device=mask2d.device)
    for part, length in parts:
        idx = torch.tensor(part, device=mask2d.device)
        cols = slice(plen - length, plen)
        if embeds is not None:
            inputs = {"inputs_embeds": embeds[idx, cols], **_last_logits(hf)}
        else:  # one part of every row, as the batch is
            inputs = prefill_inputs(hf, batch)
        out = hf(**inputs, attention_mask=mask2d[idx, cols], position_ids=positions[:, idx, cols], use_cache=True)
        first[idx] = out.logits[:, -1, :].float().argmax(dim=-1)
        copy_rows(cache, cache_of(out), slots[idx], slice(end - length, end))
        del out
    return first


def set_length(cache, length: int) -> None:
    """Where the next token's keys and values go in every layer of a static cache filled by `prefill_rows`."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def length_parts(lengths: list[int], fixed_tokens: int = 1024) -> list[tuple[list[int], int]]:
    """Rows grouped for a prefill in parts: [(row indices, the part's longest prompt)], chosen to minimize the
    padded tokens computed plus `fixed_tokens` a part (a forward's own cost: its kernel launches and reading the
    weights, in tokens' worth). Exact over the distinct lengths (longest first; a part is a run of them)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    distinct = sorted(set(lengths), reverse=True)
    count = [sum(1 for x in lengths if x == v) for v in distinct]
    n = len(distinct)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the cheapest split of the j longest lengths
        rows_in = 0
        for i in range(j - 1, -1, -1):  # the last part holds distinct[i:j], padded to distinct[i]
            rows_in += count[i]
            cost = best[i] + fixed_tokens + rows_in * distinct[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    parts, start = [], 0
    for i, j in reversed(bounds):
        size = sum(count[i:j])
        parts.append((order[start:start + size], distinct[i]))
        start += size
    return parts


def fillable(cache) -> bool:
    """Whether `allocate` and `copy_rows` can fill this StaticCache (transformers 5's lazily allocated StaticLayer)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(hasattr(layer, a) for layer in layers
                                for a in ("lazy_initialization", "is_initialized", "cumulative_length"))


def allocate(hf, cache, rows: int, device: torch.device) -> None:
    """Allocate every layer of a static cache for `rows` rows now (transformers allocates a layer at its first write,
    which `copy_rows` would be), in the dtype and head shape of the language model's keys and values."""
    if not fillable(cache):
        raise TypeError(f"{type(cache).__name__} has no lazily allocated layers to fill")
    config = hf.model.language_model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    empty = torch.empty((rows, heads, 0, dim), dtype=hf.get_input_embeddings().weight.dtype, device=device)
    for layer in cache.layers:  # lazy_initialization reads shape[:2], dtype, device and the head dims
        layer.lazy_initialization(empty, empty)


def copy_rows(cache, part_cache, slots: torch.Tensor, cols: slice) -> None:
    """Copy a dynamic cache's keys and values into rows `slots`, columns `cols` of the `allocate`d static `cache`."""
    part_layers = getattr(part_cache, "layers", None)
    if part_layers is None or len(part_layers) != len(cache.layers):
        raise TypeError(f"a prefill part's cache ({type(part_cache).__name__}) has no layers to copy")
    for layer, part in zip(cache.layers, part_layers):
        layer.keys[slots, :, cols] = part.keys
        layer.values[slots, :, cols] = part.values


def cache_of(out):
    """The KV cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _attention(hf) -> str | None:
    config = getattr(hf.model.language_model, "config", None) or hf.config
    return getattr(config, "_attn_implementation", None)


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, but for one query token with grouped K/V heads the query heads of each
    K/V head become its query rows ([b, heads, 1, d] -> [b, kv heads, heads / kv heads, d]; repeat_kv maps
    query head i to K/V head i // groups, and so does this), so K/V are read once and never copied. Anything
    else (prefill, no grouping, dropout, biases, per-head masks) goes to transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = query.shape[1] // key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    if (query.shape[2] != 1 or groups <= 1 or dropout or per_head_mask or kwargs.get("output_attentions")
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, _, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, key.shape[1], groups, d), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=1)
def _register_decode_attention() -> bool:
    """Register `packed_gqa_sdpa` with transformers as DECODE_ATTENTION, once (a new name: "sdpa" stays)."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(DECODE_ATTENTION, packed_gqa_sdpa)
    return True


def cache_kw(forward) -> str:
    """The KV cache's keyword: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def prefill_inputs(hf, batch: dict, embeds: torch.Tensor | None = None) -> dict:
    """What every decoder here feeds the prompts' forward besides mask and positions: the prompts' embeddings where
    given, else their ids and vision inputs as `generate` feeds them; and the logits of the last position only
    where the model takes `logits_to_keep`."""
    if embeds is not None:
        return {"inputs_embeds": embeds, **_last_logits(hf)}
    kw = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    return {"input_ids": batch["input_ids"], **kw, **_last_logits(hf)}


def _last_logits(hf) -> dict:
    """`logits_to_keep=1` where the model takes it (as `generate` passes it in the prefill)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}


class Step:
    """One decoding step over static buffers, all updated in place (so a CUDA graph can replay it)."""

    def __init__(self, hf, cache, cache_kw: str, mask2d: torch.Tensor, last_pos: torch.Tensor, gen: torch.Tensor,
                 total: int, col: int = 1):
        """`mask2d`: the [rows, prompt length] padding mask (the first step's token goes in the next column); `gen`:
        the token buffer, whose column `col` the first step writes (one more each step)."""
        rows, plen = mask2d.shape
        dev = mask2d.device
        self.lm, self.head, self.cache, self.cache_kw = hf.model.language_model, hf.lm_head, cache, cache_kw
        self.gen = gen
        self.open = torch.zeros((rows, 1, 1, total), dtype=torch.bool, device=dev)
        self.open[:, 0, 0, :plen] = mask2d.bool()
        self.slot = torch.tensor([plen], device=dev)  # cache slot of the token fed next
        self.col = torch.tensor([col], device=dev)  # column of `gen` the step writes
        self.pos = last_pos.clone()  # [3, rows, 1], +1 before each step
        self.tok = gen[:, :1].clone()
        attn = _attention(hf)
        self.eager = attn == "eager"  # eager attention adds a float mask; sdpa takes the boolean one
        # the step's attention: packed_gqa_sdpa on sdpa models, selected on the text config around the step only
        self.attn = DECODE_ATTENTION if attn in SDPA_LIKE and _register_decode_attention() else None
        self.dtype = next(hf.parameters()).dtype

    def __call__(self) -> None:
        self.open.index_fill_(3, self.slot, True)
        self.pos.add_(1)
        mask = self.open
        if self.eager:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min)
        config = self.lm.config
        before = config._attn_implementation
        if self.attn:
            config._attn_implementation = self.attn
        try:
            hidden = self.lm(input_ids=self.tok, attention_mask={"full_attention": mask}, position_ids=self.pos,
                             use_cache=True, **{self.cache_kw: self.cache}).last_hidden_state
        finally:
            config._attn_implementation = before
        nxt = self.head(hidden[:, -1:, :])[:, -1, :].float().argmax(dim=-1)
        self.gen.index_copy_(1, self.col, nxt[:, None])
        self.tok.copy_(nxt[:, None])
        self.slot.add_(1)
        self.col.add_(1)


_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One stream per device for warm-ups and captures (cuBLAS keeps a workspace per stream)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def _on_stream(stream, fn) -> None:
    """`fn` on `stream`, ordered after and before the work of its device's current stream (the model's device,
    which need not be the current device: the current device's stream would order nothing)."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn()
    current.wait_stream(stream)


def _capture(fn, stream):
    """A CUDA graph of `fn` (capturing records the kernels without running them). thread_local: other
    threads (serve's, the encoding pool's) may call CUDA meanwhile, which must not break the capture."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            fn()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        raise GraphCaptureError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return graph
