"""The built wheel carries the migrations and migrates a new database from them (SPEC §7)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.store.revisions import HEAD_REVISION
from tests.conftest import Env

SOURCE = Path(__file__).resolve().parents[2]


def _run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,  # type: ignore[call-overload]
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


@pytest.mark.slow
def test_the_installed_wheel_migrates_a_new_database(env: Env, repo: Path) -> None:
    wheels = env.root / "wheels"
    # No build isolation and no dependencies: everything needed is installed here already.
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", wheels, SOURCE)  # fmt: skip
    [wheel] = wheels.glob("dispatch_agents-*.whl")

    # A fresh environment that sees this one's dependencies but not its editable dispatch.
    venv = env.root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    deps = Path(purelib.stdout.strip()) / "dependencies.pth"
    deps.write_text("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--quiet", wheel)  # fmt: skip

    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Run from the repository under test, far from the source tree and its migrations/.
    where = _run(
        python, "-c",
        "import dispatch, dispatch.store.database as d; print(dispatch.__file__);"
        "print(d.migrations_dir())",
        cwd=repo, env=environ,
    )  # fmt: skip
    package_file, migrations = where.stdout.split()
    assert Path(package_file).is_relative_to(venv)
    assert Path(migrations).is_relative_to(venv)
    assert (Path(migrations) / "env.py").is_file()
    assert any((Path(migrations) / "versions").glob(f"{HEAD_REVISION}_*.py"))

    dispatch = venv / "bin" / "dispatch"
    added = _run(dispatch, "add", "from the wheel", "--json", cwd=repo, env=environ)
    assert json.loads(added.stdout)["title"] == "from the wheel"
    listed = _run(dispatch, "list", "--json", cwd=repo, env=environ)
    assert [t["title"] for t in json.loads(listed.stdout)] == ["from the wheel"]
    current = _run(dispatch, "db", "current", cwd=repo, env=environ)
    assert current.stdout == f"{HEAD_REVISION} (head)\n"
    assert env.db_path.is_file()

    # The monitor's page ships in the wheel, as plain files beside its code.
    page = _run(
        python, "-c",
        "from importlib import resources; s = resources.files('dispatch.web') / 'static';"
        "print(s); print(*sorted(p.name for p in (s / 'js').iterdir()))",
        cwd=repo, env=environ,
    )  # fmt: skip
    static, scripts = page.stdout.splitlines()
    assert Path(static).is_relative_to(venv)
    assert (Path(static) / "index.html").is_file() and (Path(static) / "task.html").is_file()
    assert {"api.js", "stream.js", "table.js", "toast.js"} <= set(scripts.split())
