"""Shared fixtures: a tiny SDXL teacher folder (built once per session from configs, no downloads), prompts, and
an environment for subprocess runs of the scripts (offline, one thread, no dmdx-unrelated network)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

torch.set_num_threads(1)  # in-process tests of tiny models: one thread is fastest on the 2-core machines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "distill_scripts")
TINY_PROMPTS = ["a red circle", "a blue square", "a green cat", "two dots", "a digit seven", "a small tree"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate's state is a process-wide singleton: a test that built an ``Accelerator`` must not fix the precision
    or device of the next test in the same worker (pytest-xdist runs many files per process)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


# accelerate config of a one-process CPU launch (what a user's `accelerate config` writes on a CPU machine)
CPU_ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_machines: 1
num_processes: 1
mixed_precision: 'no'
use_cpu: true
"""


def recipe_env(hf_home, **extra) -> dict:
    """A recipe's ``train.sh`` launched as users launch it: offline, one thread, its own ``HF_HOME``, this venv's
    ``accelerate`` first on PATH; the accelerate config decides the device (``ACCELERATE_USE_CPU`` unset unless
    given in ``extra``)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(hf_home), PYTHONWARNINGS="ignore",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("ACCELERATE_USE_CPU", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (several test sessions may launch DDP runs at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(script: str, *args, num_processes: int = 1, port: int | None = None) -> list[str]:
    """``accelerate launch`` of a script in distill_scripts/ (2 processes: CPU DDP over gloo)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        launch += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port",
                   str(port or free_port())]
    else:
        launch += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                   "no"]
    return [*launch, os.path.join(SCRIPTS, script), *map(str, args)]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """A 32-px SDXL pipeline folder (latent 16x16), saved with save_pretrained like any Hub checkpoint."""
    from diffusers import StableDiffusionXLPipeline

    from dmdx.pipelines.tiny_components import sdxl_components

    path = str(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")
    StableDiffusionXLPipeline(**sdxl_components(sample_size=16)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return str(path)
