"""bench.variants: a variant is NAME=FLAGS split as a shell splits them; the ratios are medians of
each round's ratio to the first variant, not ratios of medians; CPU counts the children too."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.variants import Variant, parse_variant, process_cpu_seconds, table


def test_a_variant_is_a_name_and_its_flags() -> None:
    assert parse_variant("batch=--scheduler-policy batch --event-loop 'uvloop'") == Variant(
        "batch", ["--scheduler-policy", "batch", "--event-loop", "uvloop"])
    assert parse_variant("defaults=") == Variant("defaults", [])
    for bad in ("--scheduler-policy batch", "=--event-loop asyncio"):
        with pytest.raises(argparse.ArgumentTypeError) as error:
            parse_variant(bad)
        assert str(error.value) == (f"{bad!r}: expected NAME=FLAGS, e.g. 'normal=--scheduler-policy "
                                    "normal'")


def test_the_ratio_is_the_median_of_each_round_s_ratio() -> None:
    first = Variant("a", [], cpu_us=[100.0, 200.0, 400.0], rps=[10.0, 5.0, 2.0])
    second = Variant("b", ["--x", "1"], cpu_us=[90.0, 100.0, 400.0], rps=[11.0, 10.0, 2.0])
    header, rule, row_a, row_b = table([first, second])
    assert header.count("|") == rule.count("|") == row_b.count("|")
    assert row_a == "| a | (defaults) | 100 / 200 / 400 | 200 | 1.000 | 10 / 5 / 2 | 5 | 1.000 |"
    # rounds: 0.9, 0.5, 1.0 -> 0.9 (the ratio of the medians would be 0.5); req/s 1.1, 2, 1 -> 1.1
    assert row_b == "| b | `--x 1` | 90 / 100 / 400 | 100 | 0.900 | 11 / 10 / 2 | 10 | 1.100 |"


def test_cpu_counts_the_process_and_its_children() -> None:
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n" \
           "time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while process_cpu_seconds(parent.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_cpu_seconds(parent.pid) >= 0.6  # the child's 0.6 s (the parent alone: less)
        assert process_cpu_seconds(os.getpid()) > 0
    finally:
        for child in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split():
            os.kill(int(child), 9)
        parent.kill()
        parent.wait()
