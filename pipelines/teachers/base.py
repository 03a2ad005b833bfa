"""The protocol every teacher adapter answers, and what all architectures share.

An adapter knows one diffusers pipeline family (which classes, how a prompt becomes conditioning, how the
denoiser is called, which blocks feed the discriminator, which scheduler the student ships with, how it is
exported). The training loops (``dmdx.training.loop``, ``dmdx.training.adp``) ask it these questions and know
nothing else about an architecture. Conditioning is a dict of batch-first tensors whose keys the adapter chooses;
``prompt_embeds`` and ``pooled_prompt_embeds`` are also the pipeline's own keyword names, so validation and export
call the stock pipeline with them.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from typing import Any

import torch

from dmdx.training.errors import UsageError

logger = logging.getLogger("dmdx")


def model_dtype(model) -> torch.dtype:
    """The dtype a denoiser's inputs are cast to: its weights' (a LoRA view: its frozen base's)."""
    return getattr(model, "module", model).dtype  # through a DDP wrapper


def read_model_index(path: str, what: str = "--pretrained_model_name_or_path", **load_kwargs) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, **load_kwargs))
    except Exception as e:  # noqa: BLE001 - a missing folder or a repo without model_index.json
        raise UsageError(f"{what} {path!r} is not a diffusers pipeline folder or Hub id (no readable "
                         f"model_index.json): {e}") from e


def transformer_block_names(spec: str | None, num_layers: int) -> list[str]:
    """``--discriminator_blocks`` as ``transformer_blocks`` indices (DiT teachers); default 4 evenly spaced ones
    including the last (the paper says "several blocks": docs/method.md#heads)."""
    n = num_layers
    try:
        indices = sorted({int(b) for b in spec.split(",")}) if spec else \
            sorted({round(i * (n - 1) / 3) for i in range(4)})
    except ValueError as e:
        raise UsageError(f"--discriminator_blocks {spec!r}: give comma-separated block indices.") from e
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UsageError(f"--discriminator_blocks {bad} out of range: the transformer has {n} blocks.")
    return [f"transformer_blocks.{i}" for i in indices]


class TeacherAdapter:
    """One architecture. Subclasses set the class attributes and implement the methods marked below."""

    pipeline_class: str = ""  # the stock pipeline class the teacher is, and the student ships as
    denoiser_name: str = ""  # the pipeline component that is distilled ("unet", "transformer")
    denoiser_class: str = ""
    lora_target_modules: tuple[str, ...] = ()
    sibling_script: str = ""  # named in the wrong-architecture error
    lora_in_diffusers_format: bool = False  # save_lora_weights takes peft keys, or (UNets) diffusers' converted ones
    video: bool = False  # samples are videos (lists of frames): GIF validation, the video model card

    def __init__(self, path: str, *, resolution: int = 1024, revision: str | None = None,
                 variant: str | None = None, cache_dir: str | None = None,
                 what: str = "--pretrained_model_name_or_path"):
        self.path, self.what, self.resolution = path, what, resolution
        self.load_kwargs = {"revision": revision, "cache_dir": cache_dir}
        self.variant = variant
        self.index = read_model_index(path, what, **self.load_kwargs)
        self.denoiser_config = self.read_config(self.denoiser_name)
        self.check_architecture()
        self.text_modules: dict[str, Any] = {}
        self.options: dict[str, Any] = {}  # an architecture's own constructor flags (see ``for_path``)

    # ---- configs only (no weights): every check runs before anything heavy --------------------------------------
    def read_config(self, subfolder: str) -> dict:
        from diffusers import AutoencoderKL

        if subfolder not in self.index:
            return {}
        try:  # load_config of any model class only reads the component's config.json
            return dict(AutoencoderKL.load_config(self.path, subfolder=subfolder, **self.load_kwargs))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{self.what} {self.path!r}: cannot read {subfolder}/config.json ({e}).") from e

    def check_architecture(self) -> None:
        """Raise :class:`UsageError` when the checkpoint is not this adapter's architecture (configs only)."""
        if self.index.get("_class_name") != self.pipeline_class or not self.is_my_denoiser(self.denoiser_config):
            raise UsageError(
                f"{self.what} {self.path!r} is a {self.index.get('_class_name')!r} whose "
                f"{self.denoiser_name or 'denoiser'} is a {self.denoiser_config.get('_class_name')!r}; this script "
                f"distills {self.pipeline_class} teachers ({self.sibling_script}).")

    def for_path(self, path: str, what: str):
        """The same adapter (same options) on another checkpoint, e.g. to check a generator folder's config."""
        return type(self)(path, what=what, resolution=self.resolution, revision=self.load_kwargs["revision"],
                          cache_dir=self.load_kwargs["cache_dir"], **self.options)

    def is_my_denoiser(self, config: dict) -> bool:  # subclasses
        raise NotImplementedError

    def vae_factor(self) -> int:
        return 2 ** (len(self.read_config("vae")["block_out_channels"]) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """The denoiser's input shape for ``resolution`` pixels; raises naming ``--resolution`` if it cannot take
        it. Subclasses check their own patching/downsampling."""
        factor = self.vae_factor()
        return (self.denoiser_config["in_channels"], resolution // factor, resolution // factor)

    def discriminator_blocks(self, spec: str | None) -> list[str]:  # subclasses: module names feeding the heads
        raise NotImplementedError

    def scheduler_config(self, path: str | None = None) -> dict:
        """A pipeline folder's scheduler config, whatever its class (only the file is read)."""
        from diffusers import DDPMScheduler

        return dict(DDPMScheduler.load_config(path or self.path, subfolder="scheduler", **self.load_kwargs))

    def teacher_schedule(self):
        from dmdx.training import schedule_from_scheduler_config

        return schedule_from_scheduler_config(self.scheduler_config())

    def default_student_scheduler(self, num_steps: int):  # subclasses: the few-step scheduler that ships
        raise NotImplementedError

    def student_scheduler(self, num_steps: int, generator_path: str | None = None):
        """The scheduler the student ships with: the generator folder's own when the generator starts from another
        pipeline (an ADP output), else this architecture's few-step default built on the teacher's config."""
        import diffusers

        if generator_path and os.path.abspath(generator_path) != os.path.abspath(self.path):
            config = self.scheduler_config(generator_path)
            cls = getattr(diffusers, config.get("_class_name", ""), None)
            if cls is None:
                raise UsageError(f"Unknown scheduler class {config.get('_class_name')!r} in {generator_path}.")
            return cls.from_config(config)
        return self.default_student_scheduler(num_steps)

    def provenance_fields(self) -> dict:
        """What besides ``--resolution`` fixes a run's shapes and conditioning (a resumed run must match it)."""
        return {}

    def check_prompts(self, prompts: list[str], what: str) -> None:
        """Warn (configs and tokenizers only, before any weights) about prompts the text encoder will truncate."""

    def text_components(self) -> list[str]:
        """The pipeline's text encoders and tokenizers this run uses (``model_index.json`` names, null ones left
        out); an adapter that runs without one (SD3's ``--drop_t5``) leaves it out."""
        return sorted(name for name, entry in self.index.items()
                      if name.startswith(("text_encoder", "tokenizer")) and isinstance(entry, (list, tuple))
                      and entry[0] is not None)

    def check_tokenizers(self) -> None:
        """Load every tokenizer this run needs (files only, no weights), so that a missing package stops the run
        before any denoiser loads: a T5 tokenizer shipped as ``spiece.model`` alone (no tokenizer.json) needs
        sentencepiece and protobuf to be read."""
        import importlib.util

        import transformers

        for name in self.text_components():
            if not name.startswith("tokenizer"):
                continue
            class_name = self.index[name][1]
            cls = getattr(transformers, class_name or "", None) or transformers.AutoTokenizer
            try:
                cls.from_pretrained(self.path, subfolder=name, **self.load_kwargs)
            except Exception as e:  # noqa: BLE001 - named with the folder and what to install
                missing = [m for m in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(
                    m.split(".")[0]) is None]
                hint = (f" A sentencepiece tokenizer (spiece.model) needs {' and '.join(missing)}: "
                        "`pip install -e .[train]` (see docs/gpus.md)." if missing else "")
                raise UsageError(f"{self.what} {self.path!r}: cannot load {name} ({class_name}): "
                                 f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}."
                                 f"{hint}") from e

    def text_fingerprint(self) -> dict:
        """What fixes the conditioning a prompt encodes to (the text-embedding cache is valid while it holds): the
        text encoders' and tokenizers' classes, their configs and tokenizer files, the encoders' weights (when
        they are on disk: a cache may be read from a teacher folder without them) and the adapter's text options.
        Values are strings; a component whose weights are absent is fingerprinted by its config alone."""
        from dmdx.training.text_cache import folder_fingerprint

        fingerprint = {"pipeline_class": self.pipeline_class, **{k: str(v) for k, v in self.text_options().items()}}
        local = os.path.isdir(self.path)
        for name in self.text_components():
            fingerprint[f"{name}.class"] = str(self.index[name][1])
            if not local:  # a Hub id: its name (and --revision) stands for its files
                fingerprint[name] = f"hub:{self.path}/{name}@{self.load_kwargs['revision'] or 'main'}"
            elif name.startswith("tokenizer"):
                fingerprint[name] = folder_fingerprint(self.path, name, weights=False)
            elif os.path.isdir(os.path.join(self.path, name)):
                # optional ("?"): checked where present, so a cache can be read with the encoders deleted
                fingerprint[f"{name}.config?"] = folder_fingerprint(self.path, name, weights=False)
                fingerprint[f"{name}.weights?"] = folder_fingerprint(self.path, name, weights=True)
        return fingerprint

    def text_options(self) -> dict:
        """The adapter's options that change how a prompt is encoded (e.g. ``max_sequence_length``)."""
        return {}

    def fixed_conditioning(self, n: int, device) -> dict[str, torch.Tensor]:
        """Conditioning that does not depend on the prompt (SDXL's added time ids), for ``n`` samples: the
        text-embedding cache leaves it out and the reader adds it back."""
        return {}

    def config_fingerprint(self) -> dict:
        """What identifies the teacher in a checkpoint's provenance: its pipeline class and denoiser config."""
        keep = {k: v for k, v in self.denoiser_config.items() if not k.startswith("_")}
        return {"pipeline_class": self.pipeline_class, "denoiser": keep}

    # ---- weights --------------------------------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32, path: str | None = None):
        import diffusers

        cls = getattr(diffusers, self.denoiser_class)
        path = path or self.path
        variant = self.variant if path == self.path else None
        return cls.from_pretrained(path, subfolder=self.denoiser_name, torch_dtype=dtype, variant=variant,
                                   **self.load_kwargs)

    def load_vae(self, device, dtype=torch.float32):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", variant=self.variant, **self.load_kwargs)
        return vae.requires_grad_(False).eval().to(device, dtype=dtype)

    def load_text_encoders(self, device, dtype, denoiser=None) -> None:  # subclasses fill self.text_modules
        raise NotImplementedError

    def free_text_encoders(self) -> None:
        from diffusers.training_utils import free_memory

        self.text_modules = {}
        free_memory()

    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:  # subclasses
        raise NotImplementedError

    def negative_conditioning(self, device) -> dict[str, torch.Tensor]:  # subclasses: CFG's empty prompt, batch 1
        raise NotImplementedError

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:  # subclasses
        """The denoiser's raw output at ``(x, t)`` under ``cond``, computed in its weights' dtype, returned fp32."""
        raise NotImplementedError

    def feature_selector(self, latent_shape):
        """Turns a hooked block's output into a (B, C, H, W) map for the discriminator heads."""
        from dmdx.training import first_tensor

        return first_tensor

    # ---- validation and export -------------------------------------------------------------------------------------
    def pipeline(self, denoiser, scheduler, vae=None):
        """The stock pipeline around ``denoiser`` without text encoders: it is called with precomputed
        ``prompt_embeds`` / ``pooled_prompt_embeds``."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        components = {name: None for name in self.index if not name.startswith("_")}
        components.update({self.denoiser_name: denoiser, "scheduler": scheduler, "vae": vae})
        accepted = inspect.signature(cls.__init__).parameters
        pipe = cls(**{k: v for k, v in components.items() if k in accepted})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, pipe, cond: dict, num_inference_steps: int, generator, resolution: int) -> list:
        """Samples of the stock pipeline ``pipe`` (:meth:`pipeline`) from precomputed conditioning, without CFG: a
        list of PIL images (video adapters: a list of frame lists), one per prompt."""
        return pipe(**{k: cond[k] for k in ("prompt_embeds", "pooled_prompt_embeds")},
                    num_inference_steps=num_inference_steps, guidance_scale=0.0, height=resolution, width=resolution,
                    generator=generator).images

    def export_dtype(self, weight_dtype):
        """dtype of the exported pipeline's weights."""
        return weight_dtype

    def export_components(self) -> dict:
        """Components the student ships differently from the teacher (e.g. SD3 without T5)."""
        return {}

    def export(self, output_dir: str, denoiser, scheduler, weight_dtype, lora_state: dict | None = None) -> None:
        """A stock pipeline folder: the teacher's components with ``denoiser`` and ``scheduler`` swapped in; with
        ``lora_state`` also ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights`` takes on the
        generator's base pipeline."""
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers

        from dmdx.pipelines.export import LORA_WEIGHT_NAME, save_student_pipeline

        dtype = self.export_dtype(weight_dtype)
        absent = {name: None for name in self.absent_text_encoders()}
        components = {self.denoiser_name: denoiser.to(dtype), **absent, **self.export_components()}
        save_student_pipeline(self.path, output_dir, components, scheduler, torch_dtype=dtype, variant=self.variant,
                              **self.load_kwargs)
        if lora_state:
            cls = getattr(diffusers, self.pipeline_class)
            tmp = tempfile.mkdtemp(prefix=".lora-", dir=output_dir)
            try:
                if self.lora_in_diffusers_format:
                    lora_state = convert_state_dict_to_diffusers(lora_state)
                cls.save_lora_weights(tmp, weight_name=LORA_WEIGHT_NAME, safe_serialization=True,
                                      **{f"{self.denoiser_name}_lora_layers": lora_state})
                os.replace(os.path.join(tmp, LORA_WEIGHT_NAME), os.path.join(output_dir, LORA_WEIGHT_NAME))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def absent_text_encoders(self) -> list[str]:
        """Text encoders the local teacher folder lists but does not hold (a run fed by the text-embedding cache
        needs none): the export ships them as null components, to be loaded from the teacher."""
        if not os.path.isdir(self.path):
            return []
        return [name for name in self.text_components()
                if name.startswith("text_encoder") and not os.path.isdir(os.path.join(self.path, name))]

    def card_extras(self) -> dict:
        """Model-card arguments this architecture adds (e.g. how to load a student shipped without T5). Here: how
        to load a student exported without the text encoders its teacher folder lacked (``absent_text_encoders``);
        subclasses add theirs to it (``merge_card_extras``)."""
        absent = self.absent_text_encoders()
        if not absent:
            return {}
        loads = ", ".join(f"`{name}={self.index[name][1]}.from_pretrained(<teacher>, subfolder=\"{name}\")`"
                          for name in absent)
        return {"extra_sections": {"Text encoders": (
            f"This student was trained from cached text embeddings and ships without {', '.join(absent)} (null in "
            f"`model_index.json`): pass the teacher's to `from_pretrained`, e.g. {loads} (transformers classes).")}}

    # ---- publishing: how the training loops reach the model card and the Hub (``dmdx.training`` never imports
    # ``dmdx.pipelines``; docs/design.md#imports). Each passes its arguments through unchanged.
    def training_hyperparameters(self, *args, **kwargs):
        from dmdx.pipelines.model_card import training_hyperparameters

        return training_hyperparameters(*args, **kwargs)

    def write_model_card(self, *args, **kwargs):
        from dmdx.pipelines.model_card import write_model_card

        return write_model_card(*args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        from dmdx.pipelines.hub import push_to_hub

        return push_to_hub(*args, **kwargs)


class PipelineT5Text:
    """The text path of teachers with one T5-family encoder whose stock pipeline encodes prompts itself (CogVideoX:
    T5; Wan: UMT5): ``encode_prompt`` of the stock pipeline, so the conditioning is exactly the pipeline's (padding,
    truncation, Wan's zeroing past each prompt's length); the empty prompt is CFG's negative, as both pipelines'
    default. Mixed into a :class:`TeacherAdapter` that sets ``max_sequence_length`` and ``text_encoder_label``."""

    text_encoder_label = "T5"

    def check_prompts(self, prompts: list[str], what: str) -> None:
        """Count the prompts the encoder will truncate at ``--max_sequence_length`` (the tokenizer only); the
        pipeline's encode_prompt truncates them and warns again when it encodes them."""
        import transformers

        name = (self.index.get("tokenizer") or [None, None])[1]
        cls = getattr(transformers, name or "", None) or transformers.AutoTokenizer
        try:
            tokenizer = cls.from_pretrained(self.path, subfolder="tokenizer", **self.load_kwargs)
        except Exception as e:  # noqa: BLE001 - the text pipeline will report it when it loads
            logger.warning("could not load the tokenizer to check prompt lengths: %s", e)
            return
        long = []
        for i in range(0, len(prompts), 1024):
            ids = tokenizer(prompts[i: i + 1024], add_special_tokens=True).input_ids
            long += [p for p, t in zip(prompts[i: i + 1024], ids) if len(t) > self.max_sequence_length]
        if long:
            logger.warning("%d of %d %s are longer than --max_sequence_length %d %s tokens and are truncated as "
                           "diffusers' %s truncates them, e.g. %r", len(long), len(prompts), what,
                           self.max_sequence_length, self.text_encoder_label, self.pipeline_class, long[0][:120])

    def text_options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def load_text_encoders(self, device, dtype, denoiser=None) -> None:
        """The stock pipeline (without its VAE) whose ``encode_prompt`` encodes the prompts."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        text_pipe = cls.from_pretrained(self.path, transformer=denoiser, vae=None, torch_dtype=dtype,
                                        variant=self.variant, **self.load_kwargs)
        text_pipe.set_progress_bar_config(disable=True)
        text_pipe.text_encoder.requires_grad_(False).eval().to(device)
        self.text_modules = {"pipe": text_pipe}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds = []
        for i in range(0, len(prompts), 16):
            e, _ = self.text_modules["pipe"].encode_prompt(
                prompts[i: i + 16], None, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length, device=device)
            embeds.append(e.float())
        return {"prompt_embeds": torch.cat(embeds)}

    def negative_conditioning(self, device) -> dict[str, torch.Tensor]:
        return self.encode_prompts([""], device)  # the pipelines' default negative prompt


def merge_card_extras(*extras: dict) -> dict:
    """Card extras of several sources in one: mappings (``pipeline_kwargs``, ``extra_sections``, ...) merged."""
    merged: dict = {}
    for extra in extras:
        for key, value in extra.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged
