"""Start-up: the console script with `--version` and `--help`, beside `python -c pass`."""

from __future__ import annotations

import sys

from tests.benchmarks.harness import (
    Figure,
    Lab,
    Mode,
    Sample,
    checked,
    cpu_note,
    dispatch_argv,
    measure,
    median_ms,
    ms,
)


def bench(lab: Lab, mode: Mode) -> list[Figure]:
    world = lab.world("startup")
    python = [sys.executable, "-c", "pass"]
    commands = {
        "python -c pass": python,
        "dispatch --version": [*dispatch_argv(), "--version"],
        "dispatch --help": [*dispatch_argv(), "--help"],
    }
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    for argv in commands.values():  # warm the page cache and .pyc files
        checked(measure(argv, world.env, world.root), argv[-1])
    for _ in range(mode.reps["startup"]):
        for name, argv in commands.items():
            samples[name].append(checked(measure(argv, world.env, world.root), name))
    base = median_ms([x.seconds for x in samples["python -c pass"]])
    figures = []
    for name in ("dispatch --version", "dispatch --help"):
        value = median_ms([x.seconds for x in samples[name]])
        figures.append(
            Figure(
                name.removeprefix("dispatch "),
                ms(value),
                "python -c pass",
                ms(base),
                f"{value / base:.1f}x",
                "<= 100 ms",
                value <= 100,
                [cpu_note(samples[name])],
            )
        )
    return figures
