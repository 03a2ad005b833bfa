"""Uploading a finished student folder to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder)."""

from __future__ import annotations

import os


def push_to_hub(output_dir: str, hub_model_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload DMDX student",
                ignore_patterns=("checkpoint-*", "checkpoint-*/**", ".export-*", "logs/**", "*.tmp")) -> str:
    """Create (or reuse) the model repo ``hub_model_id`` and upload ``output_dir`` without training checkpoints or
    logs. Returns the repo id. The token defaults to the logged-in one (``huggingface-cli login`` / ``HF_TOKEN``)."""
    import huggingface_hub

    if not os.path.isfile(os.path.join(output_dir, "model_index.json")) and \
            not os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors")):
        raise FileNotFoundError(f"{output_dir} holds no exported pipeline or LoRA weights to upload.")
    repo_id = huggingface_hub.create_repo(hub_model_id, token=token, private=private, exist_ok=True).repo_id
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=output_dir, token=token,
                                  commit_message=commit_message, ignore_patterns=list(ignore_patterns))
    return repo_id
