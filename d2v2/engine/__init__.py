"""The engine: pretraining runner (``pretrain``), fine-tuning and evaluation, and what they share.

Shared utilities, one idea per module: ``optim`` (AdamW groups, budget-fraction LR schedule),
``checkpoint`` (atomic, verified files), ``clock`` (train-only / end-to-end clocks, segment table),
``distributed`` (process-group set-up), ``events`` (JSONL event log), ``provenance`` (code, software,
hardware), ``sampler`` (resumable, sharded, deterministic order).
"""
