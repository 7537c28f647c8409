"""Generation: batched greedy/sampled/beam decoding and token streaming over a model + template."""
from __future__ import annotations

import threading
from typing import Iterator

import torch

from ocrtune.data.images import open_image
from ocrtune.models.template import Template


class InferEngine:
    def __init__(self, model, processor, template: Template):
        self.model, self.processor, self.template = model, processor, template
        self.tokenizer = processor.tokenizer

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _batch(self, records: list[dict]) -> dict:
        """Left-padded prompts (generation appends on the right)."""
        encoded = []
        for r in records:
            images = [im if hasattr(im, "size") and not isinstance(im, dict) else open_image(im) for im in r.get("images", [])]
            prompt = [m for m in r["messages"] if m["role"] != "assistant" or m is not r["messages"][-1]]
            encoded.append(self.template.encode(prompt, images, add_generation_prompt=True))
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
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in vis])
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in vis])
        return {k: v.to(self.device) for k, v in batch.items()}

    def _gen_kwargs(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1) -> dict:
        kw = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "pad_token_id": self.tokenizer.pad_token_id,
              "eos_token_id": [self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.pad_token_id]}
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    @torch.no_grad()
    def generate(self, records: list[dict], max_new_tokens: int = 512, **kw) -> list[str]:
        was_training = self.model.training
        self.model.eval()
        batch = self._batch(records)
        out = self.model.generate(**batch, **self._gen_kwargs(max_new_tokens, **kw))
        self.model.train(was_training)
        new = out[:, batch["input_ids"].shape[1]:]
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]

    def generate_rows(self, rows, batch_size: int = 8, max_new_tokens: int = 512, **kw) -> list[str]:
        preds = []
        for s in range(0, len(rows), batch_size):
            chunk = [rows[i] for i in range(s, min(s + batch_size, len(rows)))]
            preds += self.generate(chunk, max_new_tokens, **kw)
        return preds

    def stream(self, record: dict, max_new_tokens: int = 512, **kw) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated."""
        from transformers import TextIteratorStreamer
        self.model.eval()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        batch = self._batch([record])
        kwargs = {**batch, **self._gen_kwargs(max_new_tokens, **kw), "streamer": streamer}
        errors = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except Exception as e:  # surfaced in the consumer's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
