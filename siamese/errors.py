"""Errors a user can fix: the CLI prints their message on one line and exits 2."""


class SiameseError(ValueError):
    """A problem with the user's input, settings or files; the message names the file and the fix."""


def plural(n: int, noun: str) -> str:
    """`plural(1, "image")` is "1 image", `plural(3, "image")` is "3 images" (for messages)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
