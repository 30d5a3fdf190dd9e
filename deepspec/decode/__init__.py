"""The decode core shared by the evaluation engine and the embedded server.

* :class:`RowKVCache` (:mod:`.cache`): a static KV cache of ``rows x max_len`` slots in which every
  row is written at its own positions (rows advance independently: per-row acceptance, continuous
  batching), plugged into transformers through its ``Cache`` extension point.
* :class:`DecodeCore` (:mod:`.core`): prefill and fixed-size steps (``T`` new tokens for ``B`` rows)
  of a frozen causal LM over that cache; on CUDA each ``(B, T)`` step is captured once as a CUDA
  graph and replayed.
* :mod:`.sampling`: batched verification and per-row sampling on the device, with the random numbers
  drawn per row, so that a row's result does not depend on the other rows.
"""

from deepspec.decode.cache import RowKVCache
from deepspec.decode.core import DecodeCore, StepOutput

__all__ = ["DecodeCore", "RowKVCache", "StepOutput"]
