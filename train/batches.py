"""Tokenized training rows -> micro-batches: deterministic epoch order, packing without cross-contamination.

A micro-batch is `per_device_train_batch_size` rows (or, with max_tokens_per_batch, as many rows as fit that
many tokens). With packing, its rows are concatenated into as few sequences of at most max_seq_length tokens as
first-fit allows; every row keeps its own positions (0, 1, ...) and a block-diagonal causal mask, so no row
attends to another (tests compare packed and per-row losses). Without packing, rows are right-padded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Row:
    prompt_ids: list[int]
    completion_ids: list[int]  # EOS included
    weight_label: float | None = None  # meta RM: the 0/1 label; None for SFT rows
    key: str = ""  # where the row came from (file:line), for errors and logs

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [S, L] long
    position_ids: torch.Tensor  # [S, L] long, restarting at 0 for every row
    attention_mask: torch.Tensor  # [S, 1, L, L] bool: causal within a row, False across rows and on padding
    target_ids: torch.Tensor  # [S, L] long: target_ids[:, t] is the token after position t (0 where unused)
    loss_mask: torch.Tensor  # [S, L] bool: position t predicts a completion token
    last_positions: list[tuple[int, int]]  # (sequence, position) of each row's last token (meta RM pooling)
    labels: torch.Tensor | None  # [rows] float (meta RM)
    num_rows: int
    num_tokens: int  # real tokens (no padding)

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> "MicroBatch":
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.target_ids), move(self.loss_mask), self.last_positions, move(self.labels),
                          self.num_rows, self.num_tokens)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(num_rows)


def split_micro_batches(rows: list[Row], order, batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch for one epoch, in order."""
    batches, current, tokens = [], [], 0
    for index in order:
        length = len(rows[index])
        full = len(current) >= batch_size if not max_tokens else (current and tokens + length > max_tokens)
        if full:
            batches.append(current)
            current, tokens = [], 0
        current.append(int(index))
        tokens += length
    if current:
        batches.append(current)
    return batches


def _sequences(rows: list[Row], max_seq_length: int, packing: bool) -> list[list[int]]:
    """Group the micro-batch's rows into sequences (first fit, in order)."""
    if not packing:
        return [[i] for i in range(len(rows))]
    sequences: list[list[int]] = []
    lengths: list[int] = []
    for i, row in enumerate(rows):
        for s, used in enumerate(lengths):
            if used + len(row) <= max_seq_length:
                sequences[s].append(i)
                lengths[s] += len(row)
                break
        else:
            sequences.append([i])
            lengths.append(len(row))
    return sequences


def collate(rows: list[Row], max_seq_length: int, packing: bool, pad_id: int = 0) -> MicroBatch:
    sequences = _sequences(rows, max_seq_length, packing)
    width = max(sum(len(rows[i]) for i in seq) for seq in sequences)
    count = len(sequences)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)  # [S, L]
    position_ids = torch.zeros((count, width), dtype=torch.long)
    segment = torch.full((count, width), -1, dtype=torch.long)  # row number per position, -1 = padding
    target_ids = torch.zeros((count, width), dtype=torch.long)
    loss_mask = torch.zeros((count, width), dtype=torch.bool)
    last_positions = [None] * len(rows)
    for s, seq in enumerate(sequences):
        start = 0
        for i in seq:
            row = rows[i]
            ids = row.prompt_ids + row.completion_ids
            end = start + len(ids)
            input_ids[s, start:end] = torch.tensor(ids)
            position_ids[s, start:end] = torch.arange(len(ids))
            segment[s, start:end] = i
            if row.completion_ids:
                # position p predicts ids[p + 1]: the completion starts at len(prompt)
                first = start + len(row.prompt_ids) - 1
                target_ids[s, first:end - 1] = torch.tensor(row.completion_ids)
                loss_mask[s, first:end - 1] = True
            last_positions[i] = (s, end - 1)
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # [L, L]
    same_row = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)  # [S, L, L]
    attention_mask = (same_row & causal)[:, None]  # [S, 1, L, L]
    # padding rows of the mask attend to themselves only (keeps softmax finite; never read)
    pad = segment < 0
    if pad.any():
        eye = torch.eye(width, dtype=torch.bool).expand(count, width, width)
        attention_mask = attention_mask | (eye & pad[:, :, None])[:, None]
    labels = None
    if rows and rows[0].weight_label is not None:
        labels = torch.tensor([float(r.weight_label) for r in rows])
    return MicroBatch(input_ids, position_ids, attention_mask, target_ids, loss_mask, last_positions, labels,
                      len(rows), sum(len(r) for r in rows))


def model_attention_mask(module, mask: torch.Tensor) -> torch.Tensor:
    """The [S, 1, L, L] bool mask as the module's attention takes it: SDPA takes it as is; transformers' eager
    attention ADDS a 4-D mask to the scores (a bool mask would add 0/1 and mask nothing), so it gets an additive
    fp32 mask (0 where attended, the fp32 minimum elsewhere). Sliding windows are not applied through a 4-D mask:
    check_sliding_window refuses rows longer than a model's window first."""
    if getattr(getattr(module, "config", None), "_attn_implementation", "sdpa") != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def check_sliding_window(model_config, longest: int, what: str) -> None:
    """Packed training batches pass one 4-D mask to every layer, which does not apply a layer's sliding window
    (Gemma 2: every other layer): refuse sequences longer than the window rather than train on other attention."""
    window = getattr(model_config, "sliding_window", None)
    layer_types = getattr(model_config, "layer_types", None) or []
    if window and "sliding_attention" in layer_types and longest > window:
        raise ValueError(f"{what}: a sequence of {longest} tokens is longer than the model's sliding window of {window} "
                         "tokens; the training forward cannot apply the window (shorten max_seq_length or the data)")


class Schedule:
    """Which rows each optimizer step takes: steps x (accumulation x world) micro-batches, epoch by epoch.

    The micro-batches of step s (global, every rank) are the indices [s * per_step, (s + 1) * per_step) of the
    concatenated epochs; rank r takes every world-th of them. An epoch's incomplete last step is dropped.
    """

    def __init__(self, rows: list[Row], config, world: int):
        self.rows, self.config, self.world = rows, config, world
        self.per_step = config.gradient_accumulation_steps * world
        self._epochs: dict[int, list[list[int]]] = {}
        first = self.epoch(0)
        self.steps_per_epoch = len(first) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(rows)} rows make {len(first)} micro-batches, fewer than one optimizer step "
                             f"needs ({config.gradient_accumulation_steps} accumulation x {world} processes); lower "
                             "per_device_train_batch_size or gradient_accumulation_steps, or give more data")
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            order = epoch_order(len(self.rows), self.config.seed, e)
            self._epochs = {e: split_micro_batches(self.rows, order, self.config.per_device_train_batch_size,
                                                   self.config.max_tokens_per_batch)}
        return self._epochs[e]

    def step_batches(self, step: int) -> list[list[int]]:
        """Row indices of every micro-batch of optimizer step `step` (0-based), all ranks, in order."""
        epoch, within = divmod(step, self.steps_per_epoch)
        batches = self.epoch(epoch)
        return batches[within * self.per_step:(within + 1) * self.per_step]
