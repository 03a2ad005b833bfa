"""Installs one import package, ``dmdx``, whose parts live in top-level folders.

training/    -> dmdx.training     (losses, prediction-type algebra, discriminator heads, samplers)
pipelines/   -> dmdx.pipelines    (export to stock diffusers pipelines, LoRA, model cards, tiny components)
model_cards/ -> dmdx.model_cards  (Jinja templates, package data)
"""

from setuptools import setup

setup(
    name="dmdx",
    version="0.1.0",
    description="Adversarial Distribution Matching (ADM) and DMDX distillation for diffusers models",
    python_requires=">=3.10",
    packages=["dmdx.training", "dmdx.pipelines", "dmdx.pipelines.teachers", "dmdx.model_cards"],
    package_dir={
        "dmdx.training": "training",
        "dmdx.pipelines": "pipelines",
        "dmdx.pipelines.teachers": "pipelines/teachers",
        "dmdx.model_cards": "model_cards",
    },
    package_data={"dmdx.model_cards": ["*.md"], "dmdx.pipelines": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42",
        "transformers>=5.0",
        "accelerate>=1.0",
        "peft>=0.13",
        "datasets>=3.0",
        "safetensors",
        "huggingface_hub",
        "jinja2",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "ruff"],
        "xformers": ["xformers"],
        "8bit": ["bitsandbytes"],
        # a real run (docs/gpus.md): trackers, T5 tokenizers shipped as spiece.model, 8-bit Adam
        "train": ["tensorboard>=2.16", "sentencepiece>=0.2", "protobuf>=4.25", "bitsandbytes>=0.45"],
    },
)
