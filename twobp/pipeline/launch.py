"""Start the pipeline processes: under torchrun, or self-spawned on one machine.

* :func:`init_from_env`: under ``torchrun`` (env:// rendezvous, any number of GPUs and
  nodes). NCCL when CUDA is there (each process takes ``cuda:LOCAL_RANK``), gloo
  otherwise. A failing rank makes torchrun's agent stop the others; a peer that never
  answers trips the process-group timeout (gloo raises; NCCL's watchdog aborts).
* :func:`spawn`: ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes on this
  machine (torch.multiprocessing, ``spawn`` start method), rendezvous on a free loopback
  port, results returned to the caller in rank order. If a worker raises or dies, or the
  whole run exceeds ``join_timeout``, the parent kills the remaining workers and raises
  :class:`WorkerError` naming the rank, never hangs. If the parent itself dies (killed),
  every worker notices within a second and exits with a message on stderr.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
import traceback
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

__all__ = ["spawn", "init_from_env", "free_port", "WorkerError"]


class WorkerError(RuntimeError):
    """A spawned worker failed, died or ran out of time; ``rank`` says which."""

    def __init__(self, rank: int | None, message: str):
        self.rank = rank
        super().__init__(message)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(*, backend: str | None = None, timeout: float = 300.0) -> tuple[int, int]:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); returns ``(rank, world_size)``. Idempotent."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise RuntimeError(f"init_from_env: {missing} not set; launch with torchrun "
                               "--nproc_per_node=N ..., or use twobp.pipeline.spawn")
        backend = backend or _default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def _exit_when_orphaned(rank: int, parent: int, poll: float = 0.5) -> None:
    """A daemon thread that ends this worker (with a message) once its launcher is gone:
    killed launchers must not leave ranks training on, unseen and unreported."""
    import sys
    import threading

    def watch() -> None:
        while True:
            time.sleep(poll)
            if os.getppid() != parent:
                print(f"twobp pipeline rank {rank}: its launcher (pid {parent}) is gone; exiting",
                      file=sys.stderr, flush=True)
                os._exit(3)

    threading.Thread(target=watch, name=f"twobp-rank{rank}-parent-watch", daemon=True).start()


def _worker(rank: int, world_size: int, port: int, backend: str, pg_timeout: float,
            fn: Callable, args: tuple, conn, env: dict, parent: int) -> None:
    _exit_when_orphaned(rank, parent)
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, *args)
        conn.send(("ok", pickle.dumps(result)))
        code = 0
    except BaseException as e:  # report everything, KeyboardInterrupt included
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            conn.send(("error", text))
        except Exception:  # the launcher is gone: say it where someone may still read it
            import sys
            print(f"twobp pipeline rank {rank} failed and its launcher is gone:\n{text}", file=sys.stderr,
                  flush=True)
        code = 1
    conn.close()
    # Leave without process-group teardown, which a dead or late peer could hang.
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(fn: Callable[..., Any], *, world_size: int, args: Sequence[Any] = (),
          backend: str | None = None, timeout: float = 60.0, join_timeout: float | None = None,
          env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return the
    results in rank order.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). ``timeout``:
    the process-group timeout, i.e. how long a collective or receive waits for a silent
    peer. ``join_timeout``: wall-clock limit for the whole run (default ``2 * timeout +
    60``). ``env``: extra environment variables for the workers (e.g. OMP_NUM_THREADS).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or _default_backend()
    join_timeout = 2 * timeout + 60 if join_timeout is None else join_timeout
    ctx = tmp.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        recv_end, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, name=f"twobp-pipeline-rank{rank}",
                           args=(rank, world_size, port, backend, timeout, fn, tuple(args),
                                 send_end, dict(env or {}), os.getpid()), daemon=True)
        proc.start()
        send_end.close()
        procs.append(proc)
        conns.append(recv_end)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + join_timeout
    try:
        waiting = {**{c: ("conn", r) for r, c in enumerate(conns)},
                   **{p.sentinel: ("proc", r) for r, p in enumerate(procs)}}

        failures: dict[int, tuple[str, str]] = {}  # rank -> ("died" | "failed", text)

        def take(rank: int) -> None:
            status, payload = conns[rank].recv()
            if status == "error":
                failures[rank] = ("failed", f"pipeline rank {rank} failed:\n{payload}")
            else:
                results[rank] = pickle.loads(payload)

        grace_end = None
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if failures and grace_end is None:
                # A peer's death usually shows first as a receive error on its neighbour:
                # wait a moment so the root cause, not the symptom, is reported.
                grace_end = now + 1.0
            if grace_end is not None and now >= grace_end:
                break
            left = min(deadline, grace_end or deadline) - now
            if left <= 0:
                late = [r for r in range(world_size) if r not in results]
                raise WorkerError(late[0] if late else None,
                                  f"pipeline workers {late} did not finish within "
                                  f"{join_timeout:g} s; killed them all")
            for obj in mp_wait(list(waiting), timeout=left):
                what, rank = waiting.pop(obj)
                if rank in results or rank in failures:
                    continue
                if what == "conn" or conns[rank].poll(1.0):
                    try:
                        take(rank)
                    except EOFError:
                        pass  # closed without a message: its sentinel reports the death
                if what == "proc" and rank not in results and rank not in failures:
                    procs[rank].join(1)
                    failures[rank] = ("died", f"pipeline rank {rank} died (exit code "
                                              f"{procs[rank].exitcode}) before returning a result")
        if failures:
            # A death is the root cause; otherwise the first error to arrive usually is.
            died = [r for r, (kind, _) in failures.items() if kind == "died"]
            first = died[0] if died else next(iter(failures))
            others = [text for r, (_, text) in sorted(failures.items()) if r != first]
            raise WorkerError(first, failures[first][1] + "".join(
                f"\n\nalso (likely a consequence): {t}" for t in others))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5)
        for c in conns:
            c.close()
    return [results[r] for r in range(world_size)]
