"""One exception hierarchy; each class carries the exit code the CLI funnel uses (SPEC §5)."""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error dispatch reports to a user."""

    exit_code = 1
    kind = "internal"
    default_message = "unexpected internal error"

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or self.default_message
        self.hint = hint
        super().__init__(self.message)


class UsageError(DispatchError):
    exit_code = 2
    kind = "usage"
    default_message = "invalid usage"


class Conflict(DispatchError):
    exit_code = 3
    kind = "conflict"
    default_message = "the task is not in a state that allows this"


class NotFound(DispatchError):
    exit_code = 4
    kind = "not-found"
    default_message = "no such task or attempt"


class Gone(DispatchError):
    exit_code = 5
    kind = "gone"
    default_message = "the task is closed"


class DispatchFailed(DispatchError):
    exit_code = 6
    kind = "dispatch-failed"
    default_message = "dispatch failed and was rolled back"


class EnvironmentProblem(DispatchError):
    """tmux or git missing, not a repository, database unusable, config invalid."""

    exit_code = 7
    kind = "environment"
    default_message = "the environment is not usable"


class ToolFailed(DispatchError):
    """An external program (git, tmux) exited non-zero; adapters raise it, services decide."""

    exit_code = 1
    kind = "internal"

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = self.stderr.splitlines()[-1] if self.stderr else f"exit status {returncode}"
        super().__init__(f"{_command_name(argv)}: {detail}")


def _command_name(argv: list[str]) -> str:
    """`git worktree`, `tmux new-window`: the program and its subcommand, without -C/-L X."""
    program = argv[0].rsplit("/", 1)[-1] if argv else "command"
    rest = list(argv[1:])
    while len(rest) >= 2 and rest[0] in ("-C", "-L", "-S", "-c"):
        rest = rest[2:]
    return f"{program} {rest[0]}" if rest else program


class DispatchRolledBack(DispatchFailed):
    """A dispatch failed at some step and was rolled back."""

    def __init__(self, message: str, *, task_id: int | None, step: str) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.step = step


class DispatchInterrupted(DispatchRolledBack):
    """Ctrl-C or SIGTERM stopped a dispatch; it was rolled back, and nothing more is started."""


class ReaderGone(Exception):
    """Whoever read stdout stopped (`| head`): the command stops there, and that is no
    error. Not an OSError: the CLI framework would end the process with exit 1 for one."""
