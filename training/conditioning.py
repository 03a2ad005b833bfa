"""Conditioning as the teacher adapters return it: a dict of batch-first tensors whose keys the adapter chooses."""

from __future__ import annotations

import torch


def cat_conditioning(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def select_conditioning(cond: dict, idx: torch.Tensor, device) -> dict:
    return {k: v[idx].to(device) for k, v in cond.items()}
