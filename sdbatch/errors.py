"""Errors every command reports the same way: `error: ...` on stderr, exit status 2."""


class JobError(Exception):
    """A problem with a command's input or output as a whole: reported, nothing started."""
