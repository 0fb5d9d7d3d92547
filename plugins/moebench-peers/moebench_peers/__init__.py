"""moebench-peers: other libraries' MoE layers run as moebench implementations.

Every adapter builds the library's own layer at the case's shape and loads every
parameter from the case's weight set (moebench draws one per shape and seed), so the
library's number is measured on the same function, weights and inputs as moebench's own
layers, and checked the same way before it is timed.

- `moebench_peers.hf`: Hugging Face transformers' MoE blocks (Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE, DeepSeek-V3), one implementation per block and experts backend,
  e.g. `hf-mixtral:grouped_mm`.
- `moebench_peers.moe_ops`: moe-ops' pure-Triton fused top-k softmax, counting-sort
  permute, grouped GEMM and unpermute (`moe-ops`, CUDA only).

A case an adapter cannot run faithfully (a missing library, a routing convention the
block does not compute, a parameter the weight set does not hold) raises `UnsupportedCaseError`
from `build`, whose message says why.
"""

from moebench_peers.refusal import UnsupportedCaseError

__all__ = ["UnsupportedCaseError"]
