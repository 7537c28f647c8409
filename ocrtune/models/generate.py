"""Generation: batched greedy/sampled/beam decoding and token streaming over a model + template.

Moved from `ocrtune/infer/engine.py` (issue 14) so that training (`--predict_with_generate`), `infer`
and `serve` all use it from the `models` layer; `ocrtune.infer.engine` still re-exports every name.
The device/dtype choice is `ocrtune.models.dtypes`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from ocrtune.data.images import open_image
from ocrtune.models.template import Template


def _is_image(x) -> bool:
    return hasattr(x, "size") and hasattr(x, "convert") and not isinstance(x, dict)


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


class InferEngine:
    def __init__(self, model, processor, template: Template):
        self.model, self.processor, self.template = model, processor, template
        self.tokenizer = processor.tokenizer

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode_prompt(self, record: dict) -> dict:
        """One record's prompt (all messages but a final assistant reply), encoded for generation.
        Raises BadImage for an unusable image."""
        images = [im if _is_image(im) else open_image(im) for im in record.get("images") or []]
        msgs = record["messages"]
        prompt = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
        return self.template.encode(prompt, images, add_generation_prompt=True)

    def _batch(self, records: list[dict]) -> dict:
        """Left-padded prompts (generation appends on the right)."""
        encoded = [r if "input_ids" in r else self.encode_prompt(r) for r in records]
        n = max(len(e["input_ids"]) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), n), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), n), dtype=torch.long)
        types = torch.zeros((len(encoded), n), dtype=torch.long)
        for i, e in enumerate(encoded):
            k = len(e["input_ids"])
            ids[i, n - k:] = torch.tensor(e["input_ids"])
            types[i, n - k:] = torch.tensor(e["mm_token_type_ids"])
            mask[i, n - k:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
        vis = [e for e in encoded if "pixel_values" in e]
        if vis:
            dtype = next(self.model.parameters()).dtype
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in vis]).to(dtype)
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in vis])
        return {k: v.to(self.device) for k, v in batch.items()}

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
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate(self, records: list[dict], max_new_tokens: int = 512, **kw) -> list[str]:
        """Answers for a batch of records (or already encoded prompts), in order."""
        return [a.text for a in self.generate_answers(records, max_new_tokens, **kw)]

    @torch.no_grad()
    def generate_answers(self, records: list[dict], max_new_tokens: int = 512, **kw) -> list[Answer]:
        """Like `generate`, with each answer's generated token count and why it ended."""
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self._batch(records)
            out = self.model.generate(**batch, **self._gen_kwargs(max_new_tokens, **kw))
        finally:
            self.model.train(was_training)
        return [self._answer(t) for t in out[:, batch["input_ids"].shape[1]:]]

    def _answer(self, new_ids) -> Answer:
        """Rows that ended early are padded after their stop token: count up to and including it."""
        ids, stops = new_ids.tolist(), set(self.stop_ids())
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
        return Answer(self.decode(new_ids), end if end is not None else len(ids), "stop" if end is not None else "length")

    def generate_rows(self, rows, batch_size: int = 8, max_new_tokens: int = 512, **kw) -> list[str]:
        preds = []
        for s in range(0, len(rows), batch_size):
            chunk = [rows[i] for i in range(s, min(s + batch_size, len(rows)))]
            preds += self.generate(chunk, max_new_tokens, **kw)
        return preds

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
