"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A step is either a prefill step (chunks of waiting/prefilling sequences, up to max_num_batched_tokens
tokens) or a decode step (one token for every running sequence). Prefill goes first so new requests join
as soon as blocks allow; FIFO everywhere. When a decode step lacks blocks, the most recently admitted
running sequence is preempted: its blocks are freed and it recomputes its tokens later (recompute, not swap).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import DecoderConfig
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence: tokens whose K/V this step computes
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst), before the step

    def needs_logits(self, i: int) -> bool:
        """Sequence i reaches its last token in this step, so its next token is sampled."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq)


class Scheduler:
    def __init__(self, config: DecoderConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.retired: list[Sequence] = []  # will finish with their pending last token; hold blocks until it is seen
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0
        # Admission keeps a few blocks free so decode does not preempt what prefill just admitted.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def num_seats_taken(self) -> int:
        return len(self.running) + sum(s.num_samples_to_fork for s in self.prefilling)

    def can_admit(self) -> bool:
        """The head of the waiting queue has seats (max_num_seqs) to join now (the blocks may still say no)."""
        return self.num_seats_taken() + self.waiting[0].num_samples_to_fork <= self.config.max_num_seqs

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        batch = ScheduledBatch(True, [], [])

        def add_chunk(seq: Sequence) -> None:
            nonlocal budget
            chunk = min(len(seq) - seq.num_computed_tokens, budget)
            if chunk <= 0:
                return
            batch.seqs.append(seq)
            batch.num_new_tokens.append(chunk)
            budget -= chunk
            # Blocks filled by this step are findable at once: a later sequence of the same step reads
            # them after this step stores them (every layer stores all K/V before attending). They stay
            # pending until finish_step; an aborted step drops them (abort_all).
            self.block_manager.register_full_blocks(seq, seq.num_computed_tokens + chunk)

        for seq in self.prefilling:
            add_chunk(seq)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            idle = not self.running and not self.prefilling
            if not idle and self.num_seats_taken() + seq.num_samples_to_fork > self.config.max_num_seqs:
                break
            if not self.block_manager.allocate(seq, reserve=0 if idle else self.watermark_blocks):
                break  # FIFO: later requests do not overtake the head of the queue
            self.waiting.popleft()
            self.num_prefix_hit_tokens += seq.num_computed_tokens
            seq.status = SequenceStatus.PREFILLING
            self.prefilling.append(seq)
            add_chunk(seq)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _schedule_decode(self) -> ScheduledBatch:
        batch = ScheduledBatch(False, [], [])
        scheduled: list[Sequence] = []
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            if self.block_manager.num_blocks_to_append(seq) == 0:  # most steps: the slot is in a private block
                scheduled.append(seq)
                continue
            while self.block_manager.num_blocks_to_append(seq) > self.block_manager.num_free_blocks:
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                copy = self.block_manager.append_slot(seq)
                if copy is not None:
                    batch.block_copies.append(copy)
                scheduled.append(seq)
        # Preempted sequences left the running list; keep admission order for the rest.
        self.running = scheduled
        batch.seqs = list(scheduled)
        batch.num_new_tokens = [1] * len(scheduled)
        return batch

    def schedule_decode_round(self, steps: int, max_model_len: int) -> ScheduledBatch:
        """Every running sequence for a round of up to `steps` decode steps launched without the host in between:
        num_new_tokens[i] = the steps sequence i may still take (its max_tokens and the context end; a sequence
        with fewer sits out the round's last steps). Blocks for every position are taken now; the caller checked
        that they fit (round_blocks_needed), so nothing is preempted."""
        batch = ScheduledBatch(False, list(self.running), [])
        manager = self.block_manager
        for seq in self.running:
            active = min(steps, seq.params.max_tokens - seq.num_output_tokens, max_model_len - len(seq))
            copy = manager.append_slots(seq, active)
            if copy is not None:
                batch.block_copies.append(copy)
            batch.num_new_tokens.append(active)
        return batch

    def round_blocks_needed(self, steps: int) -> int:
        """Free blocks that a decode round of `steps` steps can take at most."""
        return sum(self.block_manager.blocks_for_steps(seq, steps) for seq in self.running)

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Record the K/V this step wrote; sequences whose prompt is done move to running."""
        if batch.is_prefill:
            self.block_manager.commit_registrations()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if batch.is_prefill and seq.num_computed_tokens == len(seq):
                self.prefilling.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            elif not batch.is_prefill:
                self.block_manager.register_last_block_if_full(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins right after its parent (it shares the parent's blocks)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def abort_all(self) -> None:
        """Free every block of unfinished sequences (generate() was interrupted); the pool stays usable and
        the prefix cache forgets the blocks of a step that did not run."""
        self.block_manager.drop_pending_registrations()
        for seq in [*self.running, *self.prefilling, *self.waiting, *self.retired]:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.running, self.prefilling, self.waiting, self.retired = [], [], deque(), []

    def retire(self, seq: Sequence) -> None:
        """The sequence's pending token is its last (length limit): no more steps; its blocks stay until finish."""
        self.running.remove(seq)
        self.retired.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        (self.retired if seq in self.retired else self.running).remove(seq)
        self.block_manager.free(seq)
