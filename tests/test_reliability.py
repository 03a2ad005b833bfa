"""Preemption and checkpoint rotation (README "Reliability"): SIGTERM / SIGINT mid-run finish the step, save a
checkpoint and exit non-zero, and resuming from it ends bit-identical to an uninterrupted run; rotation never
deletes another run's checkpoints or the newest one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, script_env
from safetensors.torch import load_file

SCRIPT = os.path.join(REPO, "distill_scripts", "train_adm_sdxl.py")


def command(teacher, prompts, out, steps, *extra):
    return [sys.executable, SCRIPT, "--pretrained_model_name_or_path", teacher, "--prompts_file", prompts,
            "--resolution", "32", "--train_batch_size", "2", "--generator_lr", "1e-4", "--discriminator_lr", "1e-3",
            "--checkpointing_steps", "1000", "--diagnostics_steps", "0", "--max_train_steps", str(steps),
            "--output_dir", out, *map(str, extra)]


def interrupt(cmd, out, signum, after_steps: int = 2) -> tuple[int, str, int]:
    """Start a run, send ``signum`` once it has logged ``after_steps`` steps; return (exit code, stderr, steps)."""
    proc = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "train_log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log) and len(open(log).read().splitlines()) >= after_steps:
            proc.send_signal(signum)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    steps = len(open(log).read().splitlines())
    return proc.returncode, err, steps


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_identical(tiny_sdxl, prompts_file, tmp_path):
    stopped, straight = str(tmp_path / "stopped"), str(tmp_path / "straight")
    code, err, k = interrupt(command(tiny_sdxl, prompts_file, stopped, 200), stopped, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert f"Stopped by SIGTERM after step {k}" in err and "--resume_from_checkpoint latest" in err
    assert "Traceback" not in err
    assert sorted(n for n in os.listdir(stopped) if n.startswith("checkpoint")) == [f"checkpoint-{k}"]
    assert not os.path.exists(os.path.join(stopped, "model_index.json"))  # not exported: the run is unfinished

    # resume to k + 2 and compare with a run that went to k + 2 without a stop
    subprocess.run(command(tiny_sdxl, prompts_file, stopped, k + 2, "--resume_from_checkpoint", "latest"),
                   env=script_env(), check=True, capture_output=True)
    subprocess.run(command(tiny_sdxl, prompts_file, straight, k + 2), env=script_env(), check=True,
                   capture_output=True)
    assert [json.loads(line)["step"] for line in open(os.path.join(stopped, "train_log.jsonl"))] == \
        list(range(1, k + 3))  # no step logged twice
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):
        a, b = (load_file(os.path.join(o, f"checkpoint-{k + 2}", name)) for o in (stopped, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130(tiny_sdxl, prompts_file, tmp_path):
    out = str(tmp_path / "ctrl-c")
    code, err, k = interrupt(command(tiny_sdxl, prompts_file, out, 200), out, signal.SIGINT)
    assert code == 128 + signal.SIGINT and f"Stopped by SIGINT after step {k}" in err, err
    assert os.path.isdir(os.path.join(out, f"checkpoint-{k}"))
    provenance = json.load(open(os.path.join(out, f"checkpoint-{k}", "dmdx_provenance.json")))
    assert provenance["step"] == k and provenance["teacher"].startswith("StableDiffusionXLPipeline:")


def test_rotation_keeps_foreign_and_newest_checkpoints(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmdx.training.checkpointing import list_checkpoints, read_provenance, save_checkpoint

    accelerator = Accelerator(cpu=True)
    try:
        accelerator.prepare(torch.nn.Linear(2, 2))
        out = str(tmp_path)
        save_checkpoint(accelerator, out, 100, provenance={"run_id": "old-run"})  # another run, higher step
        for step in (1, 2, 3):
            save_checkpoint(accelerator, out, step, total_limit=2, provenance={"run_id": "this-run"})
        kept = {s: read_provenance(p)["run_id"] for s, p in list_checkpoints(out)}
        assert kept == {2: "this-run", 3: "this-run", 100: "old-run"}
        save_checkpoint(accelerator, out, 4, total_limit=1, provenance={"run_id": "this-run"})
        assert [s for s, _ in list_checkpoints(out)] == [4, 100]  # never the one just written
    finally:
        AcceleratorState._reset_state(True)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmdx.training.checkpointing import find_resume_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    try:
        accelerator.prepare(torch.nn.Linear(2, 2))
        out = str(tmp_path)
        save_checkpoint(accelerator, out, 1, provenance={"run_id": "r"})

        def disk_full(*_a, **_k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(accelerator, "save_state", disk_full)
        with pytest.raises(OSError, match=r"Could not write checkpoint .*checkpoint-2.*previous complete checkpoint"):
            save_checkpoint(accelerator, out, 2, provenance={"run_id": "r"})
        assert find_resume_checkpoint(out, "latest").endswith("checkpoint-1")
        assert sorted(os.listdir(out)) == ["checkpoint-1"]  # no half-written folder left
    finally:
        AcceleratorState._reset_state(True)


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path):
    """A kill during export or a checkpoint save leaves staging folders; the next start removes them (and nothing
    else)."""
    from dmdx.training.plumbing import clean_leftovers

    for name in (".export-abc", ".lora-xyz", "checkpoint-7.tmp", "checkpoint-6", "validation"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"weights")
    clean_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "validation"]
    assert (tmp_path / "checkpoint-6" / "model.safetensors").read_bytes() == b"weights"
