"""Loss on response tokens only, without materializing full-vocabulary logits for every position.

The language model returns hidden states; only positions whose next token is a response token are
kept, and the lm_head + cross-entropy run over them in chunks, each chunk recomputed in backward
(so at most one chunk of [chunk, vocab] logits is alive). With Liger installed on a GPU, its fused
linear cross-entropy kernel does the same in one pass.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ocrtune.data.packing import IGNORE_INDEX
from ocrtune.data.pixels import refuse_light
from ocrtune.evaluate.metrics import argmax_hits  # the one token-accuracy count (also eval --metrics acc)
from ocrtune.models.patches.common import assert_prepared, causal_lm
from ocrtune.models.patches.forward import hidden_states, image_embeds
from ocrtune.models.patches.lora import lora_autocast_dtype


def _ce_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor):
    logits = F.linear(h, weight).float()
    loss = F.cross_entropy(logits, y, reduction="sum")
    return loss, argmax_hits(logits, y)


def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int = 2048):
    """Sum of cross-entropy of softmax(h @ weight.T) against y, and the count of argmax hits."""
    loss = h.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], weight, y[s:s + chunk])
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            l, c = checkpoint(_ce_chunk, *args, use_reentrant=False)
        else:
            l, c = _ce_chunk(*args)
        loss, correct = loss + l, correct + c
    return loss, correct


class ResponseLoss(nn.Module):
    """Wraps the model so one forward returns (summed loss, response tokens, correct tokens);
    DDP/FSDP wrap this module, so gradient sync sees the whole computation.

    The image features are computed without autograd when the vision tower is frozen (nothing in it
    trains, so backward never enters it). Packed batches (`cu_seq_lens` from packing.pack) go to the
    language model as one row with per-sample positions and variable-length attention; the forward
    through the model's internals is `models/patches/forward.py:hidden_states`. The model must have been
    through `models.patches.prepare` (every loaded model is): nothing is patched here."""

    def __init__(self, model: nn.Module, chunk_size: int = 2048, fused_ce=None):
        super().__init__()
        self.model, self.chunk_size, self.fused_ce = model, chunk_size, fused_ce
        self._amp = None

    def _autocast_dtype(self):
        """The dtype the forward autocasts to (`lora_autocast_dtype`: float32 LoRA weights on a bf16/fp16
        model run in the model's dtype; PEFT's input upcast was switched off by `prepare(lora_autocast=True)`),
        or None (float32 models: nothing changes). Decided at the first call."""
        if self._amp is None:
            assert_prepared(causal_lm(self.model))
            self._amp = lora_autocast_dtype(self.model) or False
        return self._amp or None

    def autocast(self, device_type: str):
        """The forward's autocast as a context, also for passes that call the model itself (generation): without
        it their LoRA matmuls meet float32 weights and bf16/fp16 inputs."""
        amp = self._autocast_dtype()
        return torch.autocast(device_type, dtype=amp) if amp else contextlib.nullcontext()

    def _embeds(self, vlm, input_ids, pixel_values, image_grid_thw):
        return image_embeds(causal_lm(self.model), vlm, input_ids, pixel_values, image_grid_thw)

    def forward(self, input_ids, labels, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, mm_token_type_ids=None, cu_seq_lens=None, max_length=None, pixel_frames=None,
                pixel_norm=None, **kwargs):
        refuse_light({"pixel_frames": pixel_frames, "pixel_norm": pixel_norm}, "ResponseLoss")  # raw 8 bits otherwise
        with self.autocast(input_ids.device.type):
            return self._forward(input_ids, labels, attention_mask, pixel_values, image_grid_thw, position_ids,
                                 mm_token_type_ids, cu_seq_lens, max_length, **kwargs)

    def _forward(self, input_ids, labels, attention_mask, pixel_values, image_grid_thw, position_ids,
                 mm_token_type_ids, cu_seq_lens, max_length, **kwargs):
        lm = causal_lm(self.model)
        return self._loss(lm, hidden_states(lm, input_ids, attention_mask, pixel_values, image_grid_thw,
                                            position_ids, mm_token_type_ids, cu_seq_lens, max_length, **kwargs), labels)

    def _loss(self, lm, last_hidden_state, labels):
        hidden = last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h, y = hidden[keep], targets[keep]
        weight = lm.lm_head.weight
        if self.fused_ce is not None:
            loss = self.fused_ce(weight, h, y)
            with torch.no_grad():
                correct = sum(argmax_hits(F.linear(h[s:s + self.chunk_size], weight), y[s:s + self.chunk_size])
                              for s in range(0, h.shape[0], self.chunk_size))
        else:
            loss, correct = chunked_linear_cross_entropy(h, weight, y, self.chunk_size)
        return loss, torch.tensor(y.numel(), device=y.device), correct
