"""Branch slugs, worktree paths and window names: safe whatever the title says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.services.naming import (
    branch_name,
    slugify,
    window_name,
    worktree_path,
    wrapper_argv,
    wrapper_marker,
)

SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


@pytest.mark.parametrize(
    ("title", "slug"),
    [
        ("Fix the parser", "fix-the-parser"),
        ("$(touch x); ../../etc", "touch-x-etc"),
        ("Élan vital: naïve café", "elan-vital-naive-cafe"),
        ("日本語", "task"),
        ("---", "task"),
        ("", "task"),
        ("a" * 39 + " b", "a" * 39),  # cut at 40, then no trailing '-'
        ("UPPER_case__and  spaces", "upper-case-and-spaces"),
    ],
)
def test_slugify(title: str, slug: str) -> None:
    assert slugify(title) == slug


@given(st.text())
def test_a_slug_is_always_short_lowercase_ascii(title: str) -> None:
    slug = slugify(title)
    assert 1 <= len(slug) <= 40
    assert SLUG.fullmatch(slug), slug


def test_names_of_a_task() -> None:
    assert branch_name(12, "Add --json to list") == "dispatch/12-add-json-to-list"
    assert window_name(12) == "t12"
    root = Path("/data/worktrees")
    assert worktree_path(root, "/src/my repo", 12) == root / "my repo" / "task-12"


def test_the_wrapper_argv_ends_with_the_marker() -> None:
    """The undo finds a window by this suffix, so it must end the argv, id last."""
    argv = wrapper_argv(7)
    assert " ".join(argv).endswith(" " + wrapper_marker(7))
    assert argv[0].startswith("/")  # an absolute interpreter: tmux has its own PATH
