"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class MamError(Exception):
    """A problem with the user's input or environment, explained in one line."""
