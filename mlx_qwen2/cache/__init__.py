"""KV caches: objects the caller owns and passes to the model, one per decoder layer.

Every kind has the protocol the model takes:

- `offset`: positions seen so far (the RoPE offset of the next token); an (B,) array for a batch
  whose rows started at different positions;
- `update_and_fetch(keys, values)`: append (B, n_kv_heads, L, head_dim) keys/values and return what
  attention reads (arrays, or (packed, scales, biases) triples for a quantized cache);
- `make_mask(L)`: the attention mask for L new queries over the keys after the update
  (None, "causal", or a boolean array);
- `state` (arrays to evaluate or save), `nbytes`, `trim(n)`.

Kinds: `kv` (growing buffers), `rotating` (a fixed budget keeping the first tokens and the most
recent), `quantized` (4 or 8 bits), `batch` (rows of different lengths for the engine), `prefix`
(an LRU of caches keyed by token prefix), `files` (prompt caches saved to safetensors).
"""

from .kv import KVCache, make_cache

__all__ = ["KVCache", "make_cache"]
