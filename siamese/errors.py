"""Errors a user can fix: the CLI prints their message on one line and exits 2."""


class SiameseError(ValueError):
    """A problem with the user's input, settings or files; the message names the file and the fix."""
