"""Settings from the TOML config file, the environment and global options (SPEC §6)."""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dispatch.errors import EnvironmentProblem
from dispatch.lifecycle import Completion

PLACEHOLDERS = frozenset(
    {"prompt", "prompt_file", "task_id", "attempt_id", "worktree", "branch", "session_id"}
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class AgentProfile:
    """How to start (and resume) one kind of agent."""

    name: str
    command: tuple[str, ...]
    resume: tuple[str, ...] | None = None
    completion: Completion = Completion.EXIT

    def argv(self, values: Mapping[str, str], *, resume: bool = False) -> list[str]:
        """The argv with placeholders replaced inside each element, in one pass, never re-split."""
        template = self.resume if resume and self.resume else self.command
        return [_PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), part) for part in template]


BUILTIN_AGENTS: dict[str, AgentProfile] = {
    p.name: p
    for p in (
        # Interactive Claude Code: each task has its own worktree, so "latest here" is this task's.
        AgentProfile("claude", ("claude", "{prompt}"), ("claude", "--continue")),
        # Print mode is where --session-id fixes the stored session's id.
        AgentProfile(
            "claude-headless",
            ("claude", "-p", "--session-id", "{session_id}", "{prompt}"),
            ("claude", "-p", "--resume", "{session_id}", "Continue the task."),
        ),
        AgentProfile("codex", ("codex", "{prompt}"), ("codex", "resume", "--last")),
        AgentProfile(
            "aider",
            ("aider", "--message-file", "{prompt_file}"),
            ("aider", "--message-file", "{prompt_file}", "--restore-chat-history"),
        ),
        AgentProfile("shell", ("sh", "-c", "{prompt}")),
    )
}


_NUMBER = (int, float)
_NO_PATH = Path()
_DURATION_TYPES = (str, int, float)


def _key(kinds: type | tuple[type, ...], expected: str, *, default: Any) -> Any:
    """A setting the config file may give: what it takes, said once with its default."""
    return field(default=default, metadata={"config": (kinds, expected)})


@dataclass(frozen=True)
class Settings:
    """Everything dispatch reads from outside its database, resolved once per process."""

    home: Path
    database: str = _key(str, "a database URL or path", default="")
    config_path: Path | None = None
    worktree_root: Path = _key(str, "a directory path", default=_NO_PATH)  # noqa: RUF009
    default_agent: str = _key(str, "an agent profile name", default="claude")
    max_running: int = _key(int, "a whole number >= 0", default=0)
    max_dispatch_failures: int = _key(int, "a whole number >= 0", default=3)
    lease_seconds: float = _key(_NUMBER, "a number of seconds > 0", default=120.0)
    spawn_timeout: float = _key(_NUMBER, "a number of seconds > 0", default=10.0)
    heartbeat_interval: float = _key(_NUMBER, "a number of seconds > 0", default=15.0)
    stale_after: float = _key(_DURATION_TYPES, "a duration such as 10m", default=600.0)
    gc_after: float = _key(_DURATION_TYPES, "a duration such as 7d", default=7 * 86400.0)
    tmux_socket: str = ""
    # Reads (list, show, run --next, the monitor) write nothing, not even a reap.
    no_reap: bool = False
    tmux_session: str = "dispatch"
    host: str = ""
    agents: Mapping[str, AgentProfile] = field(default_factory=lambda: dict(BUILTIN_AGENTS))

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def attempts_dir(self) -> Path:
        return self.home / "attempts"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    def agent(self, name: str) -> AgentProfile:
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(sorted(self.agents))
            raise EnvironmentProblem(
                f"unknown agent profile {name!r} (known: {known})",
                hint="define it under [agents.NAME] in the config file",
            ) from None

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# The longest duration taken: a century. Every duration is also subtracted from the
# present, and dates end at year 1 (a longer one failed as an internal error).
MAX_DURATION_SECONDS = 36_500 * 86_400.0


def parse_duration(text: str | int | float) -> float:
    """Seconds from `90`, `30s`, `10m`, `1h30m`, `2d`; ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"negative duration: {text!r}")
        return _at_most_a_century(float(text), text)
    spec = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", spec):
        return _at_most_a_century(float(spec), text)
    parts = _DURATION.findall(spec)
    if not spec or "".join(n + u for n, u in parts) != spec.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h30m)")
    return _at_most_a_century(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts), text)


def _at_most_a_century(seconds: float, text: str | int | float) -> float:
    if not seconds <= MAX_DURATION_SECONDS:  # NaN too
        raise ValueError(f"duration {text!r} is longer than a century (36500d)")
    return seconds


def _absolute(path: str | Path) -> Path:
    # Absolute: the wrapper gets these paths in its environment and runs in another cwd.
    return Path(os.path.abspath(Path(path).expanduser()))


def default_home(env: Mapping[str, str]) -> Path:
    if env.get("DISPATCH_HOME"):
        return _absolute(env["DISPATCH_HOME"])
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return _absolute(data) / "dispatch"


def default_config_path(env: Mapping[str, str]) -> Path:
    if env.get("DISPATCH_CONFIG"):
        return _absolute(env["DISPATCH_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return _absolute(base) / "dispatch" / "config.toml"


def database_url(value: str) -> str:
    """An SQLAlchemy URL from a URL or a file path (`--db`, `DISPATCH_DB`, `database`)."""
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def load_settings(
    *,
    config: str | None = None,
    db: str | None = None,
    env: Mapping[str, str] | None = None,
    read_file: bool = True,
) -> Settings:
    """Defaults < config file < environment < global options (without `read_file`, the
    file is left out: what doctor checks when the file does not load)."""
    env = os.environ if env is None else env
    home = default_home(env)
    path = _absolute(config) if config else default_config_path(env)
    explicit = read_file and bool(config or env.get("DISPATCH_CONFIG"))
    found = read_file and path.exists()
    raw: dict[str, Any] = {}
    text = ""
    if found:
        text = _read_config(path)
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise EnvironmentProblem(_toml_error(path, text, exc)) from None
    elif explicit:
        raise EnvironmentProblem(f"config {path}: no such file")
    settings = _from_mapping(raw, text, path, home)
    if not found:
        settings = replace(settings, config_path=None)
    database = db or env.get("DISPATCH_DB") or raw.get("database")
    if database:
        settings = replace(settings, database=database_url(str(database)))
    if "DISPATCH_TMUX_SOCKET" in env:
        settings = replace(settings, tmux_socket=env["DISPATCH_TMUX_SOCKET"])
    host = env.get("DISPATCH_HOST") or socket.gethostname()
    return replace(settings, host=host, no_reap=env.get("DISPATCH_NO_REAP", "") not in ("", "0"))


def _read_config(path: Path) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise EnvironmentProblem(f"config {path}: is a directory, not a file") from None
    except OSError as exc:
        raise EnvironmentProblem(f"config {path}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EnvironmentProblem(
            f"config {path}:{line}: invalid TOML: not UTF-8 (byte {data[exc.start]:#04x})"
        ) from None


_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$")


def _toml_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """`config FILE:LINE: invalid TOML: why`; tomllib only says where inside its message."""
    message = str(exc)
    found = _TOML_POSITION.search(message)
    if found is None:
        return f"config {path}: invalid TOML: {message}"
    line = int(found[1]) if found[1] else max(1, len(text.splitlines()))
    return f"config {path}:{line}: invalid TOML: {message[: found.start()]}"


# The top-level keys of the config file, from the Settings fields that declare one.
_SCALARS: dict[str, tuple[type | tuple[type, ...], str]] = {
    f.name: f.metadata["config"] for f in fields(Settings) if "config" in f.metadata
}
_SECONDS = ("lease_seconds", "spawn_timeout", "heartbeat_interval", "stale_after", "gc_after")


Fail = Callable[[tuple[str, ...], str], EnvironmentProblem]


def _from_mapping(raw: Mapping[str, Any], text: str, path: Path, home: Path) -> Settings:
    def fail(key: tuple[str, ...], why: str) -> EnvironmentProblem:
        line = _line_of(text, key)
        where = f"{path}" + (f":{line}" if line else "")
        return EnvironmentProblem(f"config {where}: {'.'.join(key)}: {why}")

    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("tmux", "agents"):
            continue
        if key not in _SCALARS:
            raise fail((key,), "unknown key")
        values[key] = _scalar(key, value, fail)

    tmux = raw.get("tmux", {})
    if not isinstance(tmux, dict):
        raise fail(("tmux",), "expected a [tmux] table")
    for key, value in tmux.items():
        if key not in ("socket", "session"):
            raise fail(("tmux", key), "unknown key")
        if not isinstance(value, str) or (key == "session" and not _SESSION.fullmatch(value)):
            raise fail(("tmux", key), f"expected a name, got {value!r}")

    agents = dict(BUILTIN_AGENTS)
    table = raw.get("agents", {})
    if not isinstance(table, dict):
        raise fail(("agents",), "expected [agents.NAME] tables")
    for name, spec in table.items():
        agents[name] = _profile(name, spec, fail)

    values.pop("database", None)  # the environment and --db may override it: load_settings
    default_agent = values.get("default_agent", Settings.default_agent)
    if default_agent not in agents:
        raise fail(("default_agent",), f"no agent profile named {default_agent!r}")
    root = values.pop("worktree_root", None)
    given: dict[str, Any] = {k: float(v) if k in _SECONDS else v for k, v in values.items()}
    return Settings(
        home=home,
        database=f"sqlite:///{home / 'dispatch.db'}",
        config_path=path,
        worktree_root=_absolute(root) if root else home / "worktrees",
        tmux_socket=tmux.get("socket", ""),
        tmux_session=tmux.get("session", "dispatch"),
        agents=agents,
        **given,
    )


# Bounds beyond which a number is a mistake: a lease of 1e308 s overflows every clock,
# and NaN compares false with everything, so a wait for it would never end.
_MAX_SECONDS = 366 * 86400.0
_MAX_COUNT = 2**31 - 1


# Keys given as durations (`10m`, `7d`) or as a number of seconds.
_DURATIONS = ("stale_after", "gc_after")


def _scalar(key: str, value: Any, fail: Fail) -> Any:
    kinds, expected = _SCALARS[key]
    seconds = key in _SECONDS
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise fail((key,), f"expected {expected}, got {value!r}")
    number: Any = value
    if isinstance(value, int | float):
        limit = _MAX_SECONDS if seconds else _MAX_COUNT
        positive = seconds and key not in _DURATIONS
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise fail((key,), f"expected {expected}, got {value!r}")
        if value > limit:
            raise fail((key,), f"expected {expected}, at most {limit:g}; got {value!r}")
    if key in _DURATIONS:
        try:
            number = parse_duration(number)
        except ValueError as exc:
            raise fail((key,), str(exc)) from None
        if number > _MAX_SECONDS:
            raise fail((key,), f"expected {expected}, at most {_MAX_SECONDS:g}s; got {value!r}")
    return number


# tmux treats `:` and `.` in a target as separators, so a session name cannot hold them.
_SESSION = re.compile(r"[A-Za-z0-9_-]+")


def _profile(name: str, spec: Any, fail: Fail) -> AgentProfile:
    here = ("agents", name)
    if not isinstance(spec, dict):
        raise fail(here, "expected a table with command = [...]")
    base = BUILTIN_AGENTS.get(name)
    for key in spec:
        if key not in ("command", "resume", "completion"):
            raise fail((*here, key), "unknown key")
    command = spec.get("command", list(base.command) if base else None)
    if command is None:
        raise fail((*here, "command"), "missing; expected a list of strings")
    resume = spec.get("resume", list(base.resume) if base and base.resume else None)
    for key, argv in (("command", command), ("resume", resume)):
        if argv is None:
            continue
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise fail((*here, key), "expected a non-empty list of strings")
        unknown = {m for a in argv for m in _PLACEHOLDER.findall(a)} - PLACEHOLDERS
        if unknown:
            raise fail((*here, key), f"unknown placeholder {{{sorted(unknown)[0]}}}")
    completion = spec.get("completion", base.completion.value if base else "exit")
    try:
        mode = Completion(completion)
    except (ValueError, TypeError):
        why = f"expected exit, signal or commits, got {completion!r}"
        raise fail((*here, "completion"), why) from None
    return AgentProfile(name, tuple(command), tuple(resume) if resume else None, mode)


_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?")
_ASSIGN = re.compile(rf"({_DOTTED})\s*=")


def _key_path(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip("\"'") for part in re.findall(_KEY_PART, dotted))


def _line_of(text: str, key: tuple[str, ...]) -> int | None:
    """The line that sets `key`, else the nearest enclosing table's (tomllib reports neither)."""
    table: tuple[str, ...] = ()
    best: tuple[int, int] | None = None  # (matched depth, line)
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = _HEADER.fullmatch(stripped)
        if header:
            table = _key_path(header[1])
            full = table
        else:
            assign = _ASSIGN.match(stripped)
            if not assign:
                continue
            full = table + _key_path(assign[1])
        if full == key:
            return number
        if full == key[: len(full)] and (best is None or len(full) > best[0]):
            best = (len(full), number)
    return best[1] if best else None
