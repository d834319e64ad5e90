"""Faults leave nothing behind: a killed or stopped rank, a killed launcher, torchrun.

Each test measures the time from the fault to a clean exit and checks that no rank
process is left (dead or a zombie waiting to be reaped both count as gone)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import _workers as W
from twobp.pipeline import WorkerError, spawn
from twobp.pipeline.launch import free_port

HERE = Path(__file__).parent
ENV = {"OMP_NUM_THREADS": "1"}
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and signals")]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_pids(pid_dir: Path, n: int, limit: float = 60.0) -> list[int]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        files = sorted(pid_dir.glob("rank*.pid"))
        if len(files) == n and all(f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    raise AssertionError(f"ranks did not start within {limit} s")


def _wait_gone(pids, limit: float) -> float:
    t0 = time.monotonic()
    while any(_alive(p) for p in pids):
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"processes {[p for p in pids if _alive(p)]} still alive {limit} s after the fault")
        time.sleep(0.05)
    return time.monotonic() - t0


def _spawn_in_background(pid_dir: Path):
    box = {}

    def run():
        try:
            box["result"] = spawn(W.train_forever, world_size=2, args=(str(pid_dir), 120.0), timeout=3,
                                  join_timeout=200, env=ENV)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e
        box["done"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_fails_the_run_fast_and_leaves_nothing(tmp_path, victim):
    t, box = _spawn_in_background(tmp_path)
    pids = _wait_pids(tmp_path, 2)
    fault = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    t.join(60)
    assert "done" in box, "the launcher did not return"
    took = box["done"] - fault
    err = box.get("error")
    assert isinstance(err, WorkerError) and err.rank == victim, repr(err)
    assert f"pipeline rank {victim} died" in str(err)
    assert took < 15, f"{took:.1f} s from the kill to the error"
    _wait_gone(pids, 5)


@pytest.mark.timeout(180)
def test_stopped_rank_times_out_and_is_killed(tmp_path):
    t, box = _spawn_in_background(tmp_path)
    pids = _wait_pids(tmp_path, 2)
    fault = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    t.join(90)
    assert "done" in box
    took = box["done"] - fault
    err = box.get("error")
    assert isinstance(err, WorkerError), repr(err)
    assert "rank 0" in str(err) and ("within 3 s" in str(err) or "failed" in str(err)), str(err)
    assert took < 30, f"{took:.1f} s from the stop to the error (peer timeout 3 s)"
    _wait_gone(pids, 5)


@pytest.mark.timeout(180)
def test_killed_launcher_takes_its_ranks_with_it(tmp_path):
    proc = subprocess.Popen([sys.executable, str(HERE / "_launcher_main.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    try:
        pids = _wait_pids(tmp_path, 2)
        proc.kill()
        proc.wait(10)
        took = _wait_gone(pids, 10)
        assert took < 5, f"ranks outlived their launcher by {took:.1f} s"
        _, err = proc.communicate(timeout=10)
        # each rank says why it ends: its launcher is gone (or, second, the peer that left first)
        assert "its launcher (pid" in err, err[-2000:]
        assert err.count("twobp pipeline rank") >= 2, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(240)
def test_torchrun_stops_every_rank_when_one_dies(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(HERE / "_torchrun_forever.py"), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        pids = _wait_pids(tmp_path, 2, limit=120)
        fault = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(60)
        took = time.monotonic() - fault
        assert rc != 0
        assert took < 45, f"torchrun took {took:.1f} s to stop after a rank died"
        _wait_gone(pids, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
