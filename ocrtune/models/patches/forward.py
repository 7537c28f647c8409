"""The packed forward: Qwen2VLModel.forward by hand, what `train/loss.py:ResponseLoss` runs.

`hidden_states` feeds padded or packed rows to the language model (packed: per-sample M-RoPE positions and
varlen attention kwargs), with the image features from `image_embeds` (the frozen ViT without autograd, its
position ids made on the host). It patches nothing: it runs what `prepare` set up and refuses a model that
`prepare` never saw. Other families, and transformers outside the tested versions, take the stock forward.
"""
from __future__ import annotations

import contextlib

import torch

from ocrtune.models.patches.attention import VARLEN_ATTENTION
from ocrtune.models.patches.common import PREPARED, assert_prepared
from ocrtune.models.patches.versions import in_range
from ocrtune.models.patches.vision import uses_host_vision_ids, vision_host_kwargs


def image_embeds(lm, vlm, input_ids, pixel_values, image_grid_thw):
    """Token embeddings with the image features scattered into the image-pad positions. The ViT runs
    without autograd when it is frozen, with its position ids made on the host (`vision_host_kwargs`), and
    (CUDA, `prepare(vision_varlen=True)`) with all images in one varlen call per block."""
    embeds = vlm.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    frozen = not any(p.requires_grad for p in vlm.visual.parameters())
    grid = image_grid_thw.tolist()  # the one read of the grids from the device
    host = uses_host_vision_ids(vlm.visual)  # prepare(host_vision_ids=False) compares with transformers' way
    kwargs = vision_host_kwargs(grid, vlm.visual.spatial_merge_size, pixel_values.device) if host else {}
    if pixel_values.is_cuda and getattr(vlm.visual, "_ocrtune_varlen", False):  # trained or frozen
        kwargs["max_seqlen"] = max(h * w for _, h, w in grid)
    with torch.no_grad() if frozen else contextlib.nullcontext():
        feats = vlm.get_image_features(pixel_values, image_grid_thw, **kwargs).pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
    mask = (input_ids == lm.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype))


def prompt_embeds(lm, batch: dict) -> torch.Tensor | None:
    """The prompts' input embeddings (image features in place) for a generation prefill, by `image_embeds`: the ViT
    with its position ids made on the host and, where `prepare(vision_varlen=True)` ran, one varlen call per block.
    None where the model's own forward must embed them (not prepared, not qwen2_vl, transformers outside the tested
    range); the caller then hands the model the pixel values as `generate` does."""
    if (not getattr(lm, PREPARED, False) or getattr(lm.config, "model_type", None) != "qwen2_vl"
            or not in_range("transformers")):
        return None
    return image_embeds(lm, lm.model, batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"))


def hidden_states(lm, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None,
                  mm_token_type_ids=None, cu_seq_lens=None, max_length=None, **kwargs) -> torch.Tensor:
    """The language model's last hidden state for a padded or packed batch (`cu_seq_lens` from
    `data.packing.pack`). `lm` is the *ForConditionalGeneration module (`causal_lm(model)`), prepared."""
    assert_prepared(lm)
    vlm = lm.model
    if getattr(lm.config, "model_type", None) != "qwen2_vl" or not in_range("transformers"):
        # other families (Qwen2.5-VL window attention, Qwen3-VL deepstack features) go through
        # their own forward; a packed row carries 4-row position ids, from which transformers
        # builds the per-sample (document) attention mask
        out = vlm(input_ids=input_ids, attention_mask=None if cu_seq_lens is not None else attention_mask,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw, position_ids=position_ids,
                  mm_token_type_ids=mm_token_type_ids, use_cache=False, **kwargs)
        return out.last_hidden_state
    embeds = image_embeds(lm, vlm, input_ids, pixel_values, image_grid_thw)
    text = vlm.language_model
    if cu_seq_lens is not None:  # packed row
        impl = text.config._attn_implementation or "sdpa"
        if impl == VARLEN_ATTENTION or "flash" in impl:  # prepare(packing=True) selected the varlen attention
            m = int(max_length) if max_length is not None else input_ids.shape[1]
            cu = cu_seq_lens.to(input_ids.device, torch.int32)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
            masks = {t: None for t in set(getattr(text.config, "layer_types", None) or ["full_attention"])}
            out = text(inputs_embeds=embeds, position_ids=position_ids[1:], attention_mask=masks,
                       use_cache=False, **kwargs)
        else:  # sdpa without packing prepared, eager, flex: the document mask from the text positions (row 0)
            out = text(inputs_embeds=embeds, position_ids=position_ids, attention_mask=None, use_cache=False, **kwargs)
    else:
        if position_ids is None:
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == lm.config.image_token_id).long()
            position_ids, _ = vlm.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
                                                 attention_mask=attention_mask)
        out = text(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                   use_cache=False, **kwargs)
    return out.last_hidden_state
