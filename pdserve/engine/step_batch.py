"""The flat batch of one step, on the host: what the model runner builds from a scheduled
step, and what the KV cache sizing's profile step and the decode graphs take."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepBatch:
    """The flat batch of one step, on the host."""

    block_tables: list[list[int]]
    input_ids: list[int] = field(default_factory=list)  # [num_tokens]; empty when on the device
    positions: list[int] = field(default_factory=list)  # [num_tokens]
    slot_mapping: list[int] = field(default_factory=list)  # [num_tokens]
    query_lens: list[int] = field(default_factory=list)  # [num_seqs] new tokens of each sequence
    seq_lens: list[int] = field(default_factory=list)  # [num_seqs] context after this step
    sample_rows: list[int] = field(default_factory=list)  # token rows whose logits are sampled
