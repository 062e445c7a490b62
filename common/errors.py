"""Errors a user can fix, and how they end a run: one line on stderr and exit status 2, no traceback."""
import os
import sys


class UserError(ValueError):
    """A flag, file, model, row or reward the run cannot use; the message says which and what to do."""


class DataError(UserError):
    """A data file or row the task cannot use; the message names the file, the row and the fix."""


class NonFiniteError(UserError):
    """A loss, gradient or logged quantity became NaN or infinite; the message names it."""


def exit_cleanly_on_user_errors() -> None:
    """An uncaught UserError prints `<script>: error: <message>` on stderr and exits with status 2 (no traceback)."""
    def hook(kind, value, tb):
        if not issubclass(kind, UserError):
            return sys.__excepthook__(kind, value, tb)
        sys.stdout.flush()
        # the real stderr: torch.distributed's own hook, which calls this one, redirects sys.stderr to a buffer
        print(f"{os.path.basename(sys.argv[0])}: error: {value}", file=sys.__stderr__, flush=True)
        os._exit(2)  # an excepthook cannot choose the exit status otherwise

    sys.excepthook = hook
