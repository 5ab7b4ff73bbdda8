"""The names gc gives snapshots, and where it allows itself to delete."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dispatch.services.gc import _inside, orphan_ref, snapshot_ref


def test_snapshot_refs_name_the_task_and_the_attempt() -> None:
    assert snapshot_ref(12, 31) == "refs/dispatch/wip/12-31"
    assert orphan_ref("task-999") == "refs/dispatch/wip/orphan-task-999"


@pytest.mark.parametrize("name", ["task-a..b c", "task-x.lock", "task-@{1}", "..", "task-~^:?*["])
def test_an_orphan_ref_is_always_a_valid_ref(name: str) -> None:
    ref = orphan_ref(name)
    assert ref.startswith("refs/dispatch/wip/orphan-")
    assert subprocess.run(["git", "check-ref-format", ref]).returncode == 0


def test_only_paths_strictly_inside_the_root_are_for_gc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "repo" / "task-1").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "repo" / "task-2").symlink_to(outside)

    assert _inside(root / "repo" / "task-1", root)
    assert not _inside(root, root)
    assert not _inside(root / "repo" / "task-2", root)  # a symlink out of the root
    assert not _inside(root / ".." / "elsewhere", root)
