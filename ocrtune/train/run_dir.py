"""The run folder: its name (`<output_dir>/<model>/v<N>-<time>`), the check that it can be written, and the files
that describe the run (args.json, data_fingerprint.json)."""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path

from ocrtune.data.fingerprint import write_fingerprints
from ocrtune.errors import UserError


def new_run_dir(args, model_name: str) -> Path:
    base = Path(args.output_dir)
    if not args.add_output_dir_suffix:
        return base
    parent = base / model_name.replace("/", "--")
    n = len([p for p in parent.glob("v*-*") if p.is_dir()]) if parent.exists() else 0
    return parent / f"v{n}-{datetime.now():%Y%m%d-%H%M%S}"


def make_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {run_dir} is not writable ({e.strerror})", "pass a writable --output_dir") from None


def write_run_files(run_dir: Path, args, model_dir, template: str, model_type: str | None) -> None:
    """args.json (the run's settings, what a resume reads back) and the data fingerprints a resume checks."""
    with open(run_dir / "args.json", "w") as f:
        json.dump({**dataclasses.asdict(args), "model_dir": str(model_dir), "template": template,
                   "model_type": model_type}, f, indent=2)
    write_fingerprints(run_dir, (args.dataset or []) + (args.val_dataset or []))
