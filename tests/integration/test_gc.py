"""`dispatch gc` and `dispatch restore` on real repositories, worktrees, tmux and SQLite."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dispatch.services.dispatching import dispatch_task
from dispatch.services.monitor import task_diff
from tests.conftest import Env, windows
from tests.faults import events, run_cli, worktree_list
from tests.integration.recovery_helpers import (
    DEAF,
    dispatch_process,
    dump,
    execute,
    hours_ago,
    in_worktree,
    new_task,
    running,
    settled,
    sleepers,
    task_row,
    wait_for,
)

# For the suite's time: gc and restore on PostgreSQL are test_postgresql.py's.
pytestmark = pytest.mark.one_backend

# What an agent leaves behind: a modified, a deleted, an executable and a binary file,
# untracked files in a new subfolder, and an ignored build log (not work: not kept).
DIRTY = (
    "printf 'changed\\n' >> README.md && rm gone.txt && chmod +x run.sh"
    " && printf '\\000\\001\\377bin' > blob.bin && mkdir -p new/deep"
    " && printf 'untracked\\n' > new/deep/notes.txt && printf 'log\\n' > build.log"
)
# Fails the first time, leaving work; done when it finds that work again.
RESUMES = (
    "if test -f new/work.txt; then echo saw >> seen.txt; else mkdir -p new"
    " && echo mine > new/work.txt && chmod +x new/work.txt; exit 1; fi"
)


def git_out(path: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def project(repo: Path, git: Any) -> Path:
    """The test repository with the files DIRTY changes, and a .gitignore."""
    (repo / "gone.txt").write_text("to be deleted\n")
    (repo / "run.sh").write_text("echo hi\n")
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "files")
    return repo


def files(path: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file under path but git's own: content and whether it is executable."""
    found = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if rel.parts[0] == ".git" or not file.is_file():
            continue
        found[str(rel)] = (file.read_bytes(), bool(file.stat().st_mode & stat.S_IXUSR))
    return found


def status(path: Path) -> str:
    return git_out(path, "status", "--porcelain=v1", "--untracked-files=all")


def finished(make_app: Any, env: Env, repo: Path, prompt: str, **kwargs: Any) -> int:
    """A task run to its end by the shell agent; its id."""
    app = make_app()
    task_id = new_task(app, repo, prompt, **kwargs)
    dispatch_task(app, task_id)
    wait_for(lambda: settled(env, task_id), f"task {task_id} to end")
    return task_id


def worktree_of(env: Env, task_id: int) -> Path:
    return Path(task_row(env, task_id)["worktree"])


def gc_json(capsys: Any, *args: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "gc", "--json", *args)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def refs(repo: Path) -> str:
    return git_out(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/dispatch")


# -- saving and restoring ------------------------------------------------------------------


def test_gc_then_restore_gives_back_every_byte_and_the_same_status(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, DIRTY)
    assert task_row(env, task_id)["status"] == "done"
    path = worktree_of(env, task_id)
    before_files, before_status = files(path), status(path)
    assert "build.log" in before_files and " D gone.txt" in before_status
    branch = task_row(env, task_id)["branch"]
    branch_tip = git_out(project, "rev-parse", branch).strip()
    head = git_out(path, "rev-parse", "HEAD").strip()
    main_status = status(project)
    diffed_before = _diffed_files(task_diff(make_app(), task_id))
    assert {"README.md", "gone.txt", "run.sh", "blob.bin", "new/deep/notes.txt"} <= diffed_before

    result = gc_json(capsys, "--older-than", "0s")

    (attempt_id,) = [e["attempt_id"] for e in events(env, task_id, "dispatched")]
    ref = f"refs/dispatch/wip/{task_id}-{attempt_id}"
    assert result["removed"] == [
        {"task_id": task_id, "worktree": str(path), "snapshot": ref, "bytes": result["freed_bytes"]}
    ]
    assert result["kept"] == [] and result["freed_bytes"] > 0
    assert not path.exists() and str(path) not in worktree_list(project)
    # The snapshot: a commit on top of the worktree's HEAD; the branch is where it was.
    assert git_out(project, "rev-parse", f"{ref}^").strip() == head
    assert git_out(project, "rev-parse", branch).strip() == branch_tip
    snapshot_files = git_out(project, "ls-tree", "-r", "--name-only", ref).split()
    assert "new/deep/notes.txt" in snapshot_files and "blob.bin" in snapshot_files
    assert "gone.txt" not in snapshot_files and "build.log" not in snapshot_files
    assert status(project) == main_status  # the main worktree and its index untouched
    (gc_event,) = events(env, task_id, "gc")
    commit = git_out(project, "rev-parse", ref).strip()
    assert gc_event["detail"]["ref"] == ref and gc_event["detail"]["commit"] == commit
    # What was uncommitted is still in the task's diff, read from the snapshot.
    assert _diffed_files(task_diff(make_app(), task_id)) == diffed_before
    code, _, err = run_cli(capsys, "show", str(task_id))
    assert code == 0
    assert f"collected by gc; `dispatch restore {task_id}` brings it back" in err

    code, _, err = run_cli(capsys, "restore", str(task_id))

    assert code == 0, err
    assert "restored" in err
    after = files(path)
    assert after == {k: v for k, v in before_files.items() if k != "build.log"}
    assert after["run.sh"][1] and not after["README.md"][1]  # executable bit as it was
    assert status(path) == before_status
    assert git_out(path, "rev-parse", "--abbrev-ref", "HEAD").strip() == branch
    assert [e["detail"]["commit"] for e in events(env, task_id, "restored")] == [commit]
    code, _, err = run_cli(capsys, "show", str(task_id))
    assert (code, err) == (0, "")


def _diffed_files(diff: str) -> set[str]:
    """The paths a unified diff changes, from its `diff --git a/X b/X` headers."""
    return set(re.findall(r"^diff --git a/\S+ b/(\S+)$", diff, re.MULTILINE))


def test_staged_changes_come_back_staged(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, "echo new > staged.txt && git add staged.txt")
    path = worktree_of(env, task_id)
    (path / "README.md").write_text("unstaged edit\n")
    before = status(path)
    assert "A  staged.txt" in before and " M README.md" in before

    gc_json(capsys, "--older-than", "0s")
    assert run_cli(capsys, "restore", str(task_id))[0] == 0

    assert status(path) == before


def test_the_diff_of_a_collected_task_says_when_its_snapshot_is_gone(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    """The snapshot was deleted by hand (its ref, then git's gc): the diff still shows the
    branch and says what it cannot show, rather than pass the worktree's changes over."""
    committed = DIRTY + " && git add -A && git commit -qm x && echo more >> README.md"
    task_id = finished(make_app, env, project, committed)
    gc_json(capsys, "--older-than", "0s")
    (gc_event,) = events(env, task_id, "gc")
    commit = gc_event["detail"]["commit"]
    git_out(project, "update-ref", "-d", gc_event["detail"]["ref"])
    git_out(project, "reflog", "expire", "--expire=now", "--all")
    git_out(project, "gc", "-q", "--prune=now")
    diff = task_diff(make_app(), task_id)
    assert f"# snapshot {commit} cannot be read\n" in diff
    assert "new/deep/notes.txt" in diff  # the branch's own commit is still shown


def test_a_clean_worktree_goes_without_a_snapshot_and_comes_back(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, "true")
    path = worktree_of(env, task_id)

    result = gc_json(capsys, "--older-than", "0s")

    assert [(r["task_id"], r["snapshot"]) for r in result["removed"]] == [(task_id, None)]
    assert refs(project) == ""
    assert run_cli(capsys, "restore", str(task_id))[0] == 0
    assert status(path) == "" and (path / "README.md").exists()


# -- what gc takes, and what it leaves -------------------------------------------------------


def test_dry_run_changes_nothing_and_says_what_would_go(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, DIRTY)
    path = worktree_of(env, task_id)
    before_files, rows_before = files(path), dump(env)

    result = gc_json(capsys, "--older-than", "0s", "--dry-run")

    (removed,) = result["removed"]
    assert removed["task_id"] == task_id and removed["snapshot"].startswith("refs/dispatch/wip/")
    assert removed["bytes"] > 0 and result["freed_bytes"] == removed["bytes"]
    assert files(path) == before_files and str(path) in worktree_list(project)
    assert refs(project) == "" and dump(env) == rows_before  # no ref, no event


def test_retention_leaves_recent_tasks_and_takes_old_ones(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    old = finished(make_app, env, project, "true")
    recent = finished(make_app, env, project, "true")
    execute(env, "UPDATE tasks SET updated_at = ? WHERE id = ?", hours_ago(8 * 24), old)

    result = gc_json(capsys)  # gc_after: 7d

    assert [r["task_id"] for r in result["removed"]] == [old]
    assert not worktree_of(env, old).exists() and worktree_of(env, recent).exists()
    assert gc_json(capsys, "--older-than", "1h")["removed"] == []


def test_running_ready_and_failed_tasks_are_left_alone_by_default(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    app = make_app()
    failed = finished(make_app, env, project, "echo x > work.txt; exit 1")
    requeued = finished(make_app, env, project, "echo x > work.txt; exit 1")
    assert run_cli(capsys, "reset", str(requeued))[0] == 0  # ready, with its worktree
    running = new_task(app, project, "echo x > work.txt; sleep 30")
    dispatch_task(app, running)
    paths = {t: worktree_of(env, t) for t in (failed, requeued, running)}

    assert gc_json(capsys, "--older-than", "0s")["removed"] == []
    result = gc_json(capsys, "--older-than", "0s", "--include-failed")

    assert [r["task_id"] for r in result["removed"]] == [failed]
    assert not paths[failed].exists()
    assert (paths[requeued] / "work.txt").exists() and (paths[running] / "work.txt").exists()
    assert task_row(env, running)["status"] == "in-progress"


def test_closed_tasks_are_collected(make_app: Any, env: Env, project: Path, capsys: Any) -> None:
    task_id = finished(make_app, env, project, "echo x > work.txt; exit 1")
    assert run_cli(capsys, "close", str(task_id))[0] == 0

    result = gc_json(capsys, "--older-than", "0s")

    assert [r["task_id"] for r in result["removed"]] == [task_id]


def test_branches_go_only_with_the_flag_and_only_when_merged(
    make_app: Any, env: Env, project: Path, capsys: Any, git: Any
) -> None:
    commit = "echo {0} > {0}.txt && git add {0}.txt && git commit -qm {0}"
    merged = finished(make_app, env, project, commit.format("merged"))
    unmerged = finished(make_app, env, project, commit.format("unmerged"))
    merged_branch = task_row(env, merged)["branch"]
    unmerged_branch = task_row(env, unmerged)["branch"]
    git(project, "merge", "-q", "--ff-only", merged_branch)

    gc_json(capsys, "--older-than", "0s")
    assert {merged_branch, unmerged_branch} <= set(git_out(project, "branch").split())

    result = gc_json(capsys, "--older-than", "0s", "--branches")

    names = git_out(project, "branch", "--format=%(refname:short)").split()
    assert merged_branch not in names and unmerged_branch in names
    assert result["kept"] == [
        {
            "task_id": unmerged,
            "reason": f"branch {unmerged_branch} is not merged into main; kept",
        }
    ]
    assert [e["detail"]["branch"] for e in events(env, merged, "gc")][-1] == merged_branch
    # Its worktree comes back all the same: the branch is made again where it was.
    assert run_cli(capsys, "restore", str(merged))[0] == 0
    assert (worktree_of(env, merged) / "merged.txt").exists()


def test_a_worktree_outside_worktree_root_is_refused(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, "echo x > work.txt")
    path = worktree_of(env, task_id)
    env.write_config(env.config.read_text() + f'worktree_root = "{env.root / "elsewhere"}"\n')

    result = gc_json(capsys, "--older-than", "0s")

    assert result["removed"] == []
    (kept,) = result["kept"]
    assert kept["task_id"] == task_id and "outside worktree_root" in kept["reason"]
    assert (path / "work.txt").exists()


def test_a_hostile_title_reaches_no_shell(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    title = "$(touch pwned) `touch pwned2`; rm -rf / #\n'\""
    task_id = finished(make_app, env, project, "echo x > work.txt", title=title)

    assert gc_json(capsys, "--older-than", "0s")["removed"][0]["task_id"] == task_id
    assert run_cli(capsys, "restore", str(task_id))[0] == 0

    assert not list(env.root.rglob("pwned*"))
    assert (worktree_of(env, task_id) / "work.txt").read_text() == "x\n"


def test_a_worktree_deleted_by_hand_is_unregistered_and_its_snapshot_still_restores(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, DIRTY)
    path = worktree_of(env, task_id)
    expected = {k: v for k, v in files(path).items() if k != "build.log"}
    gc_json(capsys, "--older-than", "0s")
    assert run_cli(capsys, "restore", str(task_id))[0] == 0
    shutil.rmtree(path)  # the user tidies up by hand

    result = gc_json(capsys, "--older-than", "0s")

    assert [(r["task_id"], r["bytes"]) for r in result["removed"]] == [(task_id, 0)]
    assert str(path) not in worktree_list(project)
    assert run_cli(capsys, "restore", str(task_id))[0] == 0
    assert files(path) == expected


def test_a_worktree_made_on_another_host_is_that_hosts_to_collect(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    """SPEC §10: whether the path is there on this host (a shared disk) or not, gc here
    neither removes another host's worktree nor records it as removed."""
    task_id = finished(make_app, env, project, DIRTY)
    path = worktree_of(env, task_id)
    execute(env, "UPDATE attempts SET host = ? WHERE task_id = ?", "far-away", task_id)
    result = gc_json(capsys, "--older-than", "0s")
    assert (result["removed"], result["kept"]) == ([], [])
    assert path.is_dir() and str(path) in worktree_list(project)
    shutil.rmtree(path)  # now as on a host that does not have it
    git_out(project, "worktree", "prune")
    result = gc_json(capsys, "--older-than", "0s")
    assert (result["removed"], result["kept"]) == ([], [])
    assert events(env, task_id, "gc") == []
    assert gc_json(capsys, "--older-than", "0s", "--dry-run")["removed"] == []

    execute(
        env, "UPDATE attempts SET host = ? WHERE task_id = ?", make_app().settings.host, task_id
    )
    assert [r["task_id"] for r in gc_json(capsys, "--older-than", "0s")["removed"]] == [task_id]


def test_orphans_are_snapshotted_in_their_own_repository_then_removed(
    env: Env, project: Path, capsys: Any, git: Any
) -> None:
    orphan = env.home / "worktrees" / project.name / "task-999"
    git(project, "worktree", "add", "-q", "-b", "lost", str(orphan))
    (orphan / "unsaved.txt").write_text("someone's work\n")

    out = run_cli(capsys, "sweep", "--json")[1]
    assert str(orphan) in json.loads(out)["orphan_worktrees"]
    result = gc_json(capsys, "--older-than", "0s", "--orphans")

    assert result["removed"] == [
        {
            "task_id": None,
            "worktree": str(orphan),
            "snapshot": "refs/dispatch/wip/orphan-task-999",
            "bytes": result["freed_bytes"],
        }
    ]
    assert not orphan.exists() and str(orphan) not in worktree_list(project)
    saved = git_out(project, "show", "refs/dispatch/wip/orphan-task-999:unsaved.txt")
    assert saved == "someone's work\n"


def test_a_plain_directory_under_the_root_is_no_worktree_and_stays(
    env: Env, project: Path, capsys: Any
) -> None:
    stray = env.home / "worktrees" / project.name / "task-77"
    stray.mkdir(parents=True)
    (stray / "keep.txt").write_text("mine\n")

    result = gc_json(capsys, "--older-than", "0s", "--orphans")

    assert result["removed"] == [] and "not a git worktree" in result["kept"][0]["reason"]
    assert (stray / "keep.txt").exists()


# -- work a snapshot cannot hold -------------------------------------------------------------


def unreferenced(path: Path, head: str) -> str:
    """What gc says of a worktree whose detached HEAD no branch or tag holds."""
    return (
        f"{path}: HEAD {head[:12]} is detached and no branch or tag holds it; left alone"
        f" (`git -C {path} branch NAME` keeps it, then gc may take the worktree)"
    )


def commit_detached(git: Any, path: Path, name: str) -> str:
    """A commit on a detached HEAD in the worktree at path, which no ref holds; its id."""
    git(path, "checkout", "-q", "--detach")
    (path / name).write_text("on no branch\n")
    git(path, "add", name)
    git(path, "commit", "-q", "-m", "detached work")
    head = git_out(path, "rev-parse", "HEAD").strip()
    assert git_out(path, "for-each-ref", "--contains", head) == ""
    return head


def test_commits_on_a_detached_head_keep_the_worktree_until_a_branch_holds_them(
    make_app: Any, env: Env, project: Path, capsys: Any, git: Any
) -> None:
    task_id = finished(make_app, env, project, "true")
    path = worktree_of(env, task_id)
    branch = task_row(env, task_id)["branch"]
    head = commit_detached(git, path, "detached.txt")
    kept = [{"task_id": task_id, "reason": f"worktree {unreferenced(path, head)}"}]

    planned = gc_json(capsys, "--older-than", "0s", "--dry-run")
    result = gc_json(capsys, "--older-than", "0s")

    for answer in (planned, result):
        assert (answer["removed"], answer["kept"]) == ([], kept)
    assert (path / "detached.txt").exists() and str(path) in worktree_list(project)
    (path / "more.txt").write_text("uncommitted\n")  # a snapshot would not bring HEAD back
    assert gc_json(capsys, "--older-than", "0s")["kept"] == kept
    assert git_out(path, "rev-parse", "HEAD").strip() == head
    assert events(env, task_id, "gc") == [] and refs(project) == ""

    (path / "more.txt").unlink()
    git(path, "branch", "kept-work")  # what the reason says to do
    result = gc_json(capsys, "--older-than", "0s")

    assert [(r["task_id"], r["snapshot"]) for r in result["removed"]] == [(task_id, None)]
    assert result["kept"] == [] and not path.exists()
    assert [e["detail"]["head"] for e in events(env, task_id, "gc")] == [head]
    assert git_out(project, "show", "kept-work:detached.txt") == "on no branch\n"
    assert run_cli(capsys, "restore", str(task_id))[0] == 0
    assert git_out(path, "rev-parse", "--abbrev-ref", "HEAD").strip() == branch
    assert status(path) == ""


def test_a_detached_head_a_branch_holds_is_collected_as_before(
    make_app: Any, env: Env, project: Path, capsys: Any, git: Any
) -> None:
    commit = "echo x > x.txt && git add x.txt && git commit -qm x && git checkout -q --detach"
    task_id = finished(make_app, env, project, commit)
    path = worktree_of(env, task_id)
    tip = git_out(project, "rev-parse", task_row(env, task_id)["branch"]).strip()
    assert git_out(path, "rev-parse", "HEAD").strip() == tip
    assert git_out(path, "rev-parse", "--abbrev-ref", "HEAD").strip() == "HEAD"  # detached

    result = gc_json(capsys, "--older-than", "0s")

    assert [(r["task_id"], r["snapshot"]) for r in result["removed"]] == [(task_id, None)]
    assert result["kept"] == [] and not path.exists()
    assert [e["detail"]["head"] for e in events(env, task_id, "gc")] == [tip]


def test_an_orphan_whose_detached_head_no_ref_holds_stays(
    env: Env, project: Path, capsys: Any, git: Any
) -> None:
    orphan = env.home / "worktrees" / project.name / "task-998"
    git(project, "worktree", "add", "-q", "--detach", str(orphan))
    head = commit_detached(git, orphan, "lost.txt")
    kept = [{"task_id": None, "reason": f"orphan {unreferenced(orphan, head)}"}]

    planned = gc_json(capsys, "--older-than", "0s", "--orphans", "--dry-run")
    result = gc_json(capsys, "--older-than", "0s", "--orphans")

    for answer in (planned, result):
        assert (answer["removed"], answer["kept"]) == ([], kept)
    assert (orphan / "lost.txt").exists() and str(orphan) in worktree_list(project)
    assert refs(project) == ""


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_worktree_an_agent_still_runs_in_stays_until_its_processes_end(
    make_app: Any, env: Env, project: Path, capsys: Any, cli: Any
) -> None:
    app = make_app()
    task_id = new_task(app, project, DEAF)
    dispatch_task(app, task_id)
    attempt = dict(wait_for(lambda: running(env, task_id), "the agent to start"))
    path = Path(attempt["worktree"])
    seen: set[int] = {attempt["wrapper_pid"]}
    try:
        seen |= wait_for(lambda: sleepers(path), "the agent's sleep to start")
        os.kill(attempt["wrapper_pid"], signal.SIGKILL)
        wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")
        assert cli("sweep").code == 0
        assert task_row(env, task_id)["status"] == "interrupted"
        left = in_worktree(path)
        seen |= left
        assert len(left) == 2  # the deaf shell and its sleep
        pids = " ".join(map(str, sorted(left)))
        reason = (
            f"processes {pids} of attempt {attempt['id']} are still running in worktree"
            f" {path}; left alone (wait for them to exit, or stop them: kill {pids})"
        )

        for extra in (["--dry-run"], []):
            result = gc_json(capsys, "--older-than", "0s", "--include-failed", *extra)
            assert result["removed"] == []
            assert result["kept"] == [{"task_id": task_id, "reason": reason}]
        assert in_worktree(path) == left and str(path) in worktree_list(project)
        assert events(env, task_id, "gc") == []

        kill_all(left)
        wait_for(lambda: not in_worktree(path), "the agent's processes to end")
        result = gc_json(capsys, "--older-than", "0s", "--include-failed")

        assert [r["task_id"] for r in result["removed"]] == [task_id]
        assert result["kept"] == [] and not path.exists()
    finally:
        kill_all(seen | in_worktree(path))


# -- restore's answers ---------------------------------------------------------------------


def test_restore_refuses_clearly(make_app: Any, env: Env, project: Path, capsys: Any) -> None:
    app = make_app()
    done = finished(make_app, env, project, "true")
    running = new_task(app, project, "sleep 30")
    dispatch_task(app, running)

    assert run_cli(capsys, "restore", "4242")[0] == 4
    code, out, _ = run_cli(capsys, "restore", str(running), "--json")
    assert code == 3 and json.loads(out)["error"]["kind"] == "conflict"
    code, _, err = run_cli(capsys, "restore", str(done))
    assert code == 0 and "nothing to do" in err


# -- a collected task taken up again ---------------------------------------------------------


def test_redispatch_of_a_collected_task_restores_its_work_first(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, RESUMES)
    assert task_row(env, task_id)["status"] == "failed"
    gc_json(capsys, "--older-than", "0s", "--include-failed")
    assert not worktree_of(env, task_id).exists()

    code, _, err = run_cli(capsys, "redispatch", str(task_id))

    assert code == 0, err
    assert wait_for(lambda: settled(env, task_id), "the redispatch to end") == "done"
    path = worktree_of(env, task_id)
    assert (path / "seen.txt").read_text() == "saw\n"
    assert os.access(path / "new" / "work.txt", os.X_OK)
    assert len(events(env, task_id, "restored")) == 1


# -- killed, concurrent --------------------------------------------------------------------

SHIM = """#!/bin/sh
case "$*" in
  *"{trigger}"*)
    if [ "{when}" = after ]; then "{real}" "$@"; fi
    kill -9 $PPID; sleep 5; exit 1 ;;
esac
exec "{real}" "$@"
"""


@pytest.mark.parametrize(
    "trigger,when",
    [
        ("update-ref", "before"),  # killed while writing the snapshot's ref
        ("update-ref", "after"),  # between the snapshot and the removal
        ("worktree remove", "before"),  # renamed aside, registration still there
        ("worktree remove", "after"),  # unregistered, event not yet written
        ("branch -D", "before"),  # worktree gone, branch not yet
    ],
)
def test_a_gc_killed_at_each_step_is_finished_by_the_next_and_loses_nothing(
    make_app: Any, env: Env, project: Path, tmp_path: Path, cli: Any, trigger: str, when: str
) -> None:
    script = f"{DIRTY} && git add -A . && git commit -qm saved && printf more >> README.md"
    task_id = finished(make_app, env, project, f"{script} && echo extra > extra.txt")
    path = worktree_of(env, task_id)
    branch = task_row(env, task_id)["branch"]
    subprocess.run(["git", "-C", str(project), "merge", "-q", "--ff-only", branch], check=True)
    before_files, before_status = files(path), status(path)
    shim = tmp_path / "shim"
    shim.mkdir()
    real = shutil.which("git")
    (shim / "git").write_text(SHIM.format(trigger=trigger, when=when, real=real))
    (shim / "git").chmod(0o755)

    # A gc killed while it writes a snapshot cannot remove its temporary index: kept
    # in this test's directory, not the machine's /tmp.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    killed = cli(
        "gc", "--older-than", "0s", "--branches",
        extra_env={"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert killed.code == -9, (killed.stdout, killed.stderr)

    again = cli("gc", "--older-than", "0s", "--branches", "--json")
    assert again.code == 0, again.stderr
    assert not path.exists() and str(path) not in worktree_list(project)
    assert not list(path.parent.glob(".gc-trash-*"))
    assert branch not in git_out(project, "branch", "--format=%(refname:short)").split()
    assert [e for e in events(env, task_id, "gc") if "worktree" in e["detail"]]

    assert cli("restore", str(task_id)).code == 0
    assert files(path) == {k: v for k, v in before_files.items() if k != "build.log"}
    assert status(path) == before_status


def test_two_gcs_at_once_remove_each_worktree_once(
    make_app: Any, env: Env, project: Path, cli: Any
) -> None:
    tasks = [finished(make_app, env, project, DIRTY) for _ in range(3)]
    first = dispatch_process(env, "gc", "--older-than", "0s", "--json")
    second = dispatch_process(env, "gc", "--older-than", "0s", "--json")
    outputs = [p.communicate(timeout=60) for p in (first, second)]
    assert (first.returncode, second.returncode) == (0, 0), outputs

    removed = [r["task_id"] for out, _ in outputs for r in json.loads(out)["removed"]]
    assert sorted(removed) == tasks
    for task_id in tasks:
        assert len([e for e in events(env, task_id, "gc") if "worktree" in e["detail"]]) == 1
        assert cli("restore", str(task_id)).code == 0
        assert (worktree_of(env, task_id) / "new" / "deep" / "notes.txt").exists()


def test_gc_racing_a_redispatch_never_takes_the_worktree_from_the_attempt(
    make_app: Any, env: Env, project: Path, cli: Any
) -> None:
    tasks = [finished(make_app, env, project, RESUMES) for _ in range(3)]
    gc = dispatch_process(env, "gc", "--older-than", "0s", "--include-failed", "--json")
    redispatches = [dispatch_process(env, "redispatch", str(t)) for t in tasks]
    for process in (gc, *redispatches):
        process.communicate(timeout=60)
        assert process.returncode == 0

    for task_id in tasks:
        # Whichever went first, the agent found its work: the attempt succeeded in a
        # worktree that is there, holding that work.
        assert wait_for(partial(settled, env, task_id), "the redispatch to end") == "done"
        path = worktree_of(env, task_id)
        assert (path / "seen.txt").exists() and (path / "new" / "work.txt").exists()
        assert str(path) in worktree_list(project)


FAILING_GIT = """#!/bin/sh
case "$*" in *update-ref*) echo "fatal: cannot lock ref (simulated)" >&2; exit 128 ;; esac
exec "{real}" "$@"
"""


def test_a_snapshot_that_cannot_be_written_keeps_the_worktree(
    make_app: Any, env: Env, project: Path, tmp_path: Path, cli: Any
) -> None:
    task_id = finished(make_app, env, project, DIRTY)
    path = worktree_of(env, task_id)
    before = files(path)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "git").write_text(FAILING_GIT.format(real=shutil.which("git")))
    (shim / "git").chmod(0o755)

    result = cli(
        "gc", "--older-than", "0s", "--json",
        extra_env={"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip

    assert result.code == 0, result.stderr
    assert result.json()["removed"] == []
    (kept,) = result.json()["kept"]
    assert kept["task_id"] == task_id and "cannot lock ref" in kept["reason"]
    assert files(path) == before and events(env, task_id, "gc") == []


def test_a_worktree_holding_another_repository_is_left_alone(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, "git init -q vendored && echo x > vendored/x")
    path = worktree_of(env, task_id)

    result = gc_json(capsys, "--older-than", "0s")

    assert result["removed"] == [] and "holds git repositories" in result["kept"][0]["reason"]
    assert (path / "vendored" / "x").exists()


def test_run_after_a_reset_restores_a_collected_worktree_first(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    task_id = finished(make_app, env, project, RESUMES)
    gc_json(capsys, "--older-than", "0s", "--include-failed")
    assert run_cli(capsys, "reset", str(task_id))[0] == 0

    assert run_cli(capsys, "run", str(task_id))[0] == 0

    assert wait_for(lambda: settled(env, task_id), "the run to end") == "done"
    assert (worktree_of(env, task_id) / "seen.txt").exists()


def test_the_table_says_what_went_and_what_stayed(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    gone = finished(make_app, env, project, DIRTY)
    stays = finished(make_app, env, project, "echo x > x && git add x && git commit -qm x")
    assert run_cli(capsys, "close", str(stays))[0] == 0

    code, out, err = run_cli(capsys, "gc", "--older-than", "0s", "--branches")

    assert code == 0
    assert str(worktree_of(env, gone)) in out and f"refs/dispatch/wip/{gone}-" in out
    assert "not merged into main" in out and "kept" in out
    assert "removed 2 worktree(s), kept 1" in err


def test_a_redispatch_claimed_while_gc_removes_waits_for_it_and_restores_the_work(
    make_app: Any, env: Env, project: Path
) -> None:
    from dispatch.adapters.git import GitWorktrees
    from dispatch.services.dispatching import redispatch
    from dispatch.services.gc import GcOptions, collect
    from tests.faults import Faulty

    task_id = finished(make_app, env, project, RESUMES)
    outcome: list[Any] = []

    def claim_meanwhile(real: Any, repo: Path, path: Path) -> None:
        # gc has checked the task and is removing its worktree: a redispatch claims it now.
        worker = threading.Thread(target=lambda: outcome.append(redispatch(make_app(), task_id)))
        worker.start()
        wait_for(lambda: task_row(env, task_id)["status"] == "in-progress", "the claim")
        time.sleep(0.3)  # long enough for the dispatch to reach the worktree step
        real(repo, path)
        outcome.append(worker)

    real_git = GitWorktrees(make_app().settings.locks_dir)
    app = make_app(worktrees=Faulty(real_git, remove=claim_meanwhile))

    report = collect(app, GcOptions(0, include_failed=True))

    assert [r.task_id for r in report.removed] == [task_id]
    outcome[0].join(timeout=30)
    assert wait_for(lambda: settled(env, task_id), "the redispatch to end") == "done"
    assert (worktree_of(env, task_id) / "seen.txt").exists()  # it found its work
    kinds = [e["kind"] for e in events(env, task_id) if e["kind"] in ("gc", "restored")]
    assert kinds == ["gc", "restored"]


def test_gc_that_finds_a_claim_made_after_it_looked_keeps_the_worktree(
    make_app: Any, env: Env, project: Path
) -> None:
    from dispatch.services.dispatching import redispatch
    from dispatch.services.gc import GcOptions, collect

    task_id = finished(make_app, env, project, RESUMES)
    path = worktree_of(env, task_id)
    workers: list[threading.Thread] = []

    @contextmanager
    def claim_after_the_candidates_are_read(_total: int) -> Iterator[Callable[[], None]]:
        worker = threading.Thread(target=lambda: redispatch(make_app(), task_id))
        worker.start()
        workers.append(worker)
        wait_for(lambda: task_row(env, task_id)["status"] == "in-progress", "the claim")
        yield lambda: None

    report = collect(
        make_app(), GcOptions(0, include_failed=True), claim_after_the_candidates_are_read
    )

    workers[0].join(timeout=30)
    assert report.removed == []
    assert [k.task_id for k in report.kept] == [task_id]
    assert wait_for(lambda: settled(env, task_id), "the redispatch to end") == "done"
    assert (path / "seen.txt").exists() and events(env, task_id, "gc") == []


def test_a_snapshot_needs_neither_an_identity_nor_a_signing_key(
    make_app: Any, env: Env, project: Path, capsys: Any, git: Any, monkeypatch: Any
) -> None:
    task_id = finished(make_app, env, project, "echo x > work.txt")
    git(project, "config", "commit.gpgsign", "true")
    git(project, "config", "gpg.program", "false")  # signing would fail
    for who in ("AUTHOR", "COMMITTER"):
        for what in ("NAME", "EMAIL"):
            monkeypatch.delenv(f"GIT_{who}_{what}")
    monkeypatch.setenv("EMAIL", "")

    result = gc_json(capsys, "--older-than", "0s")

    assert [r["task_id"] for r in result["removed"]] == [task_id], result
    ref = result["removed"][0]["snapshot"]
    assert git_out(project, "show", f"{ref}:work.txt") == "x\n"


@pytest.mark.slow
def test_a_gc_killed_at_any_moment_then_run_again_loses_nothing(
    make_app: Any, env: Env, project: Path, cli: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    # A gc killed while it writes a snapshot cannot remove its temporary index: kept
    # in this test's directory, not the machine's /tmp.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    # Enough files that snapshot, rename and delete each take a while to kill into.
    many = f"{DIRTY} && mkdir bulk && for i in $(seq 2000); do echo $i > bulk/f$i; done"
    # From before the snapshot to after the delete on this machine; slower ones shift
    # the stages later, and every moment must be safe anyway.
    for delay in [0.2 + 0.04 * i for i in range(8)]:
        task_id = finished(make_app, env, project, many)
        path = worktree_of(env, task_id)
        before_files, before_status = files(path), status(path)
        # Only this task is old enough: the ones checked before stay out of the way.
        execute(env, "UPDATE tasks SET updated_at = ? WHERE id = ?", hours_ago(1), task_id)
        gc = dispatch_process(env, "gc", "--older-than", "30m")
        time.sleep(delay)
        os.killpg(gc.pid, signal.SIGKILL)
        gc.communicate()

        again = cli("gc", "--older-than", "30m", "--json")
        assert again.code == 0, again.stderr
        assert not path.exists() and not list(path.parent.glob(".gc-trash-*")), delay
        restored = cli("restore", str(task_id))
        assert restored.code == 0, restored.stderr
        assert files(path) == {k: v for k, v in before_files.items() if k != "build.log"}
        assert status(path) == before_status, delay
        execute(env, "UPDATE tasks SET updated_at = ? WHERE id = ?", hours_ago(0), task_id)


def test_read_only_directories_are_deleted_too(
    make_app: Any, env: Env, project: Path, capsys: Any
) -> None:
    # Go and some package managers leave their caches read-only. (As root the mode
    # bits do not bind; the symlink out of the worktree must be left alone either way.)
    task_id = finished(make_app, env, project, "mkdir -p cache/mod && echo x > cache/mod/f")
    path = worktree_of(env, task_id)
    (path / "cache" / "mod").chmod(0o555)
    (path / "cache").chmod(0o555)
    outside = env.root / "precious.txt"
    outside.write_text("mine\n")
    outside.chmod(0o400)
    (path / "link").symlink_to(outside)

    code, out, err = run_cli(capsys, "gc", "--older-than", "0s", "--json")

    assert code == 0 and "warning" not in err
    assert json.loads(out)["removed"][0]["task_id"] == task_id
    assert not path.exists() and not list(path.parent.glob(".gc-trash-*"))
    assert stat.S_IMODE(outside.stat().st_mode) == 0o400 and outside.read_text() == "mine\n"


@pytest.mark.parametrize(
    "trigger,when",
    [
        ("worktree add", "after"),  # the worktree made, no snapshot applied yet
        ("read-tree --reset -u", "after"),  # files applied, the index not yet put back
        ("update-index", "before"),  # all applied, the event not yet written
    ],
)
def test_a_restore_killed_at_each_step_is_finished_by_the_next(
    make_app: Any, env: Env, project: Path, tmp_path: Path, cli: Any, trigger: str, when: str
) -> None:
    task_id = finished(make_app, env, project, DIRTY)
    path = worktree_of(env, task_id)
    before_files, before_status = files(path), status(path)
    assert cli("gc", "--older-than", "0s").code == 0
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "git").write_text(SHIM.format(trigger=trigger, when=when, real=shutil.which("git")))
    (shim / "git").chmod(0o755)

    killed = cli("restore", str(task_id), extra_env={"PATH": f"{shim}:{os.environ['PATH']}"})
    assert killed.code == -9, (killed.stdout, killed.stderr)
    assert events(env, task_id, "restored") == []

    again = cli("restore", str(task_id))

    assert again.code == 0, again.stderr
    assert files(path) == {k: v for k, v in before_files.items() if k != "build.log"}
    assert status(path) == before_status
    assert len(events(env, task_id, "restored")) == 1
    # What the half-restored worktree held was saved before the snapshot went on again.
    assert ("-unrestored " in refs(project)) == (trigger != "worktree add")
