"""LaTeX formulas -> print-style row images: typeset with pdflatex (`ocrtune.evaluate.typeset`, many formulas
per run, failures isolated) and rasterized with pypdfium2."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ocrtune.evaluate.typeset import Tex, typeset_formulas


def fits_a_bucket(width_pt: float, height_pt: float) -> bool:
    """Whether a page (in points, with its 4 pt margins) could still hold ink that fits the largest bucket."""
    from ocrtune.synth.style import BUCKETS, DPI
    margin = 8 + 2 * 72 / DPI  # the page's margins, and a pixel of slack on each side
    return (width_pt - margin <= max(w for w, _ in BUCKETS) * 72 / DPI
            and height_pt - margin <= max(h for _, h in BUCKETS) * 72 / DPI)


def render_formulas(tex: Tex, formulas: list[str]) -> list[tuple[bytes | None, str]]:
    """Formulas -> [(PNG bytes of the print-style row, "") or (None, why it was skipped)], in order."""
    import numpy as np

    from ocrtune.synth.style import DPI, SCALE, png_bytes, style_row
    results: list[tuple[bytes | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="ocrtune-synth-") as tmp:
        for page, why in typeset_formulas(tex, formulas, Path(tmp)):
            if page is None:
                results.append((None, why))
            elif not fits_a_bucket(*page.get_size()):  # before rasterizing: a 10 m rule must not fill memory
                results.append((None, "too large"))
            else:
                gray = np.asarray(page.render(scale=SCALE * DPI / 72, grayscale=True).to_pil().convert("L"))
                image, why = style_row(gray)
                results.append((png_bytes(image), "") if image is not None else (None, why))
    return results
