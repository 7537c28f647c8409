"""`ocrtune synth`: render LaTeX formulas into LaTeX_OCR-style rows (render.py: TeX -> pages, style.py: pages ->
print-style images, mutate.py: new formulas, run.py: the command)."""
