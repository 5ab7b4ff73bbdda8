"""git through one chokepoint that runs the real git binary with argv lists (no shell).

Worktrees, branches and the checks on the dispatch's hot path run `git` itself:
GitPython has no worktree API, and importing it costs 50-200 ms and a `git version`
fork that `run`, the sweep and the wrapper should not pay. GitPython's `Repo` does the
reading where a few tens of milliseconds do not matter (whether a reused worktree is
dirty, doctor's look at git). Every command gets `-C <repo>`, and git runs with
LC_ALL=C, so the messages matched below are git's own wording.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatch.adapters.program import run_program
from dispatch.errors import EnvironmentProblem, ToolFailed
from dispatch.flock import FileLock

# A git command that takes longer than this is wedged (a hook that hangs, a lock an
# editor holds); failing beats hanging.
_TIMEOUT_SECONDS = 300.0

# git's own wording for a path that is no usable repository: reported as an
# environment problem, not a tool failure.
_UNUSABLE_REPO = {
    "fatal: not a git repository": "is not a git repository",
    "fatal: cannot change to": "does not exist, so it is not a git repository",
    "fatal: this operation must be run in a work tree": "is a git repository without a work tree",
    "fatal: detected dubious ownership": "is a git repository owned by another user",
}

# How often, and how far apart, a listing that met a half-made worktree is tried again.
_LIST_RETRIES = 50
_LIST_RETRY_SECONDS = 0.1


def _half_added(stderr: str) -> bool:
    return "fatal: failed to read" in stderr and "worktrees/" in stderr


def gitpython() -> Any:
    """The `git` (GitPython) module, imported such that a missing binary is our error
    (once: Python keeps the module, and with it GitPython's one `git version`)."""
    previous = os.environ.get("GIT_PYTHON_REFRESH")
    # GitPython probes the git binary at import time and, unless told to be quiet,
    # raises ImportError when it is missing; the callers report that plainly instead.
    os.environ["GIT_PYTHON_REFRESH"] = "quiet"
    try:
        import git
    except ImportError as exc:
        raise EnvironmentProblem(f"GitPython cannot be loaded: {exc}") from exc
    finally:
        if previous is None:
            os.environ.pop("GIT_PYTHON_REFRESH", None)
        else:
            os.environ["GIT_PYTHON_REFRESH"] = previous
    return git


def _absolute(path: Path) -> Path:
    """Absolute against our cwd: with `git -C repo` a relative path would be read from repo."""
    return Path(os.path.abspath(path))


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@dataclass(frozen=True)
class _Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class _Entry:
    """One worktree of `git worktree list --porcelain -z`."""

    path: str
    branch: str | None
    locked: bool
    bare: bool


class GitWorktrees:
    """The `Worktrees` adapter: real git, argv lists, a per-repository lock for `add`."""

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = lock_dir
        self.calls: list[list[str]] = []
        self._binary: str | None = None
        self._locks: dict[Path, FileLock] = {}
        self._lock_paths: dict[str, Path] = {}
        self._guard = threading.Lock()

    def require(self) -> None:
        self._git()

    def _git(self) -> str:
        if self._binary is None:
            found = shutil.which("git")
            if found is None:
                raise EnvironmentProblem(
                    "git cannot be run: git was not found", hint="install git or put it on PATH"
                )
            self._binary = found
        return self._binary

    def _run(self, repo: Path | None, *args: str, check: bool = True) -> _Result:
        """Run git (in repo when given); the one place that maps failures to domain errors."""
        argv = [self._git()]
        if repo is not None:
            argv += ["-C", str(_absolute(repo))]
        argv += args
        self.calls.append(argv)
        done = run_program(
            argv, timeout=_TIMEOUT_SECONDS, env={**os.environ, "LC_ALL": "C", "LANGUAGE": ""}
        )
        status, stdout, stderr = done.returncode, done.stdout, done.stderr.rstrip("\n")
        # 128 is git's own "fatal"; a failing hook exits with its status, whatever it printed.
        if status == 128 and repo is not None:
            for line in stderr.splitlines():
                for prefix, problem in _UNUSABLE_REPO.items():
                    if line.startswith(prefix):
                        raise EnvironmentProblem(f"{repo} {problem}")
        if check and status != 0:
            raise ToolFailed(argv, status, stderr)
        return _Result(argv, status, stdout, stderr)

    def version(self) -> str:
        """git's version as GitPython sees it, e.g. "2.39.5": doctor's proof that the
        library and the binary both work; EnvironmentProblem when git is missing."""
        self._git()  # a missing binary is said plainly, before GitPython guesses
        try:
            return ".".join(map(str, gitpython().Git().version_info))
        except EnvironmentProblem:
            raise
        except Exception as exc:  # GitPython's own errors differ from version to version
            raise EnvironmentProblem(f"git cannot be run: {exc}") from None

    def toplevel(self, path: Path) -> Path:
        """The top level of the work tree containing path."""
        return Path(self._run(path, "rev-parse", "--show-toplevel").stdout.strip())

    def head_ref(self, repo: Path) -> str:
        """The current branch name, or the commit id when HEAD is detached."""
        branch = self._run(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        if branch.returncode == 0:
            return branch.stdout.strip()
        return self._run(repo, "rev-parse", "--verify", "HEAD").stdout.strip()

    def ref_exists(self, repo: Path, ref: str) -> bool:
        """Whether ref names a commit."""
        verify = ["rev-parse", "--verify", "--quiet", "--end-of-options"]
        result = self._run(repo, *verify, f"{ref}^{{commit}}", check=False)
        return result.returncode == 0

    def branch_exists(self, repo: Path, branch: str) -> bool:
        """Whether the local branch exists."""
        verify = ["rev-parse", "--verify", "--quiet", "--end-of-options"]
        result = self._run(repo, *verify, f"refs/heads/{branch}", check=False)
        return result.returncode == 0

    def _entries(self, repo: Path) -> list[_Entry]:
        with self._locked(repo):
            out = self._listing(repo)
        # -z keeps paths with newlines intact; records end with an empty field.
        entries: list[_Entry] = []
        fields: dict[str, str] = {}
        for field in out.split("\0"):
            if field:
                key, _, value = field.partition(" ")
                fields[key] = value
                continue
            if "worktree" in fields:
                entries.append(
                    _Entry(
                        path=fields["worktree"],
                        branch=fields.get("branch"),
                        locked="locked" in fields,
                        bare="bare" in fields,
                    )
                )
            fields = {}
        return entries

    def _listing(self, repo: Path) -> str:
        """`git worktree list`, which git 2.39 fails while another process is half way
        through `git worktree add` on the repository ("failed to read .git/worktrees/
        NAME/commondir"): our own adds hold the lock, a user's may not, so retry that."""
        for _ in range(_LIST_RETRIES):
            listed = self._run(repo, "worktree", "list", "--porcelain", "-z", check=False)
            if listed.returncode == 0 or not _half_added(listed.stderr):
                break
            time.sleep(_LIST_RETRY_SECONDS)
        if listed.returncode != 0:
            raise ToolFailed(listed.argv, listed.returncode, listed.stderr)
        return listed.stdout

    @contextlib.contextmanager
    def _locked(self, repo: Path) -> Iterator[None]:
        """The per-repository lock every change to, and every look at, its worktrees takes.

        Reentrant in a thread (one lock object per repository), so a removal may look at
        the list while it holds the lock. flock is released when its holder dies, so
        waiting without a timeout only waits for a live git; Ctrl-C still interrupts."""
        path = self._lock_path(repo)
        with self._guard:
            lock = self._locks.get(path)
            if lock is None:
                self.lock_dir.mkdir(parents=True, exist_ok=True)
                lock = self._locks[path] = FileLock(str(path))
        with lock:
            yield

    def _entry(self, repo: Path, path: Path) -> tuple[int, _Entry] | None:
        for index, entry in enumerate(self._entries(repo)):
            if _same_path(entry.path, path):
                return index, entry
        return None

    def list_worktrees(self, repo: Path) -> list[Path]:
        """Every registered worktree, the main one first (as git lists them)."""
        return [Path(entry.path) for entry in self._entries(repo)]

    def is_worktree(self, repo: Path, path: Path) -> bool:
        """Whether path is registered as a worktree of repo."""
        return self._entry(repo, _absolute(path)) is not None

    def branch_holder(self, repo: Path, branch: str) -> Path | None:
        """The worktree that has branch checked out (git lets only one), or None."""
        for entry in self._entries(repo):
            if entry.branch == f"refs/heads/{branch}":
                return Path(entry.path)
        return None

    def branch_tip(self, repo: Path, branch: str) -> str:
        """The commit id the local branch points at."""
        verify = ["rev-parse", "--verify", "--end-of-options"]
        return self._run(repo, *verify, f"refs/heads/{branch}^{{commit}}").stdout.strip()

    def _lock_path(self, repo: Path) -> Path:
        # Keyed on the common dir so that a repository reached through any of its
        # worktrees, or through a symlink, takes the same lock.
        key = os.path.realpath(repo)
        found = self._lock_paths.get(key)
        if found is None:
            common = self._run(
                repo, "rev-parse", "--path-format=absolute", "--git-common-dir"
            ).stdout.strip()
            digest = hashlib.sha256(os.path.realpath(common).encode()).hexdigest()[:20]
            found = self._lock_paths[key] = self.lock_dir / f"git-worktree-{digest}.lock"
        return found

    def add(self, repo: Path, path: Path, branch: str, base: str, *, new_branch: bool) -> bool:
        """`git worktree add` under a per-repository lock; True only if it verifiably did it.

        With new_branch, `branch` is created from `base`; otherwise the existing
        `branch` is checked out and `base` is unused. A non-zero exit raises
        ToolFailed even though git may already have made the branch and worktree.
        """
        path = _absolute(path)
        if new_branch:
            # --no-track: setting up tracking writes .git/config, which parallel adds race on.
            args = ["worktree", "add", "--no-track", "-b", branch, "--", str(path), base]
        else:
            args = ["worktree", "add", "--", str(path), branch]
        with self._locked(repo):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._run(repo, *args)
            found = self._entry(repo, path)
        return found is not None and found[1].branch == f"refs/heads/{branch}"

    def switch(self, repo: Path, worktree: Path, branch: str, start: str | None = None) -> bool:
        """Put an existing worktree on `branch` (made from `start` when given); True only
        if it verifiably is on it. Uncommitted changes are the caller's to check first."""
        args = ["switch", "--no-track", "-c", branch, start] if start else ["switch", branch]
        with self._locked(repo):
            self._run(worktree, *args)
        return self.head_ref(worktree) == branch

    def remove(self, repo: Path, path: Path) -> None:
        """Remove a worktree, discarding its changes, even if locked or half made; idempotent.

        Callers decide whether the work in it may be discarded; a path that is not
        a registered worktree is left alone, whatever it holds.
        """
        with self._locked(repo):
            self._remove(repo, _absolute(path))

    def _remove(self, repo: Path, path: Path) -> None:
        found = self._entry(repo, path)
        if found is None:
            return
        index, entry = found
        if index == 0 or entry.bare:
            raise ValueError(f"refusing to remove the main worktree of {repo}: {entry.path}")
        if entry.locked:
            self._run(repo, "worktree", "unlock", "--", entry.path, check=False)
        # Twice --force: also removes a locked worktree and one with changes.
        removed = self._run(
            repo, "worktree", "remove", "--force", "--force", "--", entry.path, check=False
        )
        if removed.returncode == 0:
            return
        # git refuses some half-made or unusual worktrees (missing directory, broken
        # .git file, submodules): delete the directory and let prune drop the entry.
        try:
            if os.path.lexists(entry.path):
                shutil.rmtree(entry.path)
        except OSError as exc:
            raise ToolFailed(
                removed.argv, removed.returncode, f"{removed.stderr}\ncannot delete: {exc}"
            ) from exc
        self._run(repo, "worktree", "prune")
        if self._entry(repo, path) is not None:
            raise ToolFailed(removed.argv, removed.returncode, removed.stderr)

    def delete_branch(self, repo: Path, branch: str) -> None:
        """`git branch -D`; a branch already gone is not an error."""
        if not self.branch_exists(repo, branch):
            return
        result = self._run(repo, "branch", "-D", "--", branch, check=False)
        if result.returncode != 0 and self.branch_exists(repo, branch):
            raise ToolFailed(result.argv, result.returncode, result.stderr)

    def commits_ahead(self, repo: Path, base: str, branch: str) -> int:
        """How many commits branch has that base does not."""
        out = self._run(repo, "rev-list", "--count", "--end-of-options", f"{base}..{branch}")
        return int(out.stdout.strip())

    def has_changes(self, worktree: Path) -> bool:
        """Uncommitted changes or untracked (not ignored) files in the worktree."""
        self._git()
        git = gitpython()
        try:
            repo = git.Repo(worktree)
        except (git.NoSuchPathError, git.InvalidGitRepositoryError):
            raise EnvironmentProblem(f"{worktree} is not a git repository") from None
        with repo:
            return bool(repo.is_dirty(index=True, working_tree=True, untracked_files=True))
