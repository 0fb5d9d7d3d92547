"""CUDA-graph capture of a timed step, for cases with `cuda_graph = true`.

Launch-bound cases (a few tokens through a small layer) spend most of their time in the
host launching kernels; a graph replays the whole step with one launch. One graph is
captured per rotated input (they share one memory pool), so the timed call replays the
graph of input i exactly where the plain step would run on input i. A layer that
synchronises with the host inside its step (`.item()`, `.tolist()`) cannot be captured;
the error names the case's implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CAPTURE_WARMUP = 3


def graphed_step(
    step: Callable[[int], object], rotations: int, device: torch.device, impl: str
) -> Callable[[int], object]:
    """`step(i)` captured once per i < rotations; the returned callable replays graph
    i % rotations. Warm-up runs on a side stream first, as capture requires."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(CAPTURE_WARMUP):
            step(i % rotations)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for i in range(rotations):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                step(i)
        except RuntimeError as exc:
            raise RuntimeError(
                f"implementation {impl!r} cannot be captured in a CUDA graph "
                f"(cuda_graph = true): {exc}"
            ) from exc
        graphs.append(graph)
    torch.cuda.synchronize(device)
    return lambda i: graphs[i % rotations].replay()
