"""`emunet.core.files.file_lock`, the one inter-process lock (MLflow store creation, champion moves, the
training backup): real processes contend for it, a killed holder releases it, and a non-blocking try
fails at once while another process holds it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emunet.core.files import file_lock
from tests.conftest import ROOT

# One contender: takes the lock (or not, with "none") `rounds` times and, while holding it, writes a start
# mark, sleeps, then writes an end mark. A second writer inside the sleep would split a start from its end.
CONTENDER = """
import contextlib, sys, time
from emunet.core.files import file_lock
lock, marks, name, rounds, use_lock = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "lock"
for i in range(rounds):
    with file_lock(lock) if use_lock else contextlib.nullcontext():
        with open(marks, "a") as f:
            f.write(f"start {name} {i}\\n"); f.flush()
        time.sleep(0.05)
        with open(marks, "a") as f:
            f.write(f"end {name} {i}\\n"); f.flush()
"""
# Takes the lock, says so on stdout, and holds it until killed.
HOLDER = """
import sys, time
from emunet.core.files import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def contend(tmp_path: Path, use_lock: bool, rounds: int = 8) -> list[str]:
    lock, marks = tmp_path / "sub" / "the.lock", tmp_path / "marks.txt"
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(lock), str(marks), name, str(rounds),
                               "lock" if use_lock else "none"], cwd=ROOT) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    return marks.read_text().splitlines()


def interleaved(lines: list[str]) -> bool:
    """True when a start mark is not directly followed by its own end mark."""
    pairs = zip(lines[0::2], lines[1::2])
    return len(lines) % 2 == 1 or any(s.split()[0] != "start" or e != "end" + s[len("start"):] for s, e in pairs)


def hold(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_processes_never_hold_it_at_once(tmp_path):
    lines = contend(tmp_path, use_lock=True)
    assert len(lines) == 2 * 2 * 8
    assert not interleaved(lines), lines
    assert (tmp_path / "sub" / "the.lock").is_file()  # made with its folder, left in place


def test_without_the_lock_the_marks_interleave(tmp_path):
    """The check above can fail: the same contenders without the lock do overlap."""
    assert interleaved(contend(tmp_path, use_lock=False))


def test_a_killed_holder_releases_it_and_a_held_lock_is_refused_without_blocking(tmp_path):
    lock = tmp_path / "the.lock"
    holder = hold(lock)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            with file_lock(lock, blocking=False):
                pass
        assert time.monotonic() - start < 5
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    with file_lock(lock, blocking=False):  # the kill released it
        pass
    with file_lock(lock):  # and the lock can be taken again after a release
        pass


def test_it_blocks_until_the_holder_lets_go(tmp_path):
    lock = tmp_path / "the.lock"
    holder = hold(lock)
    start = time.monotonic()
    killer = subprocess.Popen(["sh", "-c", f"sleep 1.5; kill -9 {holder.pid}"], stderr=subprocess.DEVNULL)
    try:
        with file_lock(lock):
            waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait(timeout=30)
        killer.wait(timeout=30)
    assert waited >= 1.0
