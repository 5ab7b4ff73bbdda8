"""Settings: the TOML file, the environment, global options, durations, agent profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.config import BUILTIN_AGENTS, AgentProfile, load_settings, parse_duration
from dispatch.errors import EnvironmentProblem
from dispatch.lifecycle import Completion
from tests.conftest import Env


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
        (" 10M ", 600.0),
        ("36500d", 36_500 * 86_400.0),  # a century: the longest taken
    ],
)
def test_durations(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        *("", "10x", "m10", "10 minutes", "1h30", "-5m", "abc", True, -1),
        # Longer than a century, which no date arithmetic of a command could take.
        *("36501d", "1000000d", "99999999999d", 36_501 * 86_400, float("inf"), float("nan")),
    ],
)
def test_bad_durations_are_refused(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def _env(env: Env, **extra: str) -> dict[str, str]:
    base = {"DISPATCH_HOME": str(env.home), "DISPATCH_CONFIG": str(env.config)}
    base.update(extra)
    return base


def test_defaults_without_a_config_file(env: Env, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    settings = load_settings(env={"DISPATCH_HOME": str(env.home), "XDG_CONFIG_HOME": str(xdg)})
    assert settings.config_path is None
    assert settings.database == f"sqlite:///{env.home / 'dispatch.db'}"
    assert settings.worktree_root == env.home / "worktrees"
    assert settings.default_agent == "claude"
    assert settings.max_running == 0
    assert settings.max_dispatch_failures == 3
    assert settings.lease_seconds == 120
    assert settings.spawn_timeout == 10
    assert settings.heartbeat_interval == 15
    assert settings.stale_after == 600
    assert settings.gc_after == 7 * 86400
    assert settings.tmux_socket == ""
    assert settings.tmux_session == "dispatch"


def test_the_config_is_found_under_xdg_config_home(env: Env, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "dispatch").mkdir(parents=True)
    (xdg / "dispatch" / "config.toml").write_text("max_running = 4\n")
    settings = load_settings(env={"DISPATCH_HOME": str(env.home), "XDG_CONFIG_HOME": str(xdg)})
    assert settings.max_running == 4
    assert settings.config_path == xdg / "dispatch" / "config.toml"


def test_dispatch_config_wins_over_xdg(env: Env, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "dispatch").mkdir(parents=True)
    (xdg / "dispatch" / "config.toml").write_text("max_running = 4\n")
    env.write_config("max_running = 7\n")
    settings = load_settings(env=_env(env, XDG_CONFIG_HOME=str(xdg)))
    assert settings.max_running == 7
    # and the --config option wins over both
    other = tmp_path / "other.toml"
    other.write_text("max_running = 9\n")
    assert load_settings(config=str(other), env=_env(env)).max_running == 9


def test_a_named_config_file_that_is_missing_is_an_error(env: Env, tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="no such file"):
        load_settings(env=_env(env, DISPATCH_CONFIG=str(tmp_path / "nope.toml")))
    with pytest.raises(EnvironmentProblem, match="no such file"):
        load_settings(config=str(tmp_path / "nope.toml"), env=_env(env))


def test_every_key_is_read(env: Env, tmp_path: Path) -> None:
    env.write_config(
        f"""
database = "{tmp_path / "custom.db"}"
worktree_root = "{tmp_path / "trees"}"
default_agent = "shell"
max_running = 2
max_dispatch_failures = 5
lease_seconds = 30
spawn_timeout = 2.5
heartbeat_interval = 1
stale_after = "1h30m"
gc_after = "2d"

[tmux]
socket = "sock"
session = "work"
"""
    )
    settings = load_settings(env=_env(env))
    assert settings.database == f"sqlite:///{tmp_path / 'custom.db'}"
    assert settings.worktree_root == tmp_path / "trees"
    assert settings.default_agent == "shell"
    assert settings.max_running == 2
    assert settings.max_dispatch_failures == 5
    assert settings.lease_seconds == 30
    assert settings.spawn_timeout == 2.5
    assert settings.heartbeat_interval == 1
    assert settings.stale_after == 5400
    assert settings.gc_after == 2 * 86400
    assert settings.tmux_socket == "sock"
    assert settings.tmux_session == "work"


def test_environment_overrides_the_file_and_options_override_the_environment(
    env: Env, tmp_path: Path
) -> None:
    env.write_config(f'database = "{tmp_path / "file.db"}"\n[tmux]\nsocket = "from-file"\n')
    from_file = load_settings(env=_env(env))
    assert from_file.database.endswith("/file.db")
    assert from_file.tmux_socket == "from-file"

    overridden = load_settings(
        env=_env(
            env,
            DISPATCH_DB=str(tmp_path / "env.db"),
            DISPATCH_TMUX_SOCKET="from-env",
            DISPATCH_HOST="builder-7",
        )
    )
    assert overridden.database == f"sqlite:///{tmp_path / 'env.db'}"
    assert overridden.tmux_socket == "from-env"
    assert overridden.host == "builder-7"

    option = load_settings(db=str(tmp_path / "opt.db"), env=_env(env, DISPATCH_DB="x.db"))
    assert option.database == f"sqlite:///{tmp_path / 'opt.db'}"
    url = "postgresql+psycopg://u@db.example/dispatch"
    assert load_settings(db=url, env=_env(env)).database == url


def test_an_empty_socket_variable_means_the_default_server(env: Env) -> None:
    env.write_config('[tmux]\nsocket = "from-file"\n')
    assert load_settings(env=_env(env, DISPATCH_TMUX_SOCKET="")).tmux_socket == ""


def test_relative_paths_are_made_absolute(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wrapper runs in a worktree with these paths in its environment.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel.toml").write_text("max_running = 1\n")
    settings = load_settings(config="rel.toml", db="rel.db", env={"DISPATCH_HOME": "relhome"})
    assert settings.home == tmp_path / "relhome"
    assert settings.config_path == tmp_path / "rel.toml"
    assert settings.database == f"sqlite:///{tmp_path / 'rel.db'}"


def test_the_host_defaults_to_the_hostname(env: Env) -> None:
    import socket

    assert load_settings(env=_env(env)).host == socket.gethostname()


def test_builtin_profiles() -> None:
    assert set(BUILTIN_AGENTS) == {"claude", "claude-headless", "codex", "aider", "shell"}
    claude = BUILTIN_AGENTS["claude"]
    assert claude.command == ("claude", "{prompt}")
    assert claude.resume == ("claude", "--continue")
    headless = BUILTIN_AGENTS["claude-headless"]
    assert headless.command == ("claude", "-p", "--session-id", "{session_id}", "{prompt}")
    assert headless.resume == ("claude", "-p", "--resume", "{session_id}", "Continue the task.")
    assert BUILTIN_AGENTS["codex"].command == ("codex", "{prompt}")
    assert BUILTIN_AGENTS["codex"].resume == ("codex", "resume", "--last")
    assert BUILTIN_AGENTS["aider"].command == ("aider", "--message-file", "{prompt_file}")
    assert BUILTIN_AGENTS["aider"].resume is not None
    assert "--restore-chat-history" in BUILTIN_AGENTS["aider"].resume
    assert BUILTIN_AGENTS["shell"].command == ("sh", "-c", "{prompt}")
    assert all(p.completion is Completion.EXIT for p in BUILTIN_AGENTS.values())


def test_a_user_profile_overrides_a_builtin_and_adds_new_ones(env: Env) -> None:
    env.write_config(
        """
[agents.claude]
command = ["my-claude", "--fast", "{prompt_file}"]
completion = "signal"

[agents.codex]
completion = "commits"

[agents.mine]
command = ["run-agent", "{task_id}"]
"""
    )
    agents = load_settings(env=_env(env)).agents
    assert agents["claude"].command == ("my-claude", "--fast", "{prompt_file}")
    assert agents["claude"].completion is Completion.SIGNAL
    # A partial override keeps the builtin's commands.
    assert agents["codex"].command == BUILTIN_AGENTS["codex"].command
    assert agents["codex"].resume == BUILTIN_AGENTS["codex"].resume
    assert agents["codex"].completion is Completion.COMMITS
    assert agents["mine"].command == ("run-agent", "{task_id}")
    assert agents["mine"].resume is None
    assert agents["shell"] == BUILTIN_AGENTS["shell"]


def test_placeholders_are_substituted_once_inside_single_elements() -> None:
    profile = AgentProfile("p", ("agent", "--task={task_id}", "{prompt}", "{worktree}/x", "{nope}"))
    hostile = "fix {task_id} and {prompt_file}; $(rm -rf ~) `id` 'quoted' \"dq\"\nnext line"
    argv = profile.argv(
        {"task_id": "12", "prompt": hostile, "worktree": "/w t", "prompt_file": "/p.md"}
    )
    # The prompt stays one element, byte for byte: its own braces are not expanded again.
    assert argv == ["agent", "--task=12", hostile, "/w t/x", "{nope}"]


def test_resume_argv_is_used_only_when_the_profile_has_one() -> None:
    profile = BUILTIN_AGENTS["claude-headless"]
    values = {"session_id": "abc", "prompt": "p"}
    assert profile.argv(values, resume=True) == [
        "claude",
        "-p",
        "--resume",
        "abc",
        "Continue the task.",
    ]
    shell = BUILTIN_AGENTS["shell"]
    assert shell.argv({"prompt": "echo hi"}, resume=True) == ["sh", "-c", "echo hi"]


BAD_CONFIGS = [
    # text, the key named, the line named, a fragment of the reason
    ("max_running = 3\nfoo = 1\n", "foo", 2, "unknown key"),
    ('max_running = "x"\n', "max_running", 1, "expected a whole number"),
    ("max_running = -1\n", "max_running", 1, "expected a whole number"),
    ("max_running = 1.5\n", "max_running", 1, "expected a whole number"),
    ("max_dispatch_failures = true\n", "max_dispatch_failures", 1, "got True"),
    ("lease_seconds = 0\n", "lease_seconds", 1, "> 0"),
    ('\nstale_after = "10x"\n', "stale_after", 2, "not a duration"),
    ('gc_after = "7x"\n', "gc_after", 1, "not a duration"),
    ("gc_after = -1\n", "gc_after", 1, "a duration such as 7d"),
    ("gc_after = 1e9\n", "gc_after", 1, "at most"),
    ('gc_after = "9999d"\n', "gc_after", 1, "at most"),
    ("database = 5\n", "database", 1, "expected a database URL"),
    ("# tmux\n[tmux]\nsocket = 3\n", "tmux.socket", 3, "expected a name"),
    ('[tmux]\nsession = "a:b"\n', "tmux.session", 2, "expected a name"),
    ("[tmux]\nbogus = 3\n", "tmux.bogus", 2, "unknown key"),
    ("tmux = 3\n", "tmux", 1, "expected a [tmux] table"),
    ("agents = 3\n", "agents", 1, "expected [agents.NAME] tables"),
    ('[agents.my]\ncommand = ["a"]\nbogus = 1\n', "agents.my.bogus", 3, "unknown key"),
    ('[agents.my]\ncommand = "a b"\n', "agents.my.command", 2, "non-empty list of strings"),
    ("[agents.my]\ncommand = []\n", "agents.my.command", 2, "non-empty list of strings"),
    ('# mine\n[agents.my]\ncompletion = "exit"\n', "agents.my.command", 2, "missing"),
    ('[agents.my]\ncommand = ["x", "{bogus}"]\n', "agents.my.command", 2, "{bogus}"),
    (
        '[agents.my]\ncommand = ["x"]\ncompletion = "never"\n',
        "agents.my.completion",
        3,
        "expected exit, signal or commits",
    ),
    ("[agents]\nmy = 3\n", "agents.my", 2, "expected a table"),
    ("agents.my.command = 3\n", "agents.my.command", 1, "non-empty list of strings"),
    ('default_agent = "nope"\n', "default_agent", 1, "no agent profile named 'nope'"),
    # numbers no clock or wait can use: every run would fail, or wait for ever
    ("lease_seconds = 1e308\n", "lease_seconds", 1, "at most 3.16224e+07"),
    ("\nspawn_timeout = nan\n", "spawn_timeout", 2, "got nan"),
    ("spawn_timeout = inf\n", "spawn_timeout", 1, "got inf"),
    ("heartbeat_interval = -inf\n", "heartbeat_interval", 1, "got -inf"),
    ("stale_after = inf\n", "stale_after", 1, "got inf"),
    ('stale_after = "9999d"\n', "stale_after", 1, "at most"),
    ("max_running = 99999999999\n", "max_running", 1, "at most"),
]


@pytest.mark.parametrize("text,key,line,why", BAD_CONFIGS)
def test_invalid_settings_name_the_file_the_line_and_the_key(
    env: Env, text: str, key: str, line: int, why: str
) -> None:
    env.write_config(text)
    with pytest.raises(EnvironmentProblem) as refused:
        load_settings(env=_env(env))
    assert refused.value.exit_code == 7
    assert refused.value.message.startswith(f"config {env.config}:{line}: {key}: ")
    assert why in refused.value.message


@pytest.mark.parametrize(
    "text,line",
    [
        ("x = [\n", 1),
        ("a = 1\nb = 2\na = 3\n", 3),
        ("a = 1\n[t]\n[t]\n", 3),
        ('ok = 1\nbad = "\\q"\n', 2),
    ],
)
def test_invalid_toml_names_the_line(env: Env, text: str, line: int) -> None:
    env.write_config(text)
    with pytest.raises(EnvironmentProblem) as refused:
        load_settings(env=_env(env))
    assert refused.value.message.startswith(f"config {env.config}:{line}: invalid TOML: ")
    assert "(at " not in refused.value.message


def test_a_config_that_is_not_utf8_names_the_line(env: Env) -> None:
    env.config.write_bytes(b"max_running = 1\n# caf\xe9\n")
    with pytest.raises(EnvironmentProblem) as refused:
        load_settings(env=_env(env))
    assert refused.value.message.startswith(f"config {env.config}:2: invalid TOML: not UTF-8")


def test_a_config_path_that_is_a_directory(env: Env, tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="is a directory"):
        load_settings(env=_env(env, DISPATCH_CONFIG=str(tmp_path)))


def test_an_unknown_agent_name_is_refused_with_the_known_ones(env: Env) -> None:
    settings = load_settings(env=_env(env))
    with pytest.raises(EnvironmentProblem, match=r"unknown agent profile 'gpt'.*claude"):
        settings.agent("gpt")
