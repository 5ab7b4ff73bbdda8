"""A worktree's uncommitted state saved as a commit, and put back: what `gc` and `restore` use.

GitPython reads repository state here (dirty files, HEAD, refs, ancestry). The writes
run the real git through GitPython with a temporary index (`GIT_INDEX_FILE`), so the
user's branch, index and files are never touched while a snapshot is made. Every git
call gets `-C <worktree>`: GitPython silently runs in the process's cwd when its
working directory has gone, which would act on the wrong repository.

A snapshot is a commit whose first parent is the worktree's HEAD and whose tree is
the worktree's files as they are: modified and deleted tracked files, untracked files
that are not ignored, executable bits, symlinks and binary files. When something was
staged, a second parent holds the index's tree (as `git stash` does), so `restore`
brings back the staged/unstaged split as well. Ignored files and empty directories
are not in it: git does not track them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dispatch.adapters.git import gitpython
from dispatch.errors import EnvironmentProblem, ToolFailed

if TYPE_CHECKING:
    from git import Repo

WIP_PREFIX = "refs/dispatch/wip/"
# Used only where the user has no identity configured: a snapshot must not fail for that.
_IDENTITY = {"name": "dispatch", "email": "dispatch@localhost"}
# A snapshot is made from cron too: never wait for a signing key's passphrase.
_COMMIT_TREE = ("commit-tree", "--no-gpg-sign")


@dataclass(frozen=True)
class Snapshot:
    ref: str
    commit: str
    head: str


@contextmanager
def _open(path: Path) -> Iterator[Repo]:
    """The repository whose work tree is exactly `path` (never a parent directory's)."""
    gitpython()  # imported quietly, so that a missing git binary is our error
    from git import InvalidGitRepositoryError, NoSuchPathError, Repo

    try:
        repo = Repo(path)
    except (InvalidGitRepositoryError, NoSuchPathError) as exc:
        raise EnvironmentProblem(f"{path} is not a git worktree ({type(exc).__name__})") from None
    try:
        yield repo
    finally:
        repo.close()  # GitPython keeps `git cat-file` processes open until closed


def _git(repo: Repo, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run git in the repository's work tree; a non-zero exit is ToolFailed."""
    from git import GitCommandError

    argv = [gitpython().Git.GIT_PYTHON_GIT_EXECUTABLE or "git"]
    argv += ["-C", str(repo.working_tree_dir), *args]
    try:
        out: str = repo.git.execute(argv, env=dict(env or {}), strip_newline_in_stdout=True)
    except GitCommandError as exc:
        status = exc.status if isinstance(exc.status, int) else 1
        raise ToolFailed([str(a) for a in argv], status, str(exc.stderr)) from None
    return out


def _identity(repo: Repo) -> dict[str, str]:
    """Author and committer for a snapshot when the user's git knows none."""
    env: dict[str, str] = {}
    reader = repo.config_reader()
    for key in ("name", "email"):
        configured = reader.get_value("user", key, default="")
        for who in ("AUTHOR", "COMMITTER"):
            variable = f"GIT_{who}_{key.upper()}"
            if not configured and not os.environ.get(variable):
                env[variable] = _IDENTITY[key]
    return env


class Snapshots:
    """Snapshots of worktrees under `refs/dispatch/wip/`."""

    def head(self, worktree: Path) -> str | None:
        """The commit id the worktree's HEAD is at; None when it has no commit yet."""
        with _open(worktree) as repo:
            try:
                return str(repo.head.commit.hexsha)
            except ValueError:
                return None

    def unreferenced_head(self, worktree: Path, repo_path: Path) -> str | None:
        """The worktree's HEAD commit if it is detached and no ref holds it, else None."""
        # Read in `repo_path`: the worktree's own refs (`refs/bisect/`, `refs/worktree/`)
        # and HEAD's reflog go with the worktree. A snapshot under `refs/dispatch/` does
        # not count: `restore` brings back the task's branch, never a detached HEAD.
        with _open(worktree) as repo:
            if not repo.head.is_detached:
                return None  # on a branch, which holds every commit HEAD has
            head = str(repo.head.commit.hexsha)
        with _open(repo_path) as main:
            holders = _git(main, "for-each-ref", "--contains", head, "--format=%(refname)")
        if any(not name.startswith("refs/dispatch/") for name in holders.splitlines()):
            return None
        return head

    def is_dirty(self, worktree: Path) -> bool:
        """Anything uncommitted: staged, modified, deleted, or untracked and not ignored."""
        with _open(worktree) as repo:
            return bool(repo.is_dirty(index=True, working_tree=True, untracked_files=True))

    def is_locked(self, worktree: Path) -> bool:
        """Whether the user locked the worktree (`git worktree lock`): they asked to keep it."""
        with _open(worktree) as repo:
            return (Path(repo.git_dir) / "locked").exists()

    def clear_stale_index_lock(self, worktree: Path) -> None:
        """Remove the `index.lock` a git killed mid-write left behind; the caller makes
        sure no git is at work in this worktree (it holds the task's guard)."""
        with _open(worktree) as repo:
            (Path(repo.git_dir) / "index.lock").unlink(missing_ok=True)

    def main_worktree(self, path: Path) -> Path | None:
        """The repository a worktree directory belongs to (its main work tree), or None
        when the directory is not itself the top of a git worktree."""
        try:
            with _open(path) as repo:
                top = repo.working_tree_dir
                if top is None or not os.path.samefile(top, path):
                    return None
                common = Path(repo.common_dir).resolve()
        except (EnvironmentProblem, OSError):
            return None
        return common.parent if common.name == ".git" else common

    def save(self, worktree: Path, ref: str, message: str) -> Snapshot:
        """Commit the worktree's whole state on a temporary index and point `ref` at it.

        The ref is written last, in one step (`update-ref`, with a reflog entry so an
        earlier snapshot under the same name can still be found).
        """
        with _open(worktree) as repo, tempfile.TemporaryDirectory(prefix="dispatch-gc-") as tmp:
            head = str(repo.head.commit.hexsha)
            env = {**_identity(repo), "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            _git(repo, "read-tree", head, env=env)
            _git(repo, "add", "--all", env=env)
            tree = _git(repo, "write-tree", env=env)
            parents = ["-p", head]
            staged = self._index_tree(repo, Path(tmp) / "staged")
            if staged is not None and staged != _git(repo, "rev-parse", f"{head}^{{tree}}"):
                note = f"index of {message}"
                index = _git(repo, *_COMMIT_TREE, "-p", head, "-m", note, staged, env=env)
                parents += ["-p", index]
            commit = _git(repo, *_COMMIT_TREE, *parents, "-m", message, tree, env=env)
            _git(repo, "update-ref", "--create-reflog", "-m", message, ref, commit)
            return Snapshot(ref, commit, head)

    def _index_tree(self, repo: Repo, copy: Path) -> str | None:
        """The tree of the user's index, written from a copy so the index stays untouched."""
        real = Path(_git(repo, "rev-parse", "--path-format=absolute", "--git-path", "index"))
        if not real.exists():
            return None
        copy.write_bytes(real.read_bytes())
        return _git(repo, "write-tree", env={"GIT_INDEX_FILE": str(copy)})

    def commit_of(self, repo_path: Path, ref: str) -> str | None:
        """The commit `ref` points at, or None."""
        with _open(repo_path) as repo:
            try:
                return _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
            except ToolFailed:
                return None

    def parent_of(self, repo_path: Path, commit: str) -> str | None:
        with _open(repo_path) as repo:
            found = repo.commit(commit)
            return str(found.parents[0].hexsha) if found.parents else None

    def is_merged(self, repo_path: Path, branch: str, base: str) -> bool:
        """Whether every commit of `branch` is in `base`."""
        with _open(repo_path) as repo:
            return bool(repo.is_ancestor(repo.commit(f"refs/heads/{branch}"), repo.commit(base)))

    def apply(self, worktree: Path, commit: str) -> None:
        """Make a freshly checked-out worktree hold the snapshot's state exactly.

        The files become the snapshot's tree (deletions and executable bits included),
        then the index goes back to what it was (HEAD, or the staged tree), leaving the
        files alone: `git status` shows what it showed before the snapshot was taken.
        """
        with _open(worktree) as repo:
            snapshot = repo.commit(commit)
            index = snapshot.parents[1] if len(snapshot.parents) > 1 else snapshot.parents[0]
            _git(repo, "read-tree", "--reset", "-u", commit)
            _git(repo, "read-tree", "--reset", str(index.hexsha))
            # The index now lacks the files' stat data: refresh it so status is fast. It
            # exits 1 when files differ from the index, which they are meant to.
            with suppress(ToolFailed):
                _git(repo, "update-index", "-q", "--refresh")


class Usage(NamedTuple):
    bytes: int  # on disk, as `du` counts them
    newest: float  # the newest mtime in the tree
    nested: list[str]  # git repositories inside it (submodules, clones): not in a snapshot


def disk_usage(path: Path) -> Usage:
    """What a worktree holds on disk, one walk over it."""
    total, newest, nested = 0, 0.0, []
    for root, dirs, files in os.walk(path):
        if root != str(path) and (".git" in dirs or ".git" in files):
            nested.append(root)
        for name in dirs + files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += getattr(info, "st_blocks", 0) * 512 or info.st_size
            newest = max(newest, info.st_mtime)
    return Usage(total, newest, nested)
