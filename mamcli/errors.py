"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class MamError(Exception):
    """A problem with the user's input or environment, explained in one line; the CLI exits ``exit_code``."""

    exit_code = 1


class UsageError(MamError):
    """Words the command does not take, found past the parser (a recipe's unknown key): exit 2 like the parser's."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised where the program is so every ``finally`` and cleanup runs; the CLI
    exits 128 + signal number (130, 143, 129) like a shell. Not an Exception: ``except Exception`` must not
    swallow it."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
