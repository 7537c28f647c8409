"""User-facing errors: one line that names the problem and the fix, exit status 2."""


class UserError(Exception):
    """A mistake in the user's input (flag, file, dataset, model) or environment.

    The CLI prints ``error: <message>`` on one line and exits with status 2, no traceback.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))  # always one line
