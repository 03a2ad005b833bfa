"""Uploading a finished student folder to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder).

Everything before the two network calls is checked offline (``check_upload_folder``): the folder holds a pipeline
or LoRA weights and a ``README.md`` model card, and every file the card shows (its ``widget`` outputs, its images)
is among the files that will be uploaded.

A LoRA run's folder also holds the fused full pipeline, whose VAE and text encoders are the teacher's: for a gated
or non-redistributable teacher the user may not publish them. So a LoRA folder is published as the adapter alone
by default (``ADAPTER_FILES``: the weights, the student's scheduler, the card, its samples, the training config),
and the card's "complete pipeline" usage is taken out of what is uploaded."""

from __future__ import annotations

import os
import re

from .export import LORA_WEIGHT_NAME
from .model_card import LOCAL_NOTE, SAMPLES_DIR

DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", "checkpoint-*/**", ".export-*", "logs/**", "*.tmp")
# what an adapter-only upload of a LoRA student sends (the usage snippet loads the adapter and the scheduler)
ADAPTER_FILES = (LORA_WEIGHT_NAME, "README.md", "scheduler/*", f"{SAMPLES_DIR}/*", "training_config.json", "LICENSE*")
FULL_PIPELINE_BLOCK = re.compile(r"<!-- full-pipeline -->.*?<!-- /full-pipeline -->\n*", re.S)


def is_lora_folder(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, LORA_WEIGHT_NAME))


def upload_file_list(output_dir: str, ignore_patterns=DEFAULT_IGNORE_PATTERNS,
                     allow_patterns=None) -> list[str]:
    """The files (relative, ``/``-separated) that ``upload_folder(..., allow_patterns=..., ignore_patterns=...)``
    sends."""
    from huggingface_hub.utils import filter_repo_objects

    try:  # what upload_folder always leaves out (.git/, .cache/huggingface/)
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS as hub_defaults
    except ImportError:
        hub_defaults = []
    files = sorted(os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/")
                   for root, _, names in os.walk(output_dir) for name in names)
    return list(filter_repo_objects(files, allow_patterns=allow_patterns,
                                    ignore_patterns=[*ignore_patterns, *hub_defaults]))


def card_references(readme_path: str) -> list[str]:
    """Files of the repo a model card shows: its ``widget`` output urls and its relative Markdown images."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme_path, ignore_metadata_errors=True)
    refs = [w["output"]["url"] for w in card.data.get("widget") or []
            if isinstance(w, dict) and isinstance(w.get("output"), dict) and w["output"].get("url")]
    refs += re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card.text)
    return list(dict.fromkeys(r[2:] if r.startswith("./") else r for r in refs
                              if not re.match(r"^[a-z]+://", r)))


def check_upload_folder(output_dir: str, ignore_patterns=DEFAULT_IGNORE_PATTERNS, allow_patterns=None) -> list[str]:
    """Raise ``FileNotFoundError`` unless ``output_dir`` is ready to publish; return the files to upload."""
    files = upload_file_list(output_dir, ignore_patterns, allow_patterns)
    if "model_index.json" not in files and LORA_WEIGHT_NAME not in files:
        raise FileNotFoundError(f"{output_dir} holds no exported pipeline or LoRA weights to upload.")
    if "README.md" not in files:
        raise FileNotFoundError(f"{output_dir} holds no README.md model card (write_model_card writes it).")
    missing = [r for r in card_references(os.path.join(output_dir, "README.md")) if r not in files]
    if missing:
        raise FileNotFoundError(f"The model card shows files that would not be uploaded: {missing}.")
    return files


def point_card_at_repo(output_dir: str, repo_id: str, hub_model_id: str | None = None) -> bool:
    """Make the card's usage snippet load ``repo_id``: a snippet written for the local folder (or for
    ``hub_model_id`` before the Hub added the namespace) is rewritten in place. Returns whether it changed."""
    path = os.path.join(output_dir, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    refs = [hub_model_id] if hub_model_id and hub_model_id != repo_id else []
    if LOCAL_NOTE in text:
        refs.append(os.path.basename(os.path.normpath(os.path.abspath(output_dir))))
    new = text.replace(LOCAL_NOTE, "")
    for ref in refs:
        for call in ("from_pretrained(", "load_lora_weights("):
            new = new.replace(f'{call}"{ref}"', f'{call}"{repo_id}"')
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return True


def drop_full_pipeline_usage(output_dir: str) -> bool:
    """Take the card's "complete pipeline" usage (a LoRA folder's fused pipeline) out of ``README.md``: an
    adapter-only repo does not hold that pipeline. Returns whether the card changed."""
    path = os.path.join(output_dir, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = FULL_PIPELINE_BLOCK.sub("", text)
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return True


def inherit_teacher_licence(output_dir: str) -> bool:
    """A card written offline for a Hub teacher whose card was not in the local cache says ``license: other`` with
    no name. When publishing (online), read the teacher's card and put its licence on the student's card: the
    metadata and the Licence section. Returns whether the card changed."""
    from huggingface_hub import ModelCard

    from . import model_card

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path, ignore_metadata_errors=True)
    base = card.data.get("base_model")
    if card.data.get("license") != "other" or card.data.get("license_name") or not isinstance(base, str):
        return False
    lic = model_card.teacher_license(base)
    if not lic or (lic.get("license") == "other" and not lic.get("license_name")):
        return False
    lic.pop("license_file", None)
    data = card.data.to_dict() | lic
    lora = "lora" in (card.data.get("tags") or [])
    body = re.sub(r"(^## Licence\n\n).*\Z", lambda m: m.group(1) + model_card.licence_text(
        f"`{base}`", lora, lic, True) + "\n", card.text, flags=re.S | re.M)
    from huggingface_hub import ModelCardData

    ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{body}").save(path)
    return True


def push_to_hub(output_dir: str, hub_model_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload DMDX student", ignore_patterns=DEFAULT_IGNORE_PATTERNS,
                adapter_only: bool | None = None) -> str:
    """Create (or reuse) the model repo ``hub_model_id`` and upload ``output_dir`` (pipeline or LoRA weights, the
    model card and its sample images) without training checkpoints or logs. The folder is checked before any
    network call (``check_upload_folder``) and the card's usage snippet is pointed at the repo. Returns the repo id.
    The token defaults to the logged-in one (``hf auth login`` / ``HF_TOKEN``).

    ``adapter_only`` (default: True for a LoRA folder) uploads only ``ADAPTER_FILES``, never the teacher's VAE and
    text encoders that the fused pipeline beside the adapter holds; False uploads the whole folder. A card that
    could not read its Hub teacher's licence offline gets it now (``inherit_teacher_licence``)."""
    import huggingface_hub

    lora = is_lora_folder(output_dir)
    if adapter_only is None:
        adapter_only = lora
    if adapter_only and not lora:
        raise FileNotFoundError(f"adapter_only: {output_dir} holds no {LORA_WEIGHT_NAME}.")
    allow = list(ADAPTER_FILES) if adapter_only else None
    check_upload_folder(output_dir, ignore_patterns, allow)
    repo_id = huggingface_hub.create_repo(hub_model_id, token=token, private=private, exist_ok=True).repo_id
    point_card_at_repo(output_dir, repo_id, hub_model_id)
    inherit_teacher_licence(output_dir)  # online now: a licence the offline export could not read
    if adapter_only:
        drop_full_pipeline_usage(output_dir)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=output_dir, token=token,
                                  commit_message=commit_message, allow_patterns=allow,
                                  ignore_patterns=list(ignore_patterns))
    return repo_id
