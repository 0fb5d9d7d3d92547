"""Expert parallelism on torch.distributed: experts sharded over ranks, tokens moved by
all-to-all, and the launcher that runs such cases without letting a rank hang a sweep.

- `group.py`: torchrun's environment, backends and devices, the group a layer is built on.
- `dispatcher.py`: permute, counts exchange, dispatch, combine, unpermute; bytes moved.
- `layer.py`: `ExpertParallelMoE` (dropless, capacity-limited, chunked and overlapped);
  its local experts are `moebench.impls.grouped`'s code.
- `phases.py`: the per-phase timer of the breakdown.
- `measure.py`: one case on one rank: identical weights, check against the reference,
  timing decided by the slowest rank, breakdown, traffic -> the row.
- `worker.py`: a rank's process. `launcher.py`: starting ranks (`moebench run --nproc N`)
  or joining torchrun's, timeouts, killing.

The implementations themselves are registered in `moebench.impls.expert_parallel`
(`ep-dropless`, `ep-capacity`, `ep-overlap`). The CLI and runner call only
`make_launcher`, `is_follower`, `follow` and `nproc_problem`.
"""

from moebench.distributed.launcher import follow, is_follower, make_launcher, nproc_problem

__all__ = ["follow", "is_follower", "make_launcher", "nproc_problem"]
