"""The training loader's light pixel format, in one module: made in the loader's workers (`make_light`), joined
into a batch (`join`), restored on the device into the model's input (`to_device`, `model_pixels`).

The model reads Qwen-VL patches, [N, 3*frames*P*P]: each still image tiled over the temporal patch (`frames`
times, rows laid out channel, frame, pixel), normalized, in the vision tower's dtype. Making and moving those in
the workers (normalizing, casting, shared memory, the pinned copy, the host-to-device copy) set the pace of a
small model's training, so the workers send them light and the device restores the same values:
- 8 bits: each image as one frame before the processor's rescale and normalization, [N, C, P*P] (C = 1 for a
  gray image), with `pixel_norm` (the processor's fused mean and std) and `pixel_frames`: a sixth of the bytes
  of bf16, a twelfth of float32, for gray formula images;
- one frame: a processor that can't give 8 bits sends one normalized frame, [N, 3*P*P] in the batch's
  `pixel_dtype`, with `pixel_frames`.
A sample or batch in the light form carries `pixel_frames` (and `pixel_norm` for 8 bits); the paths that take a
plain model input refuse it (`refuse_light`).
"""
from __future__ import annotations

import torch

LIGHT_KEYS = ("pixel_frames", "pixel_norm")


def refuse_light(values: dict, where: str) -> None:
    """The one check that light pixels did not reach a path that reads a plain model input."""
    if any(values.get(k) is not None for k in LIGHT_KEYS):
        raise ValueError(f"light pixels (pixel_frames/pixel_norm) reached {where}: a sample goes through "
                         "train.data.Collator, a batch through ocrtune.data.pixels.to_device, which restore them")


def pixel_norm(ip) -> torch.Tensor:
    """[2, 3] float32: the mean and std that a transformers image processor's fused rescale-and-normalize subtracts
    and divides by ((x - mean / rescale_factor) / (std / rescale_factor), computed as it does), so 8-bit pixels
    normalized with them equal its own output bit for bit."""
    scale = 1.0 / ip.rescale_factor
    return torch.stack([torch.tensor(ip.image_mean, dtype=torch.float32).expand(3) * scale,
                        torch.tensor(ip.image_std, dtype=torch.float32).expand(3) * scale])


# ---------------------------------------------------------------- make (a loader worker, one sample)

def make_light(ip, images, frames: int, eight_bit: bool | None) -> tuple[dict, bool | None]:
    """`images` in the light form, and whether the processor `ip` gives 8 bits (`eight_bit`: what an earlier call
    found, None for not yet known). Each still image is one frame, not tiled over the temporal patch (that strided
    copy was most of the processor's time). A processor that can't give 8 bits sends one normalized frame, or,
    ignoring the one-frame request too, every frame (a plain input, no `pixel_frames`)."""
    size = 3 * ip.patch_size ** 2
    if eight_bit is not False and getattr(ip, "do_rescale", True) and getattr(ip, "do_normalize", True):
        out = ip(images=images, return_tensors="pt", temporal_patch_size=1, do_rescale=False, do_normalize=False)
        pv = out["pixel_values"]
        if pv.dtype == torch.uint8 and pv.shape[-1] == size:
            rgb = pv.view(pv.shape[0], 3, -1)
            gray = torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])
            return {"pixel_values": rgb[:, :1].clone() if gray else rgb, "image_grid_thw": out["image_grid_thw"],
                    "pixel_frames": frames, "pixel_norm": pixel_norm(ip)}, True
        eight_bit = False  # (this processor can't: not asked again, one call an image from now on)
    out = ip(images=images, return_tensors="pt", temporal_patch_size=1)
    vision = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    if vision["pixel_values"].shape[-1] == size:
        vision["pixel_frames"] = frames
    return vision, eight_bit


# ---------------------------------------------------------------- frames

def one_frame(pixel_values: torch.Tensor, frames: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Qwen-VL patches of still images hold each image `frames` times (the processor tiles it over the temporal
    patch: rows laid out channel, frame, pixel): the first frame alone, [N, C*P*P] (in `dtype` if given), or None
    where the frames differ (a video) and nothing may be dropped."""
    n, dim = pixel_values.shape
    if dim % (3 * frames):
        return None
    v = pixel_values.view(n, 3, frames, dim // (3 * frames))
    if not all(torch.equal(v[:, :, 0], v[:, :, t]) for t in range(1, frames)):
        return None
    first = torch.empty(n, 3, dim // (3 * frames), dtype=dtype or v.dtype)
    return first.copy_(v[:, :, 0]).view(n, -1)  # one pass: the slice, gathered and cast


def all_frames(pixel_values: torch.Tensor, frames: int) -> torch.Tensor:
    """`one_frame`'s inverse: each image's frame repeated `frames` times, in the processor's layout."""
    n, dim = pixel_values.shape
    return pixel_values.view(n, 3, 1, dim // 3).expand(n, 3, frames, dim // 3).reshape(n, 3 * frames * (dim // 3))


# ---------------------------------------------------------------- pack (a loader worker, one batch)

def join(samples: list[dict], frames: int | None, pixel_dtype: torch.dtype | None,
         light: bool) -> tuple[list[dict], dict, torch.dtype | None]:
    """The samples with the pixels a batch joins, what the batch needs to restore them (`pixel_frames`,
    `pixel_norm`), and the dtype to join them in (8 bits stay 8 bits). `light`: the batch may leave in the light
    form (a loader worker's); else it is a plain model input, every image normalized with all its frames in
    `pixel_dtype`. A batch has one layout: 8 bits where every sample has them (a gray image's channel repeated
    where others have three), else one frame of each still image where every sample allows it (a video's frames
    differ: all are sent), else the plain input."""
    pixels = [(s["pixel_values"], s.get("pixel_frames"), s.get("pixel_norm")) for s in samples if "pixel_values" in s]
    if not pixels:
        return samples, {}, pixel_dtype
    kept, extra = None, {}
    if light and frames and frames > 1:
        if all(n is not None and f == frames for _, f, n in pixels):
            channels = max(p.shape[1] for p, _, _ in pixels)
            kept = [p.expand(-1, channels, -1) for p, _, _ in pixels]
            extra = {"pixel_frames": torch.tensor(frames), "pixel_norm": pixels[0][2]}
        else:
            single = [_normalized_frame(p, f, n, frames, pixel_dtype) for p, f, n in pixels]
            if all(p is not None for p in single):
                kept, extra = single, {"pixel_frames": torch.tensor(frames)}
    if kept is None:  # a plain model input: every image normalized, with all its frames
        kept = [model_pixels(p, f, n) for p, f, n in pixels]
    it = iter(kept)
    out = []
    for s in samples:
        if "pixel_values" in s:
            s = {k: v for k, v in s.items() if k not in LIGHT_KEYS}
            s["pixel_values"] = next(it)
        out.append(s)
    return out, extra, None if "pixel_norm" in extra else pixel_dtype


def _normalized_frame(pixels, frames, norm, batch_frames: int, dtype):
    """One normalized frame of a sample's still images in `dtype`, or None where its frames differ."""
    if norm is not None:
        return model_pixels(pixels, None, norm, dtype)
    return pixels if frames == batch_frames else one_frame(pixels, batch_frames, dtype)


# ---------------------------------------------------------------- restore (the device)

def model_pixels(pixel_values: torch.Tensor, frames=None, norm: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Light pixels -> the model's input, [N, 3*frames*P*P] in the processor's layout: 8-bit values
    ([N, C, P*P], C = 1 for a gray image) normalized as the processor does, in float32 (`norm`: its fused mean and
    std, `pixel_norm`; bit for bit its output), cast to `dtype`; then each image's one frame repeated `frames`
    times. Runs on the device (`to_device`), or in-process where a batch must be plain (`join`)."""
    if norm is not None:
        n, _, pp = pixel_values.shape  # (a gray image's one channel broadcasts to three)
        pixel_values = ((pixel_values.float() - norm[0].view(1, 3, 1)) / norm[1].view(1, 3, 1)).view(n, 3 * pp)
    if dtype is not None:
        pixel_values = pixel_values.to(dtype)
    return all_frames(pixel_values, int(frames)) if frames is not None else pixel_values


def to_device(batch: dict, device, pixel_dtype: torch.dtype | None = None) -> dict:
    """A batch's tensors on `device`, as the model reads them: light pixels (a sixth of the bytes to copy)
    restored there (`model_pixels`, in `pixel_dtype`), before the batch reaches the wrapped model, whose
    mixed-precision policy (FSDP2, DeepSpeed fp16) would cast a float `pixel_norm` passed through it."""
    frames, norm = batch.get("pixel_frames"), batch.get("pixel_norm")
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in LIGHT_KEYS}
    if frames is not None:
        norm = None if norm is None else norm.to(device, non_blocking=True)
        out["pixel_values"] = model_pixels(out["pixel_values"], int(frames), norm, pixel_dtype)
    return out
