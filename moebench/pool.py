"""Run single-device cases concurrently, one worker process pinned to each GPU.

`--devices cuda:0,cuda:1,...` (or `all`): each GPU gets a thread that owns one worker
(`IsolatedExecutor` pinned through CUDA_VISIBLE_DEVICES, so the case's `cuda` is that GPU
and nothing else is visible to it) and pulls work from one shared queue. The queue holds
runs of consecutive cases that share a weight set (same widths, experts, dtype, seed,
routing), so each worker's weight cache stays warm and no two GPUs draw the same weights
for the same few cases. A case is measured exactly as in a sequential run; the timings
differ only by what the GPUs themselves differ in. Rows are written (by the caller's
`emit`, under one lock) as they finish, so an interrupted run keeps every finished case.

Expert-parallel cases are not given to the pool: the caller runs them after it, on as many
GPUs as their world size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from moebench.case import Case
from moebench.weights import weights_key

JOIN_POLL_S = 0.2


def weight_groups(cases: list[Case]) -> list[list[Case]]:
    """Consecutive cases with the same weight set, in suite order."""
    groups: list[list[Case]] = []
    last_key: tuple | None = None
    for case in cases:
        key = (*weights_key(case), case.workload.layers)
        if groups and key == last_key:
            groups[-1].append(case)
        else:
            groups.append([case])
        last_key = key
    return groups


def run_on_gpus(
    cases: list[Case],
    gpus: list[int],
    make_executor: Callable[[int], Any],
    run_one: Callable[[Case, Any, int], dict[str, Any]],
    emit: Callable[[Case, dict[str, Any]], None],
) -> bool:
    """Measure `cases` on `gpus` concurrently; returns True if interrupted (Ctrl-C).

    make_executor(gpu): a worker for that GPU (closed here when its thread ends).
    run_one(case, executor, gpu) -> row: measures one case (called in the GPU's thread).
    emit(case, row): records a finished row (called under one lock, in finishing order).
    """
    work: queue.Queue[list[Case]] = queue.Queue()
    for group in weight_groups(cases):
        work.put(group)
    stop = threading.Event()
    lock = threading.Lock()
    executors: dict[int, Any] = {}
    errors: list[BaseException] = []

    def serve(gpu: int) -> None:
        try:
            executor = make_executor(gpu)
            executors[gpu] = executor
            while not stop.is_set():
                try:
                    group = work.get_nowait()
                except queue.Empty:
                    return
                for case in group:
                    if stop.is_set():
                        return
                    row = run_one(case, executor, gpu)
                    if stop.is_set():  # the worker was killed under it: not a result
                        return
                    with lock:
                        emit(case, row)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            stop.set()
        finally:
            executor = executors.get(gpu)
            if executor is not None:
                executor.close()

    threads = [
        threading.Thread(target=serve, args=(gpu,), name=f"moebench-gpu{gpu}", daemon=True)
        for gpu in gpus
    ]
    for thread in threads:
        thread.start()
    interrupted = False
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(JOIN_POLL_S)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        for executor in list(executors.values()):
            executor.close()  # stops its worker; the thread then sees `stop` and leaves
        for thread in threads:
            thread.join(10)
    if errors and not interrupted:
        raise errors[0]
    return interrupted
