"""The monitor's page in a real browser (Debian's chromium through Playwright) against a
real `dispatch serve`, with changes made from the CLI while the page is open."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, Result, windows
from tests.faults import agent_profile, attempts, wait_for, wait_status, write_config
from tests.integration.monitor import Server, serving

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (the test extra has it)"
)
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it with apt-get)"
)
expect = playwright_api.expect
expect.set_options(timeout=15_000)

Cli = Callable[..., Result]
Serve = Callable[..., Server]
Page = Any


@pytest.fixture
def serve(env: Env) -> Iterator[Serve]:
    yield from serving(env)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == []  # no script error on any page


def _add(cli: Cli, repo: Path, title: str, prompt: str) -> int:
    done = cli("add", title, "--agent", "shell", "--prompt", prompt, cwd=repo)
    assert done.code == 0, done.stderr
    return int(done.stdout)


# Fails on its first attempt, runs on the next: the recovery the Re-dispatch button is for.
FAILS_ONCE = "[ -e .tried ] && { echo second try; sleep 60; }; touch .tried; echo first try; exit 3"


def _failed_once(cli: Cli, repo: Path, env: Env, title: str = "flaky") -> int:
    task_id = _add(cli, repo, title, FAILS_ONCE)
    assert cli("run", str(task_id)).code == 0
    assert wait_status(env, task_id) == "failed"
    return task_id


def _row(page: Page, task_id: int) -> Any:
    return page.locator(f"#tasks tbody tr[data-task-id='{task_id}']")


def _open(page: Page, server: Server, path: str = "/") -> None:
    page.goto(f"http://127.0.0.1:{server.port}{path}#token={server.token}")


def test_redispatch_a_failed_row(page: Page, serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    task_id = _failed_once(cli, repo, env)
    server = serve()
    _open(page, server)
    row = _row(page, task_id)
    expect(row).to_contain_text("flaky")
    expect(row.locator(".status")).to_have_text("failed")
    expect(row.locator(".attempt")).to_have_text("1")
    assert "#token" not in page.url  # out of the address bar once read

    with page.expect_request(lambda r: r.method == "POST" and "/redispatch" in r.url) as sent:
        row.get_by_role("button", name="Re-dispatch").click()

    assert sent.value.url.endswith(f"/api/tasks/{task_id}/redispatch?expected_attempt=1")
    toast = page.get_by_role("status")
    expect(toast).to_contain_text(f"Task {task_id}: attempt 2 started.")
    expect(toast.get_by_role("link", name=f"Open task {task_id}")).to_have_attribute(
        "href", f"/tasks/{task_id}"
    )
    expect(row.locator(".attempt")).to_have_text("2")
    expect(row.locator(".status")).to_have_text("in-progress")
    assert [a["number"] for a in attempts(env, task_id)] == [1, 2]


def test_an_in_progress_row_offers_cancel_and_a_disabled_redispatch(
    page: Page, serve: Serve, cli: Cli, repo: Path
) -> None:
    task_id = _add(cli, repo, "busy", "sleep 60")
    assert cli("run", str(task_id)).code == 0
    _open(page, serve())
    row = _row(page, task_id)
    button = row.get_by_role("button", name="Re-dispatch")
    expect(button).to_be_disabled()
    expect(button).to_have_attribute("title", "task is running")
    expect(row.get_by_role("button", name="Cancel")).to_be_enabled()


def test_a_stale_page_is_refused_and_rolls_back(
    page: Page, serve: Serve, cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _failed_once(cli, repo, env)
    server = serve()
    page.route("**/api/events*", lambda route: route.abort())  # the page hears nothing
    _open(page, server)
    row = _row(page, task_id)
    expect(row.locator(".status")).to_have_text("failed")
    assert cli("redispatch", str(task_id)).code == 0  # meanwhile, from a terminal

    with page.expect_response(lambda r: "/redispatch" in r.url) as answered:
        row.get_by_role("button", name="Re-dispatch").click()

    assert answered.value.status == 409
    toast = page.get_by_role("status")
    expect(toast).to_contain_text(f"task {task_id} has moved on")
    expect(row.locator(".status")).to_have_text("failed")  # what it showed before the click
    expect(row.locator(".attempt")).to_have_text("1")
    assert len(attempts(env, task_id)) == 2  # no third attempt nobody asked for


def test_rows_follow_changes_made_from_the_cli(
    page: Page, serve: Serve, cli: Cli, repo: Path
) -> None:
    _add(cli, repo, "already here", "true")
    _open(page, serve())
    expect(_row(page, 1)).to_contain_text("already here")
    expect(page.locator("#live")).to_have_text("live")

    task_id = _add(cli, repo, "added from a terminal", "sleep 60")
    row = _row(page, task_id)
    expect(row).to_contain_text("added from a terminal")
    expect(row.locator(".status")).to_have_text("ready")

    assert cli("run", str(task_id)).code == 0
    expect(row.locator(".status")).to_have_text("in-progress")
    expect(row.locator(".attempt")).to_have_text("1")

    assert cli("cancel", str(task_id)).code == 0
    expect(row.locator(".status")).to_have_text("cancelled")
    expect(row.get_by_role("button", name="Re-dispatch")).to_be_enabled()

    assert cli("close", str(task_id)).code == 0
    expect(row).to_have_count(0)  # archived: off the table, as off `dispatch list`
    expect(_row(page, 1)).to_contain_text("already here")


def test_a_wrong_or_missing_token_says_what_to_do(page: Page, serve: Serve) -> None:
    server = serve()
    page.goto(f"http://127.0.0.1:{server.port}/#token=not-the-token")
    expect(page.locator("#message")).to_contain_text("The token was refused")
    expect(page.locator("#live")).to_have_text("token refused")
    other = page.context.new_page()  # a new tab: no token kept for it
    other.goto(f"http://127.0.0.1:{server.port}/")
    expect(other.locator("#message")).to_contain_text("No access token")


def test_filters(page: Page, serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    failed = _failed_once(cli, repo, env, "broken build")
    ready = _add(cli, repo, "write docs", "true")
    _open(page, serve())
    expect(_row(page, ready)).to_be_visible()

    page.locator("#chips").get_by_role("button", name="failed").click()
    expect(_row(page, failed)).to_be_visible()
    expect(_row(page, ready)).to_be_hidden()
    page.locator("#chips").get_by_role("button", name="all").click()
    page.get_by_label("Filter by text").fill("docs")
    expect(_row(page, ready)).to_be_visible()
    expect(_row(page, failed)).to_be_hidden()


def test_the_task_page(page: Page, serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    script = "echo first line; echo made > made.txt; sleep 1; echo second line; sleep 60"
    task_id = _add(cli, repo, "watch me", script)
    assert cli("run", str(task_id)).code == 0
    _open(page, serve(), f"/tasks/{task_id}")

    expect(page.get_by_role("heading", name=f"Task {task_id}: watch me")).to_be_visible()
    bar = page.get_by_role("toolbar", name="Task actions")
    expect(bar.get_by_role("button", name="Re-dispatch")).to_be_disabled()
    expect(bar.get_by_role("button", name="Cancel")).to_be_enabled()
    expect(page.locator("#attempts tbody tr")).to_have_count(1)
    expect(page.locator("#events")).to_contain_text("claimed")
    expect(page.locator("#log")).to_contain_text("first line")
    expect(page.locator("#log")).to_contain_text("second line")  # it follows the attempt
    page.reload()  # the diff is read once the page opens; made.txt is there by now
    summary = page.locator("#diff summary", has_text="made.txt")
    expect(summary).to_contain_text("+1")
    summary.click()
    expect(page.locator("#diff pre")).to_contain_text("+made")

    bar.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")  # usable by keyboard
    expect(page.locator("#facts .chip")).to_have_text("cancelled")
    expect(page.locator("#events")).to_contain_text("cancelled")
    expect(bar.get_by_role("button", name="Re-dispatch")).to_be_enabled()
    expect(bar.get_by_role("button", name="Reset")).to_be_enabled()


# Read before the suite's fixtures clear every DISPATCH_* variable.
SCREENSHOT = os.environ.get("DISPATCH_SCREENSHOT")


@pytest.mark.skipif(not SCREENSHOT, reason="DISPATCH_SCREENSHOT=PATH makes docs/monitor.png")
def test_screenshot(browser: Any, serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    """Not a check: the picture in docs/monitor.md, with tasks in each status."""
    write_config(env, agent_profile("reviewer", ["sh", "-c", "exit 0"], completion="signal"))
    script = (
        "printf 'Retries: 3\\n' >> README.md; printf 'def test_login():\\n    assert login()\\n'"
        " > test_login.py; echo 'running the login tests'; echo '1 failed, 12 passed'; exit 3"
    )
    assert cli("run", str(_add(cli, repo, "Fix flaky login test", script))).code == 0
    wait_status(env, 1)
    _add(cli, repo, "Port the CLI to the new config loader", "exit 0")
    assert cli("run", "2").code == 0
    for title in ("Add retries to the uploader", "Profile the nightly import"):
        assert cli("run", str(_add(cli, repo, title, "sleep 300"))).code == 0
    unfinished = cli("add", "Review the API docs", "--agent", "reviewer", cwd=repo)
    assert cli("run", unfinished.stdout.strip()).code == 0
    _add(cli, repo, "Write the release notes", "true")
    _add(cli, repo, "Split the settings page", "true")
    cancelled = _add(cli, repo, "Try a new diff renderer", "sleep 300")
    assert cli("run", str(cancelled)).code == 0
    assert cli("cancel", str(cancelled)).code == 0
    interrupted = _add(cli, repo, "Migrate CI to the new runners", "sleep 300")
    assert cli("run", str(interrupted)).code == 0
    os.kill(attempts(env, interrupted)[-1]["wrapper_pid"], 9)
    wait_for(lambda: f"t{interrupted}" not in windows(env), "the window to close")
    assert cli("sweep").code == 0
    assert wait_status(env, interrupted) == "interrupted"
    server = serve()
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport={"width": 1280, "height": 520}, color_scheme=scheme)
        shot = context.new_page()
        _open(shot, server)
        expect(shot.locator("#tasks tbody tr")).to_have_count(9)
        shot.wait_for_timeout(500)
        target = Path(str(SCREENSHOT))
        if scheme == "dark":
            target = target.with_name(target.stem + "-dark" + target.suffix)
        shot.screenshot(path=str(target))
        if scheme == "light":
            _open(shot, server, "/tasks/1")
            expect(shot.locator("#log")).to_contain_text("1 failed")
            shot.locator("#diff summary").first.click()
            shot.wait_for_timeout(500)
            task_shot = target.with_name(target.stem + "-task" + target.suffix)
            shot.screenshot(path=str(task_shot), full_page=True)
        context.close()


def test_a_page_on_another_origin_can_neither_read_nor_act(
    page: Page, serve: Serve, cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _failed_once(cli, repo, env)
    server = serve()
    # A foreign site the user happens to have open, which somehow learnt the token.
    page.route(
        "http://evil.test/",
        lambda route: route.fulfill(status=200, content_type="text/html", body="<p>hi</p>"),
    )
    page.goto("http://evil.test/")
    api = f"http://127.0.0.1:{server.port}/api"
    outcome = page.evaluate(
        """async ([api, token, id]) => {
          const tried = async (url, init) => {
            try { const r = await fetch(url, init); return `answered ${r.status}`; }
            catch (err) { return "refused"; }
          };
          const auth = { Authorization: `Bearer ${token}` };
          const action = `${api}/tasks/${id}/redispatch`;
          return {
            read: await tried(`${api}/tasks`, { headers: auth }),
            act: await tried(action, { method: "POST", headers: auth }),
            blind: await tried(action, { method: "POST", mode: "no-cors" }),
          };
        }""",
        [api, server.token, task_id],
    )
    # Without a CORS header the browser withholds the answer, and refuses to send a
    # request with the token at all; a blind "simple" request carries no token.
    assert outcome["read"] == "refused"
    assert outcome["act"] == "refused"
    assert outcome["blind"] in ("refused", "answered 0")  # opaque: nothing to read
    assert len(attempts(env, task_id)) == 1  # nothing started
