"""Chained block hashes for the prefix cache.

``hash(block_i) = H(hash(block_{i-1}), token_ids of block_i, extra_keys)``, so a block's hash
identifies its whole prefix, as in vLLM's automatic prefix caching. ``H`` is BLAKE2b with a 64-bit
digest over a msgpack encoding of the triple. ``extra_keys`` holds the request's ``cache_salt``
(and, later, an adapter id), so requests with different salts never share a block.

Collisions: with 64 bits, two distinct prefixes collide with probability about 2^-64 per pair.
The prefix cache stores each cached block's token ids and parent hash and compares them on every
hit, so a collision is detected and treated as a miss; it can never serve wrong K/V.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack

ROOT_HASH = 0  # parent hash of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """64-bit hash of one full block given its parent's hash.

    Args:
        parent_hash: the previous block's hash, :data:`ROOT_HASH` for the first block.
        token_ids: exactly ``block_size`` token ids.
        extra_keys: values that must also match for a hit (cache salt, adapter id).

    Returns:
        An unsigned 64-bit integer (fits msgpack and Redis without loss).
    """
    payload = msgpack.packb([parent_hash, list(token_ids), list(extra_keys)], use_bin_type=True)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def hash_chain(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), num_blocks: int | None = None) -> list[int]:
    """Hashes of the leading full blocks of ``token_ids`` (at most ``num_blocks`` of them)."""
    full = len(token_ids) // block_size
    if num_blocks is not None:
        full = min(full, num_blocks)
    hashes, parent = [], ROOT_HASH
    for i in range(full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys)
        hashes.append(parent)
    return hashes
