"""Micro-batches for training and scoring: right-padded rows, or rows packed with several examples.

Packing fills each row of ``max_length`` tokens with whole examples, so a batch of short
instructions costs their real tokens instead of padding. The examples in a row are kept apart by
``position_ids`` that restart at 0 for each of them: transformers turns that into a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), and the loss of a
packed row equals the sum of its examples' losses (tests/ml/test_batching.py).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator

import torch

from loraflow.ml.prompts import IGNORE_INDEX, Encoded

Row = list[Encoded]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and labels."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """One tensor row per packed row, with position ids restarting at every example.

    ``attention_mask`` marks real tokens (for counting them); the model is given the position
    ids instead (``loraflow.ml.loss.model_inputs``). Trailing padding is a segment of its own with
    ignored labels, so it can neither see nor be seen by the examples.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[i, at : at + n] = torch.tensor(e.input_ids)
            labels[i, at : at + n] = torch.tensor(e.labels)
            labels[i, at] = IGNORE_INDEX  # the first token of an example is never predicted from the one before
            positions[i, at : at + n] = torch.arange(n)
            mask[i, at : at + n] = 1
            at += n
        positions[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def pack(examples: list[Encoded], max_length: int) -> list[Row]:
    """Rows of at most ``max_length`` tokens, filled with whole examples by best fit decreasing.

    The longest example goes first, each into the fullest row it still fits (a new row if none),
    so short examples fill the gaps that long ones leave: on instruction-length data 97-98% of
    each row is real tokens, where filling rows in the given order leaves about 11% padding
    (bench/packing_throughput.py prints the fill). Rows come out longest-example first; callers
    shuffle them (:func:`epoch_rows`). Ties keep the given order, so the result is deterministic.
    An example longer than ``max_length`` gets a row of its own.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index) of the rows with room, sorted
    for i in order:
        n = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (n, -1))  # the row with the least room that still holds n
        if at < len(free):
            left, r = free.pop(at)
        else:
            left, r = max_length, len(rows)
            rows.append([])
        rows[r].append(examples[i])
        if left - n > 0:
            bisect.insort(free, (left - n, r))
    return rows


def epoch_rows(examples: list[Encoded], max_length: int, rng: random.Random) -> list[Row]:
    """One epoch's packed rows: the examples shuffled, packed (:func:`pack`), the rows shuffled."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows = pack([examples[j] for j in order], max_length)
    rng.shuffle(rows)
    return rows


def micro_batches(examples: list[Encoded], batch_size: int, seed: int) -> Iterator[list[Encoded]]:
    """Endless stream of shuffled micro-batches, reshuffled each epoch with a seeded generator."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):  # the caller ensures one full batch
            yield [examples[j] for j in order[i : i + batch_size]]


def packed_micro_batches(examples: list[Encoded], batch_size: int, max_length: int, seed: int) -> Iterator[list[Row]]:
    """Endless stream of micro-batches of packed rows; each epoch reshuffles and repacks (:func:`epoch_rows`)."""
    rng = random.Random(seed)
    while True:
        rows = epoch_rows(examples, max_length, rng)
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[i : i + batch_size]


def packed_rows_per_epoch(examples: list[Encoded], max_length: int, seed: int) -> int:
    """How many packed rows one epoch makes (the first epoch's; later ones may differ by a row or so)."""
    return len(epoch_rows(examples, max_length, random.Random(seed)))
