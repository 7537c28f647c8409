"""The light pixel format's one guard (`ocrtune.data.pixels.refuse_light`) at every path that reads a plain input."""
from __future__ import annotations

import pytest
import torch

from ocrtune.data.packing import pack
from ocrtune.data.pixels import all_frames, join, one_frame, refuse_light
from ocrtune.models.template import collate


def _sample(light: bool) -> dict:
    s = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "mm_token_type_ids": [0, 1, 0],
         "pixel_values": torch.zeros(4, 12), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    return {**s, "pixel_frames": 2} if light else s


@pytest.mark.parametrize("path", [lambda s: collate(s, 0), lambda s: pack(s, 0)], ids=["collate", "pack"])
def test_a_plain_path_refuses_a_light_sample_and_takes_a_plain_one(path):
    with pytest.raises(ValueError, match=r"light pixels \(pixel_frames/pixel_norm\) reached .*to_device"):
        path([_sample(False), _sample(True)])
    assert path([_sample(False)])["pixel_values"].shape == (4, 12)


def test_refuse_light_ignores_absent_and_none_keys():
    refuse_light({"pixel_frames": None, "pixel_norm": None}, "here")
    refuse_light({"pixel_values": torch.zeros(1)}, "here")
    with pytest.raises(ValueError, match="reached here"):
        refuse_light({"pixel_norm": torch.zeros(2, 3)}, "here")


def test_join_sends_one_frame_only_when_light_and_restores_every_frame_otherwise():
    frame = torch.arange(2 * 6, dtype=torch.float32).view(2, 6)  # 2 patches, 3 channels x 2 pixels
    tiled = all_frames(frame, 2)
    assert torch.equal(one_frame(tiled, 2), frame)
    plain = {"input_ids": [1], "pixel_values": tiled, "image_grid_thw": torch.tensor([[1, 1, 2]])}
    out, extra, dtype = join([plain], 2, torch.bfloat16, light=True)
    assert torch.equal(out[0]["pixel_values"], frame.to(torch.bfloat16)) and int(extra["pixel_frames"]) == 2
    assert dtype is torch.bfloat16
    out, extra, dtype = join([plain], 2, torch.bfloat16, light=False)
    assert torch.equal(out[0]["pixel_values"], tiled) and extra == {} and dtype is torch.bfloat16
