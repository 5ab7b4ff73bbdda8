"""A task's changes as a unified diff, through the git adapter's one chokepoint."""

from __future__ import annotations

from pathlib import Path

from dispatch.adapters.git import GitWorktrees

# Untracked files are shown one `git diff --no-index` each: a worktree full of build
# output must not turn one page view into thousands of processes.
MAX_UNTRACKED = 200

_PLAIN = ("--no-color", "--no-ext-diff", "--no-textconv")


class GitChanges(GitWorktrees):
    """Reads what a task's branch and worktree hold; changes nothing."""

    def diff(
        self, repo: Path, branch: str, base: str, worktree: Path | None, snapshot: str | None = None
    ) -> str:
        """The branch against its merge base, then the worktree's uncommitted changes: read
        from the worktree, or for a collected one from its `snapshot` commit (whose parent
        is the worktree's HEAD)."""
        parts: list[str] = []
        if self.branch_exists(repo, branch):
            found = self._run(repo, "merge-base", "--end-of-options", base, branch, check=False)
            start = found.stdout.strip() if found.returncode == 0 else base
            parts.append(self._run(repo, "diff", *_PLAIN, start, branch, "--").stdout)
        if snapshot is not None:
            saved = self._run(repo, "diff", *_PLAIN, f"{snapshot}^", snapshot, "--", check=False)
            ok = saved.returncode == 0
            parts.append(saved.stdout if ok else f"# snapshot {snapshot} cannot be read\n")
        if worktree is not None and worktree.is_dir() and self.is_worktree(repo, worktree):
            parts.append(self._run(worktree, "diff", *_PLAIN, "HEAD", "--").stdout)
            listed = self._run(worktree, "ls-files", "-z", "--others", "--exclude-standard")
            untracked = [name for name in listed.stdout.split("\0") if name]
            for name in untracked[:MAX_UNTRACKED]:
                # Exit 1 means "they differ": the normal answer for a new file.
                shown = self._run(
                    worktree, "diff", *_PLAIN, "--no-index", "--", "/dev/null", name, check=False
                )
                parts.append(shown.stdout)
            if len(untracked) > MAX_UNTRACKED:
                parts.append(f"# and {len(untracked) - MAX_UNTRACKED} more untracked files\n")
        # Each part ends its last line, so the next part's header starts a line of its own.
        return "".join(part if part.endswith("\n") else part + "\n" for part in parts if part)
