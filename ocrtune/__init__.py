"""ocrtune: fine-tune Qwen2-VL family models for image-to-text OCR (LaTeX formulas first)."""

__version__ = "0.1.0"
