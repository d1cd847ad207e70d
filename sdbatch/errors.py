"""Errors every command reports the same way (`error: ...` on stderr, exit status 2), and how
commands leave."""

import os
import sys
from typing import NoReturn


class JobError(Exception):
    """A problem with a command's input or output as a whole: reported, nothing started."""


def exit_without_teardown(code: int) -> NoReturn:
    """Flushes stdout and stderr and ends the process with `code`, skipping the interpreter's
    teardown, where pyarrow's thread pools have aborted finished commands ("terminate called
    without an active exception", exit 134): the exit status stays the command's own."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
