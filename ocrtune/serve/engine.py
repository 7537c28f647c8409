"""The `Engine` protocol: all the server asks of a model. `ocrtune.models.generate.InferEngine` implements
it; tests serve fakes that implement it too, so production code has no branches for them."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from ocrtune.models.generate import Answer


@runtime_checkable
class Engine(Protocol):
    # encode(messages, images, add_generation_prompt=True) -> {"input_ids": [...], ...} (the prompt record the
    # engine generates from), .tokenizer (its added and special tokens are refused in client text) and
    # .processor.tokenizer
    template: Any

    def generate_answers(self, records: list[dict], max_new_tokens: int = 512, temperature: float = 0.0,
                         top_p: float = 1.0) -> list[Answer]:
        """One answer per encoded prompt, in order: text, tokens generated and finish_reason."""
        ...

    def stream(self, record: dict, max_new_tokens: int = 512, stop: threading.Event | None = None,
               usage: dict | None = None, temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str]:
        """Text pieces of one answer; ends early once `stop` is set; at the end fills `usage` with the
        answer's `tokens` and `finish_reason`."""
        ...


def check_engine(engine) -> None:
    if not isinstance(engine, Engine):
        missing = [n for n in ("template", "generate_answers", "stream") if not hasattr(engine, n)]
        raise TypeError(f"{type(engine).__name__} is not a serve Engine: it lacks {', '.join(missing)}")
