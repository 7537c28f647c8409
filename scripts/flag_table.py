"""Print the markdown flag tables of the README from the argument dataclasses (keeps docs in sync)."""
import dataclasses
import sys

from ocrtune.infer.args import ExportArgs, InferArgs
from ocrtune.train.args import SftArgs


def table(cls) -> str:
    rows = ["| flag (aliases) | default | what it does |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        m = f.metadata
        names = ", ".join([f"`--{f.name}`", *[f"`{a}`" for a in m.get("aliases", ())]])
        env = f" (env `{m['env']}`)" if m.get("env") else ""
        default = f.default if f.default is not dataclasses.MISSING else ""
        help_ = m.get("help", "").replace("|", "\\|")
        choices = f" Choices: {', '.join(m['choices'])}." if m.get("choices") else ""
        rows.append(f"| {names}{env} | `{default}` | {help_}{choices} |")
    return "\n".join(rows)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "sft"
    if which == "serve":
        from ocrtune.serve.args import ServeArgs
        print(table(ServeArgs))
    elif which == "synth":
        from ocrtune.synth.run import SynthArgs
        print(table(SynthArgs))
    else:
        print(table({"sft": SftArgs, "infer": InferArgs, "export": ExportArgs}[which]))
