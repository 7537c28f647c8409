"""User-facing errors: one line that names the problem and the fix, exit status 2."""


class UserError(Exception):
    """A mistake in the user's input (flag, file, dataset, model) or environment.

    The CLI prints ``error: <message>`` on one line and exits with status 2, no traceback.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))  # always one line


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, short enough for a one-line error."""
    text = str(e).splitlines()[0][:limit] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def import_modelscope():
    """The modelscope package, which only `--use_hf false` needs."""
    try:
        import modelscope
    except ImportError:
        raise UserError("--use_hf false needs the modelscope package", "pip install modelscope, or use --use_hf true") from None
    return modelscope


def hub_failure(what: str, use_hf: bool, e: BaseException, fix: str, limit: int = 200) -> UserError:
    """The one-line error for a failed hub download or load (`what` names the object)."""
    where = "Hugging Face" if use_hf else "ModelScope"
    return UserError(f"could not {what} from {where}: {first_line(e, limit)}", fix)
