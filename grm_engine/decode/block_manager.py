"""KV block pool: reference counts, chained-hash prefix cache with token comparison, fork and copy-on-write.

A block is shared when its ref_count > 1 (prefix-cache hits, forked samples). Only full blocks whose K/V
is written (or being written in the current step) get a hash; those are immutable. Registrations made while a
prefill step is scheduled stay pending until the step has run (commit_registrations); an aborted step drops
them (drop_pending_registrations), so a block whose K/V was never written is never found. A shared partial
block (the end of a forked prompt) is copied before anyone writes into it (copy-on-write).
Freed blocks keep their hash and contents until the pool reuses them, so a later request (or a
preempted sequence coming back) can still hit them; eviction is least-recently-freed first.
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # chained: hash of (parent_hash, token_ids)
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chained_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.peak_blocks_in_use = 0
        # (block id, the block its hash pointed to before or None) registered for a step that has not run yet
        self.pending_registrations: list[tuple[int, int | None]] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_blocks_in_use(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.parent_hash, block.token_ids = None, None, ()
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None

    def _note_peak(self) -> None:
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_blocks_in_use)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids that already hold seq's leading full blocks (same chained hash and same tokens)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent_hash = None
        bs = self.block_size
        # The last token is always recomputed (its logits are needed), so a block holding it is never a hit.
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chained_hash(parent_hash, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent_hash:
                break  # a hash collision: compare tokens, never trust the hash alone
            hits.append(block_id)
            parent_hash = h
        return hits

    def allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached ones; False if the pool
        cannot (then nothing changes). `reserve` free blocks must remain afterwards."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._cached_prefix(seq)
        num_needed = -(-len(seq) // self.block_size)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # free now, taken by the hit
        if (num_needed - len(hits)) + revived + reserve > self.num_free_blocks:
            return False
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = hits + [self._take_free_block() for _ in range(num_needed - len(hits))]
        seq.num_computed_tokens = len(hits) * self.block_size
        self._note_peak()
        return True

    def register_full_blocks(self, seq: Sequence, num_tokens_with_kv: int) -> None:
        """Make seq's full blocks among its first num_tokens_with_kv tokens findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent_hash = None
        for i in range(min(num_tokens_with_kv, len(seq)) // bs):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            if block.hash is None:
                if block.ref_count > 1:
                    break  # a shared partial block got full in one sibling only: it is copied first
                block.parent_hash, block.token_ids = parent_hash, tokens
                block.hash = chained_hash(parent_hash, tokens)
                self.pending_registrations.append((block.block_id, self.hash_to_block.get(block.hash)))
                self.hash_to_block[block.hash] = block.block_id
            parent_hash = block.hash

    def commit_registrations(self) -> None:
        """The step that fills the pending registered blocks has run: their K/V is written."""
        self.pending_registrations.clear()

    def drop_pending_registrations(self) -> None:
        """The step was aborted (error, Ctrl-C) before its K/V was written: forget the blocks it registered,
        restoring the table entries they replaced."""
        for block_id, previous in reversed(self.pending_registrations):
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                if previous is not None and self.blocks[previous].hash == block.hash:
                    self.hash_to_block[block.hash] = previous
                else:
                    del self.hash_to_block[block.hash]
            block.hash, block.parent_hash, block.token_ids = None, None, ()
        self.pending_registrations.clear()

    def register_last_block_if_full(self, seq: Sequence) -> None:
        """After a decode step: register the block that the step just filled (O(1) per sequence)."""
        filled = seq.num_computed_tokens
        self.register_block_range(seq, max(filled - 1, 0), filled)

    def register_block_range(self, seq: Sequence, start: int, end: int) -> None:
        """After a round of decode steps wrote K/V for positions start..end-1 (their tokens now known): register
        the blocks that got full in it (their last position is in the range), each chained to the one before."""
        bs = self.block_size
        if not self.enable_prefix_caching:
            return
        for index in range(start // bs, end // bs):  # the blocks whose last position is in start..end-1
            block = self.blocks[seq.block_table[index]]
            parent_hash = self.blocks[seq.block_table[index - 1]].hash if index > 0 else None
            if block.hash is not None or block.ref_count > 1 or (index > 0 and parent_hash is None):
                return
            block.parent_hash, block.token_ids = parent_hash, tuple(seq.token_ids[index * bs:(index + 1) * bs])
            block.hash = chained_hash(parent_hash, block.token_ids)
            self.hash_to_block[block.hash] = block.block_id

    def blocks_for_steps(self, seq: Sequence, steps: int) -> int:
        """At most this many free blocks let seq write K/V for positions num_computed_tokens .. + steps - 1."""
        return (seq.num_computed_tokens + steps - 1) // self.block_size - seq.num_computed_tokens // self.block_size + 1

    def append_slots(self, seq: Sequence, steps: int) -> tuple[int, int] | None:
        """append_slot for positions num_computed_tokens .. + steps - 1 (a round of decode steps): copy-on-write
        of the current block if shared, new blocks past the table. -> the block copy, if any."""
        copy = self.append_slot(seq)
        bs = self.block_size
        last = (seq.num_computed_tokens + steps - 1) // bs
        while len(seq.block_table) <= last:
            seq.block_table.append(self._take_free_block())
        self._note_peak()
        return copy

    def num_blocks_to_append(self, seq: Sequence) -> int:
        """Free blocks needed before seq can write K/V for its token at position num_computed_tokens."""
        index = seq.num_computed_tokens // self.block_size
        if index == len(seq.block_table):
            return 1
        return 1 if self.blocks[seq.block_table[index]].ref_count > 1 else 0

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make the block for position num_computed_tokens writable; returns a (src, dst) block copy when
        the block was shared (copy-on-write), else None. Call only when num_blocks_to_append fits."""
        index = seq.num_computed_tokens // self.block_size
        copy = None
        if index == len(seq.block_table):
            seq.block_table.append(self._take_free_block())
        elif self.blocks[seq.block_table[index]].ref_count > 1:
            src = seq.block_table[index]
            dst = self._take_free_block()
            self._unref(src)
            seq.block_table[index] = dst
            copy = (src, dst)
        else:
            return None  # nothing taken: the peak cannot have moved
        self._note_peak()
        return copy

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent."""
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self._ref(block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail is evicted before the shared head
            self._unref(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def check_invariants(self, live: list[Sequence]) -> None:
        """Reference counts equal the block-table occurrences of live sequences; free means unreferenced."""
        counts = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id}: ref_count {block.ref_count} != {counts[block.block_id]} uses"
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), f"block {block.block_id}: free list disagrees"
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h, f"hash table points to block {block_id} with another hash"
