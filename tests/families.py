"""Tiny Qwen2.5-VL and Qwen3-VL models (random weights) built from configs, for the family tests."""
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor,
                          Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
from ocrtune.models.presets import build_tokenizer, formula_texts, SPECIAL_TOKENS, QWEN2_VL_CHAT_TEMPLATE

def build(arch, out):
    tok = build_tokenizer(formula_texts(), 512)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                initializer_range=0.1)
    if arch == "qwen2_5_vl":
        cfg = Qwen2_5_VLConfig(text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                               vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                                  fullatt_block_indexes=[1], window_size=56), **common)
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
        ip = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=50176)
        proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    else:
        cfg = Qwen3VLConfig(text_config=dict(text, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                               deepstack_visual_indexes=[1], num_position_embeddings=256), **common)
        model = Qwen3VLForConditionalGeneration._from_config(cfg)
        ip = Qwen2VLImageProcessor(min_pixels=4096, max_pixels=65536, patch_size=16)
        ip.size = {"shortest_edge": 4096, "longest_edge": 65536}
        proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", ""))
    model.save_pretrained(out); proc.save_pretrained(out)
    return out

