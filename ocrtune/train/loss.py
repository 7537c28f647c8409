"""Loss on response tokens only, without materializing full-vocabulary logits for every position.

The language model returns hidden states; only positions whose next token is a response token are
kept, and the lm_head + cross-entropy run over them in chunks, each chunk recomputed in backward
(so at most one chunk of [chunk, vocab] logits is alive). With Liger installed on a GPU, its fused
linear cross-entropy kernel does the same in one pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ocrtune.models.template import IGNORE_INDEX


def causal_lm(model: nn.Module) -> nn.Module:
    """The *ForConditionalGeneration module under PEFT / DDP wrappers."""
    for _ in range(8):  # DDP -> PeftModel -> LoraModel -> *ForConditionalGeneration
        mods = model._modules  # real submodules only: wrappers forward attribute lookups
        if "lm_head" in mods and "model" in mods:
            return model
        inner = mods.get("module") or mods.get("base_model") or mods.get("model")
        if inner is None:
            break
        model = inner
    raise TypeError(f"no language model head found in {type(model).__name__}")


def _ce_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor):
    logits = F.linear(h, weight).float()
    loss = F.cross_entropy(logits, y, reduction="sum")
    correct = (logits.argmax(-1) == y).sum()
    return loss, correct


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
    DDP/FSDP wrap this module, so gradient sync sees the whole computation."""

    def __init__(self, model: nn.Module, chunk_size: int = 2048, fused_ce=None):
        super().__init__()
        self.model, self.chunk_size, self.fused_ce = model, chunk_size, fused_ce

    def forward(self, input_ids, labels, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, **kwargs):
        lm = causal_lm(self.model)
        out = lm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw, position_ids=position_ids, use_cache=False, **kwargs)
        hidden = out.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h, y = hidden[keep], targets[keep]
        weight = lm.lm_head.weight
        if self.fused_ce is not None:
            loss = self.fused_ce(weight, h, y)
            with torch.no_grad():
                correct = sum((F.linear(h[s:s + self.chunk_size], weight).argmax(-1) == y[s:s + self.chunk_size]).sum()
                              for s in range(0, h.shape[0], self.chunk_size))
        else:
            loss, correct = chunked_linear_cross_entropy(h, weight, y, self.chunk_size)
        return loss, torch.tensor(y.numel(), device=y.device), correct
