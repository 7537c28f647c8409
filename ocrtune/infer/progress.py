"""Progress of `infer`/`eval` over a dataset: tqdm's bar on a terminal; elsewhere (a log file, a CI
job, a pipe), where a bar would be carriage-return noise or nothing, a plain line every `every_s`
seconds and one at the end."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "row", every_s: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.last_line = self.start
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.done >= self.total or now - self.last_line >= self.every_s:
            self.last_line = now
            print(self.line(now - self.start), file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", ~{(self.total - self.done) / rate:.0f}s left" if rate and self.done < self.total else ""
        pct = 100 * self.done / self.total if self.total else 100.0
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), {elapsed:.0f}s, {rate:.2f} {self.unit}s/s{left}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
