"""add, list, show, events, reset, close, reopen through the CLI entry point (SPEC §5)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from dispatch.app import App
from tests import witness
from tests.cli.inprocess import InProcess
from tests.conftest import Env, Result
from tests.orm import ended_attempt

Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: Env) -> Cli:
    """In this module the many calls run in-process; the terminal test starts real ones."""
    return InProcess(capsys, monkeypatch, env)


TASK_KEYS = {
    "id", "title", "status", "repo", "agent", "base_ref", "priority", "closed",
    "last_error", "created_at", "updated_at", "branch", "worktree",
}  # fmt: skip
ATTEMPT_KEYS = {
    "id", "task_id", "number", "state", "outcome", "exit_code", "host", "tmux_target",
    "worktree", "branch", "session_id", "started_at", "ended_at", "heartbeat_at", "error",
    "redispatch_of",
}  # fmt: skip
EVENT_KEYS = {"id", "task_id", "attempt_id", "kind", "from_status", "to_status", "at", "detail"}


def _iso_utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    offset = parsed.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return parsed


def _add(cli: Cli, repo: Path, title: str, *args: str) -> int:
    done = cli("add", title, *args, cwd=repo)
    assert done.code == 0, done.stderr
    return int(done.stdout)


# -- add -----------------------------------------------------------------------------------


def test_add_prints_the_id_and_creates_a_ready_task(cli: Cli, repo: Path) -> None:
    first = cli("add", "first task", cwd=repo)
    second = cli("add", "second task", cwd=repo)
    assert (first.code, first.stdout, second.stdout) == (0, "1\n", "2\n")
    assert first.stderr == ""
    tasks = cli("list", "--json").json()
    assert [(t["id"], t["title"], t["status"]) for t in tasks] == [
        (1, "first task", "ready"),
        (2, "second task", "ready"),
    ]


def test_add_json_is_exactly_the_task_shape(cli: Cli, repo: Path) -> None:
    done = cli("add", "shape", "--json", "--priority", "4", "--agent", "shell", cwd=repo)
    assert done.code == 0, done.stderr
    task = done.json()
    assert set(task) == TASK_KEYS
    assert task["id"] == 1
    assert task["status"] == "ready"
    assert task["repo"] == str(repo.resolve())
    assert task["agent"] == "shell"
    assert task["base_ref"] == "main"
    assert task["priority"] == 4
    assert task["closed"] is False
    assert task["last_error"] is None and task["branch"] is None and task["worktree"] is None
    assert _iso_utc(task["created_at"]) == _iso_utc(task["updated_at"])


def test_add_resolves_the_repository_to_its_top_level(cli: Cli, repo: Path, env: Env) -> None:
    sub = repo / "src" / "deep"
    sub.mkdir(parents=True)
    from_sub = cli("add", "from a subdirectory", "--json", cwd=sub)
    assert from_sub.code == 0, from_sub.stderr
    assert from_sub.json()["repo"] == str(repo.resolve())
    elsewhere = cli("add", "with --repo", "--repo", str(sub), "--json", cwd=env.root)
    assert elsewhere.code == 0, elsewhere.stderr
    assert elsewhere.json()["repo"] == str(repo.resolve())
    relative = cli("add", "relative --repo", "--repo", "repo/src", "--json", cwd=env.root)
    assert relative.json()["repo"] == str(repo.resolve())


def test_add_from_a_tasks_worktree_adds_to_its_repository(
    cli: Cli, repo: Path, env: Env, git: Callable[..., str]
) -> None:
    """A worktree dispatch made is the repository's, and gc removes it: a task added from
    inside one belongs to the repository. A worktree the user made elsewhere is theirs."""
    first = int(cli("add", "first", cwd=repo).stdout)
    own = env.home / "worktrees" / repo.name / f"task-{first}"
    git(repo, "worktree", "add", "-q", "-b", f"dispatch/{first}-first", str(own))
    (own / "sub").mkdir()
    inside = cli("add", "follow-up", "--json", cwd=own / "sub")
    assert inside.code == 0, inside.stderr
    assert (inside.json()["repo"], inside.json()["base_ref"]) == (str(repo.resolve()), "main")
    given = cli("add", "given", "--repo", str(own), "--json", cwd=env.root)
    assert given.json()["repo"] == str(repo.resolve())
    users = env.root / "users-worktree"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(users))
    theirs = cli("add", "in the user's worktree", "--json", cwd=users)
    assert (theirs.json()["repo"], theirs.json()["base_ref"]) == (str(users.resolve()), "feature")


def test_add_uses_the_current_branch_or_the_given_base(
    cli: Cli, repo: Path, git: Callable[..., str]
) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    assert cli("add", "on feature", "--json", cwd=repo).json()["base_ref"] == "feature"
    based = cli("add", "on main", "--base", "main", "--json", cwd=repo)
    assert based.json()["base_ref"] == "main"
    missing = cli("add", "on nothing", "--base", "no-such-ref", cwd=repo)
    assert missing.code == 2
    assert "no-such-ref" in missing.stderr


def test_add_outside_a_repository_is_an_environment_error(cli: Cli, env: Env) -> None:
    plain = env.root / "plain"
    plain.mkdir()
    done = cli("add", "nowhere", cwd=plain)
    assert done.code == 7
    assert "is not a git repository" in done.stderr and str(plain) in done.stderr
    done = cli("add", "nowhere", "--repo", str(env.root / "missing"))
    assert done.code == 7
    assert cli("list", "--json").json() == []


def test_add_in_a_repository_without_commits_is_refused(cli: Cli, env: Env) -> None:
    empty = env.root / "empty"
    subprocess.run(["git", "init", "-q", "-b", "main", str(empty)], check=True)
    done = cli("add", "nothing to branch from", cwd=empty)
    assert done.code == 7
    assert "no commits" in done.stderr


def test_add_with_an_unknown_agent_is_a_usage_error(cli: Cli, repo: Path) -> None:
    done = cli("add", "who", "--agent", "gpt-9", cwd=repo)
    assert done.code == 2
    assert "unknown agent profile 'gpt-9'" in done.stderr
    assert "claude" in done.stderr  # the known ones are listed
    assert cli("list", "--json").json() == []


def test_add_with_an_agent_from_the_config(cli: Cli, repo: Path, env: Env) -> None:
    env.write_config('[agents.mine]\ncommand = ["true"]\n')
    assert cli("add", "mine", "--agent", "mine", "--json", cwd=repo).json()["agent"] == "mine"


def test_add_takes_the_default_agent_from_the_config(cli: Cli, repo: Path, env: Env) -> None:
    env.write_config('default_agent = "codex"\n')
    assert cli("add", "default", "--json", cwd=repo).json()["agent"] == "codex"


def _prompt_of(env: Env, task_id: int) -> str:
    (row,) = witness.rows(env, "SELECT prompt FROM tasks WHERE id = ?", task_id)
    return str(row[0])


def test_the_prompt_from_an_option_a_file_or_stdin(cli: Cli, repo: Path, env: Env) -> None:
    text = "Fix the bug.\n\nSteps:\n  1. `make test`\n  2. $(echo no)\n"
    prompt_file = env.root / "prompt.md"
    prompt_file.write_text(text, encoding="utf-8")
    by_option = _add(cli, repo, "a", "--prompt", text)
    by_file = _add(cli, repo, "b", "--prompt-file", str(prompt_file))
    by_stdin = cli("add", "c", "--prompt-file", "-", cwd=repo, input=text)
    assert by_stdin.code == 0, by_stdin.stderr
    no_prompt = _add(cli, repo, "the title is the prompt")
    assert _prompt_of(env, by_option) == text
    assert _prompt_of(env, by_file) == text
    assert _prompt_of(env, int(by_stdin.stdout)) == text
    assert _prompt_of(env, no_prompt) == "the title is the prompt"


def test_prompt_usage_errors(cli: Cli, repo: Path, env: Env) -> None:
    both = cli("add", "x", "--prompt", "p", "--prompt-file", "-", cwd=repo, input="q")
    assert both.code == 2 and "not both" in both.stderr
    missing = cli("add", "x", "--prompt-file", str(env.root / "missing.md"), cwd=repo)
    assert missing.code == 2 and "missing.md" in missing.stderr
    empty = cli("add", "x", "--prompt", "  ", cwd=repo)
    assert empty.code == 2 and "empty" in empty.stderr
    no_title = cli("add", "", cwd=repo)
    assert no_title.code == 2
    assert cli("list", "--json").json() == []


# -- list ----------------------------------------------------------------------------------


def test_list_orders_by_priority_then_age(cli: Cli, repo: Path) -> None:
    _add(cli, repo, "low", "--priority", "-1")
    _add(cli, repo, "normal")
    _add(cli, repo, "urgent", "--priority", "10")
    _add(cli, repo, "normal too")
    _add(cli, repo, "high", "--priority", "5")
    titles = [t["title"] for t in cli("list", "--json").json()]
    assert titles == ["urgent", "high", "normal", "normal too", "low"]


def test_list_filters_by_status_and_hides_closed_tasks(cli: Cli, repo: Path) -> None:
    for title in ("a", "b", "c", "d"):
        _add(cli, repo, title)
    assert cli("cancel", "2").code == 0
    assert cli("cancel", "3").code == 0
    closed = cli("close", "4")
    assert closed.code == 0, closed.stderr  # a ready task closes: no agent to stop

    def ids(*args: str) -> list[int]:
        done = cli("list", "--json", *args)
        assert done.code == 0, done.stderr
        return [t["id"] for t in done.json()]

    assert ids() == [1, 2, 3]
    assert ids("--all") == [1, 2, 3, 4]
    assert ids("--status", "cancelled") == [2, 3]
    assert ids("--status", "ready") == [1]
    assert ids("--status", "ready", "--all") == [1, 4]
    assert ids("--status", "ready", "--status", "cancelled") == [1, 2, 3]
    assert ids("--status", "done") == []
    listed = {t["id"]: t["closed"] for t in cli("list", "--all", "--json").json()}
    assert listed == {1: False, 2: False, 3: False, 4: True}


def test_list_refuses_an_unknown_status(cli: Cli, repo: Path) -> None:
    done = cli("list", "--status", "running")
    assert done.code == 2
    assert "unknown status 'running'" in done.stderr and "in-progress" in done.stderr


def test_list_table_for_people(cli: Cli, repo: Path) -> None:
    _add(cli, repo, "write the docs", "--priority", "2", "--agent", "codex")
    _add(cli, repo, "archived")
    cli("close", "2")
    table = cli("list")
    assert table.code == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "PRI", "AGENT", "HOST", "TITLE", "LAST", "ERROR"]
    assert rows[0].split() == ["1", "ready", "2", "codex", "-", "write", "the", "docs"]
    assert len(rows) == 1
    everything = cli("list", "--all").stdout
    assert "ready (closed)" in everything and "archived" in everything
    assert "\x1b[" not in table.stdout  # piped: no escape sequences at all


def test_an_empty_list_says_so_on_stderr(cli: Cli) -> None:
    done = cli("list")
    assert (done.code, done.stdout) == (0, "")
    assert "no tasks" in done.stderr
    assert cli("list", "--json").stdout == "[]\n"


def _in_a_terminal(args: list[str], cwd: Path, **extra: str) -> bytes:
    """Run dispatch with stdout and stderr on a pseudo-terminal; all it printed."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")
    }
    environ.update(TERM="xterm-256color", **extra)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch", *args],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=cwd, env=environ,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, output
    return output


def test_a_long_title_is_cut_to_the_terminal_and_whole_in_a_pipe(cli: Cli, repo: Path) -> None:
    """One long title must not push every row of the table past the terminal's edge."""
    long_title = "long " * 1000
    wide_title = "日本語 " + "長い" * 100
    for title in (long_title, wide_title, "short"):
        assert cli("add", title, cwd=repo).code == 0
    shown = _in_a_terminal(["list"], cwd=repo, COLUMNS="100").decode()
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in shown.splitlines()]
    assert len(rows) == 4, rows
    for row in rows:
        assert sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in row) <= 100, row
    assert rows[1].endswith("…") and rows[2].endswith("…") and rows[3].endswith("short")
    assert " long long " in rows[1] and "長い" in rows[2]
    titles = [row.split(None, 5)[5] for row in cli("list").stdout.splitlines()[1:]]
    assert titles == [long_title.strip(), wide_title, "short"]  # a pipe gets them whole


COLOUR = (b"\x1b[31m", b"\x1b[32m", b"\x1b[33m", b"\x1b[35m", b"\x1b[36m", b"\x1b[38;")


def test_statuses_are_coloured_in_a_terminal_unless_no_color(
    cli: Cli, repo: Path, env: Env
) -> None:
    _add(cli, repo, "colourful")
    coloured = _in_a_terminal(["list"], env.root)
    assert b"colourful" in coloured
    assert any(code in coloured for code in COLOUR), coloured
    plain = _in_a_terminal(["list"], env.root, NO_COLOR="1")
    assert b"colourful" in plain and b"ready" in plain
    assert not any(code in plain for code in COLOUR), plain


# -- show and events -----------------------------------------------------------------------


def _attempt(make_app: Callable[..., App], task_id: int) -> int:
    """An ended attempt and its event, written as the dispatch code would."""
    return ended_attempt(make_app().db, task_id)


def test_show_json_has_the_task_its_attempts_and_its_events(
    cli: Cli, repo: Path, make_app: Callable[..., App]
) -> None:
    _add(cli, repo, "shown")
    attempt_id = _attempt(make_app, 1)
    done = cli("show", "1", "--json")
    assert done.code == 0, done.stderr
    data = done.json()
    assert set(data) == TASK_KEYS | {"attempts", "events"}
    [attempt] = data["attempts"]
    assert set(attempt) == ATTEMPT_KEYS
    assert attempt["id"] == attempt_id
    assert (attempt["task_id"], attempt["number"], attempt["state"]) == (1, 1, "ended")
    assert (attempt["outcome"], attempt["exit_code"], attempt["error"]) == ("failed", 3, "exit 3")
    assert attempt["redispatch_of"] is None
    _iso_utc(attempt["started_at"])
    assert [e["kind"] for e in data["events"]] == ["created", "finished"]
    for event in data["events"]:
        assert set(event) == EVENT_KEYS
        _iso_utc(event["at"])
    assert data["events"][0]["to_status"] == "ready"
    assert data["events"][1]["detail"] == {"exit_code": 3}


def test_show_for_people(cli: Cli, repo: Path, make_app: Callable[..., App]) -> None:
    _add(cli, repo, "shown [bold]literally[/]", "--agent", "shell")
    _attempt(make_app, 1)
    done = cli("show", "1")
    assert done.code == 0, done.stderr
    assert "task 1: shown [bold]literally[/]" in done.stdout
    assert "status     ready" in done.stdout
    assert f"repo       {repo.resolve()}" in done.stdout
    assert "dispatch:@7" in done.stdout and "exit 3" in done.stdout
    assert "created" in done.stdout and "finished" in done.stdout


def test_events_json_and_filters(cli: Cli, repo: Path) -> None:
    _add(cli, repo, "one")
    _add(cli, repo, "two")
    assert cli("cancel", "2").code == 0
    assert cli("reset", "2").code == 0
    events = cli("events", "--json").json()
    assert [(e["task_id"], e["kind"]) for e in events] == [
        (1, "created"),
        (2, "created"),
        (2, "cancelled"),
        (2, "reset"),
    ]
    assert all(set(e) == EVENT_KEYS for e in events)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    only_two = cli("events", "--task", "2", "--json").json()
    assert [(e["kind"], e["from_status"], e["to_status"]) for e in only_two] == [
        ("created", None, "ready"),
        ("cancelled", "ready", "cancelled"),
        ("reset", "cancelled", "ready"),
    ]
    newest = cli("events", "--limit", "2", "--json").json()
    assert [e["kind"] for e in newest] == ["cancelled", "reset"]
    table = cli("events", "--task", "2")
    assert table.code == 0 and "cancelled" in table.stdout


def test_events_of_an_unknown_task(cli: Cli, repo: Path) -> None:
    _add(cli, repo, "one")
    done = cli("events", "--task", "9")
    assert done.code == 4 and "no task 9" in done.stderr


# -- reset, close, reopen -------------------------------------------------------------------


def test_reset_close_and_reopen(cli: Cli, repo: Path) -> None:
    _add(cli, repo, "task")
    ready = cli("reset", "1")
    assert ready.code == 3
    assert "task 1 is ready" in ready.stderr
    assert cli("cancel", "1").code == 0
    reset = cli("reset", "1", "--json")
    assert reset.code == 0, reset.stderr
    assert reset.json()["status"] == "ready"

    close = cli("close", "1", "--json")
    assert close.code == 0, close.stderr
    assert close.json()["closed"] is True and close.json()["status"] == "ready"
    again = cli("close", "1")
    assert again.code == 0 and "already closed" in again.stderr
    assert cli("cancel", "1").code == 0  # stopping a closed task is allowed
    gone = cli("reset", "1")
    assert gone.code == 5
    assert "closed" in gone.stderr and "dispatch reopen 1" in gone.stderr
    assert cli("show", "1", "--json").json()["status"] == "cancelled"

    reopened = cli("reopen", "1", "--json")
    assert reopened.code == 0 and reopened.json()["closed"] is False
    assert cli("reset", "1").code == 0
    kinds = [e["kind"] for e in cli("events", "--task", "1", "--json").json()]
    assert kinds == ["created", "cancelled", "reset", "closed", "cancelled", "reopened", "reset"]


# -- hostile input -------------------------------------------------------------------------

HOSTILE = [
    "$(touch pwned)",
    "`touch pwned-backtick`",
    "it's \"quoted\" 'twice'; touch pwned-semicolon",
    "../../../etc/passwd",
    "line one\nline two",
    "ünïcødé ✓ 🚀 日本語",
    "[bold]x[/]",
    "[red]alert[/red] [link=file:///etc]y[/link]",
    "%s %d {task_id} {prompt} \\n \\x00",
    "| tee pwned-pipe && echo > pwned-redirect",
    ":rocket: :+1: :warning:",
]


def test_hostile_titles_and_prompts_are_stored_and_shown_verbatim(
    cli: Cli, repo: Path, env: Env
) -> None:
    for text in HOSTILE:
        done = cli("add", text, "--prompt", text, cwd=repo)
        assert done.code == 0, (text, done.stderr)
    listed = cli("list", "--json").json()
    assert [t["title"] for t in listed] == HOSTILE
    for task in listed:
        assert _prompt_of(env, task["id"]) == task["title"]
        assert cli("show", str(task["id"]), "--json").json()["title"] == task["title"]

    table = cli("list")
    assert table.code == 0, table.stderr
    for text in HOSTILE:
        # One row per task: a newline in a title is shown as a space.
        assert text.replace("\n", " ") in table.stdout
    shown = cli("show", "7")
    assert "task 7: [bold]x[/]" in shown.stdout
    assert not list(env.root.rglob("pwned*"))
