"""The package installs as one import package `dmdx` with its templates, and the environment is sane."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchvision_is_not_installed():
    # Its registry build is linked against CUDA and breaks `from transformers import CLIPTextModel` on CPU machines.
    assert importlib.util.find_spec("torchvision") is None


def test_wheel_contains_dmdx_parts_and_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("dmdx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("dmdx/training/losses.py", "dmdx/training/parametrization.py", "dmdx/training/loop.py",
                   "dmdx/training/adp.py", "dmdx/pipelines/__init__.py", "dmdx/pipelines/teachers/sdxl.py",
                   "dmdx/pipelines/teachers/sd3.py", "dmdx/pipelines/teachers/cogvideox.py",
                   "dmdx/pipelines/tiny_components.py"):
        assert module in names, module
    templates = {n for n in names if n.startswith("dmdx/model_cards/") and n.endswith(".md")}
    assert templates, "model card templates must ship as package data"
    assert not any(n.startswith(("tests/", "distill_scripts/", "benchmarks/")) for n in names)


def test_public_api_imports():
    import dmdx.training as training

    for name in ("NoiseSchedule", "schedule_from_scheduler_config", "hinge_discriminator_loss", "dmd_loss",
                 "adm_latent_predictions", "DiscriminatorHeads", "BackboneFeatures", "cubic_timesteps"):
        assert hasattr(training, name), name


def _pipelines_imports(source: str) -> list[str]:
    """Every import of ``pipelines`` / ``dmdx.pipelines`` in ``source`` (absolute or relative, at any depth: the loops
    used to import inside functions), as ``line: module``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] + [f"{base}.{alias.name}".lstrip(".") for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pipelines" or parts[:2] == ["dmdx", "pipelines"]:
                found.append(f"{node.lineno}: {name}")
                break
    return found


def test_training_never_imports_pipelines():
    # dmdx.pipelines (the architectures) imports dmdx.training (the method), never the other way round
    # (docs/design.md#imports): the loops reach export, cards and the Hub through the teacher adapter.
    planted = "def f():\n    from dmdx.pipelines.hub import push_to_hub\n    from .. import pipelines\nimport os\n"
    assert _pipelines_imports(planted) == ["2: dmdx.pipelines.hub", "3: pipelines"]  # the check can fail
    offenders = {path.name: found for path in sorted((ROOT / "training").glob("*.py"))
                 if (found := _pipelines_imports(path.read_text()))}
    assert not offenders, offenders
