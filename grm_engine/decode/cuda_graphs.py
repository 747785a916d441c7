"""The decode step on CUDA: model forward, logits and sampling as one CUDA graph per step shape.

A decode step launches ~30 kernels per layer; replayed from a graph they cost one launch. Everything the
step reads lives in one static device buffer per shape (token ids, positions, slots, block tables, context
lengths, sampling inputs), refilled from one pinned host buffer by one copy before each replay.

A step shape (StepKey) freezes what a graph cannot change: the padded batch (a bucket: 1, 2, 4, 8, 16, 24,
..., max_num_seqs), the block-table width (a power of two), the sampler's branches (greedy, filters,
log-probs) and the attention launch (plain: splits per sequence; shared-prefix: work-list capacity, prefix
slots and suffix splits). A shape is captured the first time a step needs it (at most max_graphs of them;
past that, new shapes run eagerly). `enabled=False` runs the very same padded computation without graphs,
so outputs are bit-identical with graphs on and off (the switch for debugging).
Padded rows compute garbage that is never read: slot -1 (the store kernel skips it), context 1, page 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata
from .sampler import sample


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, then every 8 up to 64, every 32 after that, and max_num_seqs itself."""
    sizes = {1, 2, 4, max_num_seqs, *range(8, min(64, max_num_seqs) + 1, 8), *range(96, max_num_seqs + 1, 32)}
    return sorted(s for s in sizes if s <= max_num_seqs)


@dataclass(frozen=True)
class StepKey:
    batch: int  # padded batch size (a bucket)
    table_width: int  # block-table columns (a power of two >= the longest table)
    sampling: tuple[bool, bool, bool, bool]  # (all_greedy, any_greedy, any_filter, want_logprobs)
    num_splits: int  # plain attention: key splits per sequence
    cascade: tuple[int, int, int] | None = None  # shared prefix: (item capacity, prefix slots, suffix splits)


class StepBuffers:
    """One packed device buffer holding every input of a step shape, views by name, and `ring` pinned twins used in
    turn (a round of several decode steps fills the next twin while earlier uploads are still queued)."""

    def __init__(self, fields: list[tuple[str, np.dtype, tuple[int, ...]]], device: torch.device, ring: int = 2):
        self.fields = fields
        sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for _, dtype, shape in fields]
        offsets, total = packed_layout(sizes)
        pinned = torch.device(device).type == "cuda"
        self.hosts = [torch.empty(total, dtype=torch.uint8, pin_memory=pinned) for _ in range(ring)]
        self.copied: list[torch.cuda.Event | None] = [None] * ring  # recorded after each twin's last upload
        self.slot = 0  # the twin the next step fills
        self.device_buffer = torch.empty(total, dtype=torch.uint8, device=device)
        self.ring_views, self.device_views = [{} for _ in range(ring)], {}
        for (name, dtype, shape), offset, nbytes in zip(fields, offsets, sizes):
            for views, host in zip(self.ring_views, self.hosts):
                views[name] = host.numpy()[offset:offset + nbytes].view(dtype).reshape(shape)
            self.device_views[name] = typed_view(self.device_buffer, offset, dtype, shape)

    @property
    def host_views(self) -> dict[str, np.ndarray]:
        return self.ring_views[self.slot]

    def wait_until_refillable(self) -> None:
        """The last upload from the twin about to be filled has read it. With a ring of steps + 1 twins that copy
        sits a round back in the stream; with 2 (single steps, one ahead) it is the next thing the GPU does: this
        waits microseconds at most."""
        event = self.copied[self.slot]
        if event is not None:
            event.synchronize()

    def upload(self) -> None:
        self.device_buffer.copy_(self.hosts[self.slot], non_blocking=True)
        if self.device_buffer.is_cuda:
            self.copied[self.slot] = torch.cuda.Event()
            self.copied[self.slot].record()
        self.slot = (self.slot + 1) % len(self.hosts)


MAX_EAGER_BUFFERS = 16  # input buffers kept for shapes that are not captured
_TORCH_DTYPE = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}


def packed_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of arrays of `sizes` bytes packed into one buffer, each 8-byte aligned (so every slice views as
    its dtype), and the buffer's total bytes."""
    offsets, total = [], 0
    for nbytes in sizes:
        offsets.append(total)
        total += -(-nbytes // 8) * 8
    return offsets, total


def typed_view(buffer: torch.Tensor, offset: int, dtype, shape) -> torch.Tensor:
    """The slice of a uint8 buffer at `offset` as a tensor of numpy `dtype` and `shape`."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return buffer[offset:offset + nbytes].view(_TORCH_DTYPE[dtype]).view(shape)


def step_fields(key: StepKey) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    b = key.batch
    fields = [("input_ids", np.int64, (b,)), ("input_src", np.int64, (b,)), ("positions", np.int64, (b,)), ("slots", np.int64, (b,)),
              ("block_tables", np.int32, (b, key.table_width)), ("context_lens", np.int32, (b,)),
              ("row_hash", np.int32, (b,)), ("temperature", np.float32, (b,)), ("top_p", np.float32, (b,)),
              ("top_k", np.int64, (b,))]
    if key.cascade is not None:
        fields += [("cascade_items", np.int32, (key.cascade[0], 6)), ("prefix_tokens", np.int32, (b,))]
    return fields


# padding of each input past the real rows: unused slot, one visible key on page 0, row 0's sampling settings
_PAD = {"input_ids": 0, "input_src": -1, "positions": 0, "slots": -1, "block_tables": 0, "context_lens": 1,
        "prefix_tokens": 0}


class DecodeGraphs:
    """Runs padded decode steps, captured as CUDA graphs per StepKey (see the module docstring)."""

    def __init__(self, model, layer_caches, block_size: int, max_num_seqs: int, enabled: bool = True,
                 max_graphs: int = 64, steps_per_round: int = 1):
        self.model, self.layer_caches, self.block_size = model, layer_caches, block_size
        self.host_ring = steps_per_round + 1  # pinned input twins per step shape
        self.buckets = batch_buckets(max_num_seqs)
        self.enabled, self.max_graphs = enabled, max_graphs
        self.buffers: dict[StepKey, StepBuffers] = {}
        self.graphs: dict[StepKey, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.pool = None
        self.capture_seconds = 0.0
        # the tokens the last step sampled, row by row: a step whose input token the host has not seen yet
        # (the decoder runs one step ahead of its bookkeeping) reads it here (input_src >= 0: that row)
        self.last_tokens = torch.zeros(self.buckets[-1], dtype=torch.int64, device=model.device)

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"decode step of {batch} sequences exceeds max_num_seqs ({self.buckets[-1]})")

    def run(self, key: StepKey, arrays: dict[str, np.ndarray], batch: int, cascade_plan=None):
        """arrays: host inputs of the `batch` real rows by field name. -> (tokens [batch] int64, logprobs [batch] or None)
        on the device; cascade_plan: the host plan whose device twin the step builds from the buffers."""
        buffers = self.buffers.get(key)
        if buffers is None:
            self._evict_uncaptured_buffers()
            buffers = self.buffers[key] = StepBuffers(step_fields(key), self.model.device, self.host_ring)
        buffers.wait_until_refillable()
        for name, view in buffers.host_views.items():
            value = arrays[name]
            if name == "block_tables":
                view[:batch, :value.shape[1]] = value
                view[:batch, value.shape[1]:] = 0
                view[batch:] = 0
            elif name == "cascade_items":
                view[...] = value
            else:
                view[:batch] = value
                view[batch:] = _PAD.get(name, value[0])
        buffers.upload()
        if not self.enabled or self.model.device.type != "cuda" or (key not in self.graphs and len(self.graphs) >= self.max_graphs):
            tokens, logprobs = self._step(key, buffers.device_views, cascade_plan)
        else:
            if key not in self.graphs:
                self.graphs[key] = self._capture(key, buffers.device_views, cascade_plan)
            graph, (tokens, logprobs) = self.graphs[key]
            graph.replay()
        return tokens[:batch], (logprobs[:batch] if logprobs is not None else None)

    def _evict_uncaptured_buffers(self) -> None:
        """Shapes that run eagerly (graphs off, or past max_graphs) keep their buffers only while few: a long-running
        decoder meets many shapes (batch sizes, table widths, work lists). A captured graph keeps its buffers."""
        uncaptured = [key for key in self.buffers if key not in self.graphs]
        for key in uncaptured[:max(0, len(uncaptured) - MAX_EAGER_BUFFERS + 1)]:  # oldest first (insertion order)
            del self.buffers[key]

    def _step(self, key: StepKey, inputs: dict[str, torch.Tensor], cascade_plan):
        plan = None
        if key.cascade is not None:
            from grm_engine.kernels.cascade_attention import CascadePlan

            plan = CascadePlan.from_host(cascade_plan, inputs["cascade_items"], inputs["prefix_tokens"])
        meta = AttentionMetadata(is_prefill=False, slot_mapping=inputs["slots"], block_tables=inputs["block_tables"],
                                 context_lens=inputs["context_lens"], query_starts=[], num_cached=[],
                                 max_context_len=key.table_width * self.block_size, num_splits=key.num_splits,
                                 cascade=plan)
        source = inputs["input_src"]
        input_ids = torch.where(source >= 0, self.last_tokens[source.clamp(min=0)], inputs["input_ids"])  # [B]
        hidden = self.model.forward(input_ids, inputs["positions"], self.layer_caches, meta)  # [B, hidden]
        logits = self.model.compute_logits(hidden)  # [B, V] fp32
        all_greedy, any_greedy, any_filter, want_logprobs = key.sampling
        tokens, logprobs = sample(logits, inputs["temperature"], inputs["top_k"], inputs["top_p"], inputs["row_hash"],
                                  want_logprobs, all_greedy=all_greedy, any_filter=any_filter, any_greedy=any_greedy)
        self.last_tokens[:key.batch].copy_(tokens)
        return tokens, logprobs

    def _capture(self, key: StepKey, inputs, cascade_plan):
        start = time.perf_counter()
        # one eager run on a side stream first: compiles the Triton kernels, sets up cuBLAS; the step stores the
        # same K/V and draws the same tokens when replayed, so running it twice changes nothing
        # (last_tokens is the one state a step changes besides the K/V it stores: put it back for the replay)
        saved_tokens = self.last_tokens.clone()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            self._step(key, inputs, cascade_plan)
            self.last_tokens.copy_(saved_tokens)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._step(key, inputs, cascade_plan)
        self.capture_seconds += time.perf_counter() - start
        return graph, outputs
