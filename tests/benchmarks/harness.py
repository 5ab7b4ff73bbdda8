"""What every part of the benchmark shares: the isolated world it runs in, how a
command is timed, the figures and their table, and the exit status.

Each figure's module (startup, listing, run, sweep, claim, serve, scale) builds its
worlds from a `Lab`, times commands with `measure` and returns `Figure`s; `cli` runs
the parts in order and `report` turns their figures into the exit status.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FULL = {
    "startup": 20,
    "list": 10,
    "run_big": 7,
    "run_small": 15,
    "sweep": 10,
    "claim": 3,
    "serve": 20,
    "scale": 5,
}
QUICK = {
    "startup": 5,
    "list": 3,
    "run_big": 3,
    "run_small": 5,
    "sweep": 3,
    "claim": 1,
    "serve": 7,
    "scale": 2,
}
# Seconds one claim run may last (each side): the rate is measured, not the time to drain.
CLAIM_CAP = {"full": 40.0, "quick": 20.0}

HOST = "bench-host"
SESSION = "dispatch"


@dataclass(frozen=True)
class Mode:
    """Full or quick: how many repetitions each part makes."""

    name: str
    reps: Mapping[str, int]
    claim_cap: float

    @classmethod
    def of(cls, quick: bool) -> Mode:
        name = "quick" if quick else "full"
        return cls(name, QUICK if quick else FULL, CLAIM_CAP[name])


class BenchError(Exception):
    """A measurement could not be made (a command failed, a check did not hold)."""


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    cpu: float  # user + system seconds of the process and the children it waited for
    code: int
    max_rss_kb: int  # the process or any child it waited for (what /usr/bin/time reports)
    own_rss_kb: int | None  # the process alone (its VmHWM, sampled while it ran)
    stdout: str  # empty when it went to a file
    stderr: str


def vm_hwm_kb(pid: int | None) -> int | None:
    """A live process's peak resident set (VmHWM), from /proc."""
    if not pid:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def measure(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path | None = None,
    *,
    own_rss: bool = False,
    out: Path | None = None,
) -> Sample:
    """Run argv once: wall time, CPU time, exit code and peak RSS, from the kernel.

    With `out`, stdout goes to that file instead of memory (a million events are 200 MB).
    """
    with (
        out.open("wb") if out is not None else tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as err,
    ):
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=err, env=dict(env),
            cwd=cwd,
        )  # fmt: skip
        peak: list[int] = []
        done = threading.Event()

        def sample() -> None:
            # VmHWM only grows, so the last reading before exit is (nearly) the peak.
            while not done.wait(0.005):
                value = vm_hwm_kb(proc.pid)
                if value is not None:
                    peak.append(value)

        sampler = threading.Thread(target=sample, daemon=True) if own_rss else None
        if sampler is not None:
            sampler.start()
        # wait4 rather than proc.wait(): it also returns the child's rusage, whose
        # ru_maxrss (KB on Linux) covers the process and the children it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        if sampler is not None:
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        printed = ""
        if out is None:
            stdout.seek(0)
            printed = stdout.read().decode(errors="replace")
        return Sample(
            seconds,
            usage.ru_utime + usage.ru_stime,
            proc.returncode,
            usage.ru_maxrss,
            max(peak) if peak else None,
            printed,
            err.read().decode(errors="replace"),
        )


def checked(sample: Sample, what: str) -> Sample:
    if sample.code != 0:
        raise BenchError(f"{what} exited {sample.code}: {sample.stderr.strip()[-500:]}")
    return sample


def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> str:
    """Run a setup command (not timed); its stdout, or BenchError."""
    done = subprocess.run(
        list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} … exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def cpu_note(samples: Sequence[Sample]) -> str:
    """CPU time says how much of the wall time was work, not waiting or a busy machine."""
    return f"cpu (user+sys) median {ms(median_ms([x.cpu for x in samples]))}"


# -- results -------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: str
    baseline_name: str
    baseline: str
    ratio: str
    target: str
    ok: bool
    notes: list[str] = field(default_factory=list)


def _verdict(f: Figure) -> str:
    return "ok" if f.ok else "MISSED"


def ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def print_table(figures: Sequence[Figure]) -> None:
    headers = ("figure", "dispatch", "compared with", "baseline", "ratio", "target", "")
    rows = [
        (f.name, f.value, f.baseline_name, f.baseline, f.ratio, f.target, _verdict(f))
        for f in figures
    ]
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for row in (headers, *rows):
        cells = [
            str(c).rjust(w) if i in (1, 3, 4) else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if row is headers:
            print(line)
    print(line)
    for f in figures:
        for note in f.notes:
            print(f"  {f.name}: {note}")


def markdown_table(figures: Sequence[Figure]) -> str:
    lines = [
        "| figure | dispatch | compared with | baseline | ratio | target | result |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for f in figures:
        result = "ok" if f.ok else "**missed**"
        lines.append(
            f"| {f.name} | {f.value} | {f.baseline_name} | {f.baseline} | {f.ratio} | "
            f"{f.target} | {result} |"
        )
    return "\n".join(lines)


def report(
    figures: Sequence[Figure], failures: Sequence[str], markdown: bool, started: float
) -> int:
    """Print the table and the verdict; the exit status: 0 when every target is met, 1
    when one is missed or a measurement failed."""
    print()
    print_table(figures)
    if markdown:
        print()
        print(markdown_table(figures))
    missed = [f.name for f in figures if not f.ok]
    print()
    print(f"total {time.perf_counter() - started:.0f} s; load average at the end {load()}")
    if os.getloadavg()[0] > 0.5 * len(os.sched_getaffinity(0)):
        print("note: other work was running on this machine; wall times are inflated")
    for failure in failures:
        print(f"FAILED {failure}")
    if missed:
        print("MISSED " + "; ".join(missed))
    if missed or failures:
        return 1
    print("every target met")
    return 0


@contextlib.contextmanager
def section(name: str, figures: list[Figure], failures: list[str]) -> Iterator[None]:
    """One part: its name, then its figures or why it failed, then how long it took."""
    print(f"… {name}", flush=True)
    start = time.perf_counter()
    try:
        yield
    except BenchError as exc:
        failures.append(f"{name}: {exc}")
        print(f"  failed: {exc}", flush=True)
    else:
        for f in figures:
            print(f"  {f.name}: {f.value} vs {f.baseline} ({'ok' if f.ok else 'MISSED'})")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


# -- the isolated world --------------------------------------------------------------------


def dispatch_argv() -> list[str]:
    """The console script users run, found next to this interpreter; else `python -m`."""
    script = Path(sys.executable).parent / "dispatch"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "dispatch"]


def base_env(root: Path) -> dict[str, str]:
    """The caller's environment without anything that would reach the user's dispatch or tmux.

    PYTHONDONTWRITEBYTECODE goes too: an installed dispatch has its bytecode cached (pip
    compiles a wheel's modules as it installs them), and the warm-up runs write it.
    """
    dropped = ("DISPATCH_", "TMUX", "GIT_", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    home = root / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        GIT_CONFIG_GLOBAL=str(home / ".gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CEILING_DIRECTORIES=str(root),
        GIT_AUTHOR_NAME="Dispatch Bench",
        GIT_AUTHOR_EMAIL="bench@dispatch.invalid",
        GIT_COMMITTER_NAME="Dispatch Bench",
        GIT_COMMITTER_EMAIL="bench@dispatch.invalid",
        DISPATCH_HOST=HOST,
    )
    return env


@dataclass
class World:
    """One dispatch installation: its home, config, database and tmux server."""

    name: str
    root: Path
    env: dict[str, str]
    socket: str

    @property
    def home(self) -> Path:
        return Path(self.env["DISPATCH_HOME"])

    @property
    def db_path(self) -> Path:
        return self.home / "dispatch.db"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db_path}"

    def tmux(self, *args: str) -> str:
        return run(["tmux", "-L", self.socket, *args], self.env)

    def dispatch(self, *args: str, cwd: Path | None = None, own_rss: bool = False) -> Sample:
        return measure([*dispatch_argv(), *args], self.env, cwd or self.root, own_rss=own_rss)


class Lab:
    """The temporary directory every world lives in; tears down their tmux servers."""

    def __init__(self, parent: str | None, keep: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir=parent)).resolve()
        self.keep = keep
        self.env = base_env(self.root)
        self.sockets: list[str] = []
        self.tag = uuid.uuid4().hex[:8]

    def world(self, name: str) -> World:
        root = self.root / name
        root.mkdir()
        config = root / "config.toml"
        # Default timings (what users get); only the tmux session is spelled out.
        config.write_text(f'[tmux]\nsession = "{SESSION}"\n', encoding="utf-8")
        socket = f"dispatch-bench-{self.tag}-{name}"
        self.sockets.append(socket)
        env = dict(self.env)
        env.update(
            DISPATCH_HOME=str(root / "home"),
            DISPATCH_CONFIG=str(config),
            DISPATCH_TMUX_SOCKET=socket,
        )
        return World(name, root, env, socket)

    def close(self) -> None:
        for socket in self.sockets:
            subprocess.run(
                ["tmux", "-L", socket, "kill-server"],
                env=self.env,
                capture_output=True,
                check=False,
            )
            # TMUX_TMPDIR is not passed on, so every server's socket is in /tmp/tmux-UID.
            Path(f"/tmp/tmux-{os.getuid()}", socket).unlink(missing_ok=True)
        if self.keep:
            print(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def make_repo(path: Path, env: Mapping[str, str], files: int) -> Path:
    """A repository on branch main with one commit of `files` small files."""
    run(["git", "init", "-q", "-b", "main", str(path)], env)
    run(["git", "-C", str(path), "config", "commit.gpgsign", "false"], env)
    if files == 1:
        (path / "README.md").write_text("hello\n", encoding="utf-8")
    else:
        per_dir = 100
        for i in range(files):
            folder = path / f"pkg{i // per_dir:03d}"
            if i % per_dir == 0:
                folder.mkdir()
            (folder / f"mod{i % per_dir:03d}.py").write_text(
                f'"""Module {i}."""\n\nVALUE = {i}\n', encoding="utf-8"
            )
    run(["git", "-C", str(path), "add", "-A"], env)
    run(["git", "-C", str(path), "commit", "-q", "-m", "initial"], env)
    return path


def migrate(world: World) -> None:
    """One real CLI call creates and migrates the database."""
    checked(world.dispatch("list", "--json"), "dispatch list (migration)")


# -- the machine ---------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "missing"


def _filesystem(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(lab: Lab) -> dict[str, str]:
    import sqlalchemy

    memory = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": _version(["git", "--version"]).removeprefix("git version "),
        "tmux": _version(["tmux", "-V"]).removeprefix("tmux "),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "temp dir": f"{lab.root.parent} ({_filesystem(lab.root)})",
        "load average": load(),
        "dispatch": " ".join(dispatch_argv()),
    }
