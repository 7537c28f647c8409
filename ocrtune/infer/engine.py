"""Generation: batched greedy/sampled/beam decoding and token streaming over a model + template.

The engine moved to `ocrtune.models.generate` and the device/dtype choice (`pick_device`, `pick_dtype`)
to `ocrtune.models.dtypes` (issue 14); this module re-exports them so existing imports keep working.
"""
from __future__ import annotations

from ocrtune.models.dtypes import DTYPES, pick_device, pick_dtype  # noqa: F401  (moved; issue 14)
from ocrtune.models.generate import Answer, InferEngine, _is_image, _StopOnEvent  # noqa: F401  (moved; issue 14)
