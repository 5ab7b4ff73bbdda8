"""GitWorktrees against the real git: worktrees, branches, failures half way, locks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.adapters import git as git_adapter
from dispatch.adapters.git import GitWorktrees
from dispatch.errors import EnvironmentProblem, ToolFailed

# git alone: no database to run twice.
pytestmark = pytest.mark.no_database

GitRunner = Callable[..., str]


@pytest.fixture
def worktrees(tmp_path: Path) -> GitWorktrees:
    return GitWorktrees(tmp_path / "locks")


def _registered(git: GitRunner, repo: Path) -> list[str]:
    """Worktree paths as git itself lists them."""
    out = git(repo, "worktree", "list", "--porcelain", "-z")
    return [field[len("worktree ") :] for field in out.split("\0") if field.startswith("worktree ")]


def _branches(git: GitRunner, repo: Path) -> list[str]:
    return git(repo, "branch", "--format=%(refname:short)").split()


def _write_hook(repo: Path, name: str, body: str) -> None:
    hook = repo / ".git" / "hooks" / name
    hook.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    hook.chmod(0o755)


def test_add_new_branch_creates_worktree_from_base(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "repo" / "task-1"

    assert worktrees.add(repo, path, "dispatch/1-fix", "main", new_branch=True) is True

    assert (path / "README.md").read_text() == "hello\n"
    assert str(path) in _registered(git, repo)
    assert "dispatch/1-fix" in _branches(git, repo)
    assert worktrees.head_ref(path) == "dispatch/1-fix"
    assert worktrees.is_worktree(repo, path)
    assert worktrees.branch_exists(repo, "dispatch/1-fix")
    # --no-track: no upstream configured for the new branch.
    assert "branch.dispatch/1-fix" not in git(repo, "config", "--list")
    assert list((tmp_path / "locks").glob("git-worktree-*.lock"))


def test_add_checks_out_an_existing_branch(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "feature.txt").write_text("feature work\n")
    git(repo, "add", "feature.txt")
    git(repo, "commit", "-q", "-m", "feature")
    git(repo, "checkout", "-q", "main")
    path = tmp_path / "trees" / "feature"

    assert worktrees.add(repo, path, "feature", "main", new_branch=False) is True

    assert worktrees.head_ref(path) == "feature"
    assert (path / "feature.txt").read_text() == "feature work\n"
    assert _branches(git, repo) == ["feature", "main"]


def test_add_relative_path_is_relative_to_the_callers_cwd(
    worktrees: GitWorktrees,
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert worktrees.add(repo, Path("rel/task-2"), "b2", "main", new_branch=True)

    assert (elsewhere / "rel" / "task-2" / "README.md").exists()
    assert not (repo / "rel").exists()


def test_add_of_an_existing_branch_as_new_fails_and_creates_nothing(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "dup"

    with pytest.raises(ToolFailed) as failure:
        worktrees.add(repo, path, "main", "main", new_branch=True)

    assert failure.value.returncode != 0
    assert failure.value.argv[0].endswith("git")
    assert "already exists" in failure.value.stderr
    assert not path.exists()
    assert _registered(git, repo) == [str(repo)]


def test_failing_post_checkout_hook_raises_after_creating_both_and_undo_cleans_up(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    _write_hook(repo, "post-checkout", "echo hook refuses >&2\nexit 1\n")
    path = tmp_path / "trees" / "task-3"

    with pytest.raises(ToolFailed) as failure:
        worktrees.add(repo, path, "dispatch/3-hook", "main", new_branch=True)

    assert failure.value.returncode == 1
    # git exited non-zero after doing the work: both exist, which the undo must handle.
    assert worktrees.branch_exists(repo, "dispatch/3-hook")
    assert worktrees.is_worktree(repo, path)

    worktrees.remove(repo, path)
    worktrees.delete_branch(repo, "dispatch/3-hook")

    assert not path.exists()
    assert _registered(git, repo) == [str(repo)]
    assert _branches(git, repo) == ["main"]


def test_add_reports_false_when_git_succeeds_without_checking_out_the_branch(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path
) -> None:
    # A hook that detaches HEAD and exits 0: git reports success, the work is not done.
    _write_hook(repo, "post-checkout", "git -c core.hooksPath=/dev/null checkout -q --detach\n")
    path = tmp_path / "trees" / "task-4"

    assert worktrees.add(repo, path, "dispatch/4-fake", "main", new_branch=True) is False
    assert worktrees.is_worktree(repo, path)


def test_remove_locked_worktree_with_changes(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "locked"
    assert worktrees.add(repo, path, "locked-branch", "main", new_branch=True)
    (path / "scratch.txt").write_text("uncommitted\n")
    git(repo, "worktree", "lock", "--reason", "busy", str(path))

    worktrees.remove(repo, path)

    assert not path.exists()
    assert _registered(git, repo) == [str(repo)]
    assert not (repo / ".git" / "worktrees" / "locked").exists()
    # The branch is separate from the worktree and survives its removal.
    assert "locked-branch" in _branches(git, repo)


def test_remove_half_made_worktree_falls_back_to_deleting_it(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "half"
    assert worktrees.add(repo, path, "half-branch", "main", new_branch=True)
    # What a `git worktree add` killed while initialising leaves: locked, no usable .git file.
    (repo / ".git" / "worktrees" / "half" / "locked").write_text("initializing")
    (path / ".git").unlink()

    worktrees.remove(repo, path)

    assert not path.exists()
    assert _registered(git, repo) == [str(repo)]


def test_remove_when_directory_already_deleted(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "vanished"
    assert worktrees.add(repo, path, "vanished-branch", "main", new_branch=True)
    subprocess.run(["rm", "-rf", str(path)], check=True)

    worktrees.remove(repo, path)

    assert _registered(git, repo) == [str(repo)]


def test_remove_is_idempotent_and_leaves_unregistered_directories_alone(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "twice"
    assert worktrees.add(repo, path, "twice-branch", "main", new_branch=True)
    stranger = tmp_path / "trees" / "not-a-worktree"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("user data\n")

    worktrees.remove(repo, path)
    worktrees.remove(repo, path)
    worktrees.remove(repo, tmp_path / "never-existed")
    worktrees.remove(repo, stranger)

    assert not path.exists()
    assert (stranger / "keep.txt").read_text() == "user data\n"
    assert _registered(git, repo) == [str(repo)]


def test_remove_refuses_the_main_worktree(worktrees: GitWorktrees, repo: Path) -> None:
    with pytest.raises(ValueError, match="main worktree"):
        worktrees.remove(repo, repo)

    assert (repo / "README.md").exists()


def test_delete_branch_is_idempotent_and_refuses_a_checked_out_branch(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "busy"
    assert worktrees.add(repo, path, "busy", "main", new_branch=True)
    git(repo, "branch", "spare")

    worktrees.delete_branch(repo, "spare")
    worktrees.delete_branch(repo, "spare")
    with pytest.raises(ToolFailed):
        worktrees.delete_branch(repo, "busy")

    assert _branches(git, repo) == ["busy", "main"]


def test_parallel_adds_from_separate_processes_all_succeed(
    repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from dispatch.adapters.git import GitWorktrees
        repo, lock_dir, path, branch = sys.argv[1:]
        ok = GitWorktrees(Path(lock_dir)).add(
            Path(repo), Path(path), branch, "main", new_branch=True
        )
        sys.exit(0 if ok else 3)
        """
    )
    count = 8
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(repo),
                str(tmp_path / "locks"),
                str(tmp_path / "trees" / f"p{i}"),
                f"parallel-{i}",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    results = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]

    assert results == [(0, "")] * count
    registered = _registered(git, repo)
    assert sorted(registered[1:]) == sorted(str(tmp_path / "trees" / f"p{i}") for i in range(count))
    assert len(_branches(git, repo)) == count + 1


def test_parallel_adds_from_threads_all_succeed(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def add(i: int) -> bool:
        return worktrees.add(repo, tmp_path / "t" / f"w{i}", f"thr-{i}", "main", new_branch=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(add, range(8)))

    assert outcomes == [True] * 8
    assert len(_registered(git, repo)) == 9


def test_not_a_repository_is_an_environment_problem(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    missing = tmp_path / "missing"

    with pytest.raises(EnvironmentProblem, match="is not a git repository") as problem:
        worktrees.toplevel(plain)
    assert str(plain) in problem.value.message
    assert problem.value.exit_code == 7
    assert "\n" not in problem.value.message
    with pytest.raises(EnvironmentProblem, match=str(missing)):
        worktrees.toplevel(missing)
    with pytest.raises(EnvironmentProblem, match=str(plain)):
        worktrees.add(plain, tmp_path / "trees" / "x", "x", "main", new_branch=True)
    with pytest.raises(EnvironmentProblem, match=str(plain)):
        worktrees.branch_exists(plain, "main")
    with pytest.raises(EnvironmentProblem, match=str(plain)):
        worktrees.has_changes(plain)
    assert not (tmp_path / "trees").exists()


def test_toplevel_from_a_subdirectory(worktrees: GitWorktrees, repo: Path) -> None:
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)

    assert worktrees.toplevel(sub) == repo


def test_missing_git_binary_is_an_environment_problem(
    worktrees: GitWorktrees, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()

    # A context, so that PATH is back before any fixture's teardown needs a program.
    with monkeypatch.context() as patch, pytest.raises(EnvironmentProblem, match="git"):
        patch.setenv("PATH", str(empty))
        worktrees.version()


def test_version(worktrees: GitWorktrees) -> None:
    version = worktrees.version()

    assert version.split(".")[0].isdigit()
    assert version.count(".") >= 1


def test_has_changes_and_commits_ahead(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner
) -> None:
    path = tmp_path / "trees" / "work"
    assert worktrees.add(repo, path, "work", "main", new_branch=True)
    assert worktrees.has_changes(path) is False
    assert worktrees.commits_ahead(repo, "main", "work") == 0

    (path / "new.txt").write_text("untracked\n")
    assert worktrees.has_changes(path) is True
    git(path, "add", "new.txt")
    git(path, "commit", "-q", "-m", "one")
    assert worktrees.has_changes(path) is False
    (path / "README.md").write_text("changed\n")
    assert worktrees.has_changes(path) is True
    git(path, "commit", "-q", "-am", "two")

    assert worktrees.commits_ahead(repo, "main", "work") == 2
    assert worktrees.commits_ahead(repo, "work", "main") == 0
    with pytest.raises(ToolFailed):
        worktrees.commits_ahead(repo, "main", "no-such-branch")


def test_head_ref_refs_and_branches(worktrees: GitWorktrees, repo: Path, git: GitRunner) -> None:
    assert worktrees.head_ref(repo) == "main"
    sha = git(repo, "rev-parse", "HEAD").strip()
    assert worktrees.ref_exists(repo, "main")
    assert worktrees.ref_exists(repo, sha)
    assert worktrees.ref_exists(repo, "HEAD~0")
    assert not worktrees.ref_exists(repo, "no-such-ref")
    assert not worktrees.ref_exists(repo, "--all")
    assert worktrees.branch_exists(repo, "main")
    assert not worktrees.branch_exists(repo, sha)

    git(repo, "checkout", "-q", "--detach")
    assert worktrees.head_ref(repo) == sha


def test_list_worktrees_main_first(worktrees: GitWorktrees, repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "trees" / "listed"
    assert worktrees.add(repo, path, "listed", "main", new_branch=True)

    assert worktrees.list_worktrees(repo) == [repo, path]
    assert worktrees.list_worktrees(path) == [repo, path]


@pytest.mark.parametrize(
    "name",
    [
        "with space",
        'quote\'s "double"',
        "$(touch pwned)",
        "`touch pwned`; touch pwned",
        "-leading-dash",
        "new\nline",
        "#{hash}*?[x]",
    ],
)
def test_hostile_worktree_paths_are_plain_data(
    worktrees: GitWorktrees, repo: Path, tmp_path: Path, git: GitRunner, name: str
) -> None:
    path = tmp_path / "trees" / name / "task"

    assert worktrees.add(repo, path, "hostile", "main", new_branch=True)
    assert (path / "README.md").exists()
    assert worktrees.list_worktrees(repo) == [repo, path]
    assert worktrees.has_changes(path) is False

    worktrees.remove(repo, path)
    worktrees.delete_branch(repo, "hostile")

    assert not path.exists()
    assert _registered(git, repo) == [str(repo)]
    for where in (tmp_path, repo, Path.cwd()):
        assert not (where / "pwned").exists()
    assert not any(os.path.basename(p) == "pwned" for p in os.listdir(tmp_path / "trees"))


def test_importing_the_adapters_loads_neither_gitpython_nor_libtmux() -> None:
    code = (
        "import sys, dispatch.adapters.git, dispatch.adapters.tmux\n"
        "print(sorted(m for m in ('git', 'libtmux') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


def test_gitpython_is_loaded_quietly_and_the_environment_restored(tmp_path: Path) -> None:
    code = (
        "import os, sys\nfrom pathlib import Path\n"
        "from dispatch.adapters.git import GitWorktrees\n"
        "from dispatch.errors import EnvironmentProblem\n"
        "try:\n    GitWorktrees(Path(sys.argv[1])).version()\n"
        "except EnvironmentProblem as exc:\n    print('problem:', exc.message)\n"
        "print('refresh:', os.environ.get('GIT_PYTHON_REFRESH'))"
    )
    env = {**os.environ, "PATH": str(tmp_path)}
    env.pop("GIT_PYTHON_REFRESH", None)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env
    )

    # git is missing from PATH: our error, not GitPython's ImportError.
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "problem: git cannot be run: git was not found",
        "refresh: None",
    ]


def test_version_and_dirtiness_come_from_gitpython(
    worktrees: GitWorktrees, repo: Path, git: GitRunner
) -> None:
    assert worktrees.version() == git(repo, "version").split()[-1]
    assert not worktrees.has_changes(repo)
    (repo / ".gitignore").write_text("ignored.txt\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore")
    (repo / "ignored.txt").write_text("x")
    assert not worktrees.has_changes(repo)  # ignored files are no work
    (repo / "new.txt").write_text("x")
    assert worktrees.has_changes(repo)  # untracked
    (repo / "new.txt").unlink()
    (repo / "README.md").write_text("changed\n")
    assert worktrees.has_changes(repo)  # modified
    git(repo, "add", "README.md")
    (repo / "README.md").write_text("hello\n")
    assert worktrees.has_changes(repo)  # staged, then changed back in the tree


HALF_ADDED_SHIM = """#!/bin/sh
# Fails `worktree list` as git 2.39 does while another add is half done, N times.
case " $* " in
  *" worktree list "*)
    n=$(cat "{count}" 2>/dev/null || echo 0)
    echo $((n + 1)) > "{count}"
    if [ "$n" -lt {fails} ]; then
      echo "fatal: failed to read .git/worktrees/task-9/commondir: Success" >&2
      exit 128
    fi ;;
esac
exec "{real}" "$@"
"""


def test_a_listing_that_meets_a_half_made_worktree_is_tried_again(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else's `git worktree add` (not under our lock) is half way through."""
    real = shutil.which("git")
    assert real
    shim, count = tmp_path / "shim", tmp_path / "count"
    shim.mkdir()
    (shim / "git").write_text(HALF_ADDED_SHIM.format(count=count, fails=3, real=real))
    (shim / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(git_adapter, "_LIST_RETRY_SECONDS", 0.01)
    worktrees = GitWorktrees(tmp_path / "locks")

    assert worktrees.list_worktrees(repo) == [repo]
    assert count.read_text().strip() == "4"  # three failures, then the answer

    count.unlink()
    other = (shim / "git").read_text().replace("-lt 3", "-lt 999")
    (shim / "git").write_text(other)
    with pytest.raises(ToolFailed, match="failed to read"):
        worktrees.list_worktrees(repo)  # a listing that never recovers still fails
