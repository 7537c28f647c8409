"""Sample predictions of a from-scratch recipe run, with their renderings: for each picked row, the input image,
the reference and the prediction typeset by real LaTeX in the print style (`ocrtune.synth`), and the row's
BLEU-4. Rows come from the run's predictions.jsonl (the first 20 of each evaluation); images from the dataset.

    python bench/learning/plot_predictions.py --data_dir ../shared/data/latex_ocr --eval stage2_handwrite \\
        --split handwrite/validation --rows 6 --out bench/learning/run17_eight_bit_h200/predictions_handwrite.png
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--predictions", default="bench/learning/run17_eight_bit_h200/predictions.jsonl")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--eval", default="stage2_handwrite", help="which evaluation's rows (the 'eval' key)")
    p.add_argument("--split", default="handwrite/validation", help="<subset>/<split> the evaluation read")
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    from PIL import Image

    from ocrtune.evaluate.typeset import find_tex
    from ocrtune.synth.render import render_formulas
    rows = [r for r in map(json.loads, open(a.predictions)) if r["eval"] == a.eval][:a.rows]
    table = pq.read_table(Path(a.data_dir) / f"{a.split}.parquet").to_pylist()
    rendered = render_formulas(find_tex(), [x for r in rows for x in (r["reference"], r["prediction"])])
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 1.6 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        images = [Image.open(io.BytesIO(table[r["index"]]["image"]["bytes"])).convert("L")]
        for png, why in rendered[2 * i:2 * i + 2]:
            images.append(Image.open(io.BytesIO(png)) if png else None)
        for j, (im, title) in enumerate(zip(images, ("input", "reference, rendered", f"prediction, rendered: BLEU-4 {r['bleu4']:.2f}"))):
            ax = axes[i][j]
            ax.axis("off")
            if im is None:
                ax.text(0.5, 0.5, "(does not typeset)", ha="center", va="center")
            else:
                ax.imshow(im, cmap="gray", vmin=0, vmax=255)
            if i == 0 or j == 2:  # column heads once; every prediction its own score
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"{a.eval}: first {len(rows)} rows of {a.predictions}", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=80)


if __name__ == "__main__":
    main()
