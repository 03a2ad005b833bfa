"""Atomic training checkpoints, resume lookup and the non-finite-loss guard shared by the training scripts.

A checkpoint is ``accelerator.save_state`` (every prepared model, optimizer and LR scheduler, anything registered
with ``register_for_checkpointing``, and each process's RNG states) written into ``checkpoint-{step}.tmp`` and only
then renamed to ``checkpoint-{step}``. A crash mid-save leaves a ``.tmp`` folder that :func:`find_resume_checkpoint`
ignores, so the previous checkpoint stays the one a resume loads (docs/design.md#checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import torch

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; the message names the term. Raised before any backward/step/checkpoint."""


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first (``.tmp`` folders excluded)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


PROVENANCE_NAME = "dmdx_provenance.json"


def read_provenance(checkpoint: str) -> dict | None:
    path = os.path.join(checkpoint, PROVENANCE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None,
                    provenance: dict | None = None) -> str:
    """Save the full training state atomically as ``output_dir/checkpoint-{step}`` (with ``provenance``: what made
    it, checked before a resume) and prune this run's oldest complete checkpoints so that at most ``total_limit`` of
    them remain. Only checkpoints of this run (the same ``run_id``) are ever pruned, never the one just saved.
    Every process must call this (``save_state`` gathers per-process RNG states); the main process renames and
    prunes; everyone waits for it. A failed write (full disk, permissions) removes the partial folder and raises
    ``OSError`` naming the folder; the previous checkpoint stays the one a resume loads."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.isdir(tmp):  # left over from a crash
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        if accelerator.is_main_process and provenance is not None:
            with open(os.path.join(tmp, PROVENANCE_NAME), "w") as f:
                json.dump({**provenance, "step": step}, f, indent=2, default=str)
    except (OSError, RuntimeError) as e:  # safetensors/torch wrap ENOSPC in RuntimeError ("iostream error")
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"Could not write checkpoint {final}: {e} (full disk or no permission?). Nothing was "
                      f"replaced: the previous complete checkpoint is still the one a resume loads.") from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):  # re-saving the same step (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            run_id = (provenance or {}).get("run_id")
            mine = [(s, p) for s, p in list_checkpoints(output_dir)
                    if p != final and (read_provenance(p) or {}).get("run_id") == run_id]
            for _, path in mine[: max(0, len(mine) + 1 - total_limit)]:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint folder to resume from: ``None``/empty -> None; ``"latest"`` -> the highest complete
    ``checkpoint-N`` in ``output_dir`` (None if there is none: a fresh start); otherwise a path (absolute, or a
    folder name inside ``output_dir``) that must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    candidates = [resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)]
    for path in candidates:
        if os.path.isdir(path) and not path.rstrip("/").endswith(".tmp"):
            return path
    raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such complete checkpoint "
                            f"folder (looked at {candidates}).")


def checkpoint_step(path: str) -> int:
    """The global step encoded in a checkpoint folder's name (``checkpoint-{step}``)."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"{path!r} is not named checkpoint-<step>.")
    return int(match.group(1))


def check_finite(losses: Mapping[str, torch.Tensor], accelerator=None) -> None:
    """Raise :class:`NonFiniteLossError` naming every loss term that is NaN or inf.

    With an ``accelerator`` running several processes the flags are summed over processes, so every rank raises
    together (no rank is left waiting in a collective)."""
    names = list(losses)
    flags = torch.tensor([0.0 if torch.isfinite(losses[n].detach()).all() else 1.0 for n in names])
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    bad = [n for n, f in zip(names, flags.tolist()) if f > 0]
    if bad:
        raise NonFiniteLossError(f"Non-finite loss in {', '.join(bad)}: stopping without saving a new checkpoint "
                                 f"(the last good checkpoint is kept).")
