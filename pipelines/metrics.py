"""Sample-quality metrics for distilled students, on any prompt set (``distill_scripts/evaluate.py``'s general mode).

Every metric model loads through transformers' ``from_pretrained`` from a Hub id or a local folder, so a test's
tiny random-weight model saved with ``save_pretrained`` goes through the same code as ``facebook/dinov2-large``.
Images are PIL images (or HWC uint8 arrays); videos are lists of frames. No torchvision: the image processors run
their PIL backend.

Distribution distances follow Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics",
arXiv 2306.04675), who recommend the Frechet distance in DINOv2 features over Inception FID; measured against
the teacher's own samples for the same prompts and seeds it is the "FID to teacher" distillation papers report.
CLIP score is torchmetrics' definition; PickScore is Kirstain et al. 2023's preference model; subject consistency
is VBench's (Huang et al. 2023, arXiv 2311.17982), computed here in DINOv2 features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_DINOV2_MODEL = "facebook/dinov2-large"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


# ---- distances between feature sets --------------------------------------------------------------------------------
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples):
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``, the formula of FID (Heusel et al. 2017) in whatever
    features it is given. 0 for identical sets; small sets bias it upwards, so compare at equal sample counts."""
    from scipy import linalg

    feats_a, feats_b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(feats_a, rowvar=False)), np.atleast_2d(np.cov(feats_b, rowvar=False))
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    # clipped at 0: identical sets give -1e-7 from sqrtm's rounding
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)))


def mean_pairwise_distance(feats: torch.Tensor) -> float:
    """Mean Euclidean distance over all ordered pairs of distinct rows of ``feats`` (N >= 2)."""
    feats = torch.as_tensor(feats).double()
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples, got {n}.")
    return float(torch.cdist(feats, feats).sum() / (n * (n - 1)))


def diversity(feats_by_prompt: Sequence[torch.Tensor]) -> float:
    """Within-prompt diversity: the mean pairwise feature distance among one prompt's samples, averaged over the
    prompts. A collapsed student (the same image for every seed) scores 0; ``evaluate.py`` reports it relative to
    the reference pipeline's (1.0 = as diverse as the teacher), the feature-space analogue of the paper's LPIPS
    diversity."""
    return float(np.mean([mean_pairwise_distance(f) for f in feats_by_prompt]))


# ---- feature models --------------------------------------------------------------------------------------------------
def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _tensor(output) -> torch.Tensor:
    """transformers >= 5 returns a model output from ``get_*_features`` (the projection in ``pooler_output``);
    earlier versions return the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _Encoder:
    """A transformers model and its processor, loaded with ``from_pretrained`` from a Hub id or a folder."""

    def __init__(self, model_name_or_path: str, processor_name_or_path: str | None = None, model_class=None,
                 processor_class=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32):
        self.name = str(model_name_or_path)
        self.model = model_class.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
        self.processor = processor_class.from_pretrained(processor_name_or_path or model_name_or_path)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def _pixels(self, images) -> torch.Tensor:
        processor = getattr(self.processor, "image_processor", self.processor)
        pixels = processor(images=[_as_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def _batches(self, items):
        for start in range(0, len(items), self.batch_size):
            yield items[start:start + self.batch_size]


class DINOv2Features(_Encoder):
    """DINOv2 image features: the final layer-normed CLS token (``pooler_output`` of ``Dinov2Model``), the
    representation Stein et al. 2023 compute FD_DINOv2 in (ViT-L/14 at 224 px: ``facebook/dinov2-large``)."""

    def __init__(self, model_name_or_path: str = DEFAULT_DINOV2_MODEL, **kwargs):
        from transformers import AutoImageProcessor, AutoModel

        super().__init__(model_name_or_path, model_class=AutoModel, processor_class=AutoImageProcessor, **kwargs)

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        """(N, D) float64 features on the CPU."""
        out = [self.model(pixel_values=self._pixels(batch)).pooler_output.double().cpu()
               for batch in self._batches(list(images))]
        return torch.cat(out)


class CLIPFeatures(_Encoder):
    """A CLIP model's projected image and text embeddings (``CLIPModel.get_image_features`` /
    ``get_text_features``), texts truncated to the tokenizer's length (77 for CLIP)."""

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP_MODEL, processor_name_or_path: str | None = None,
                 **kwargs):
        from transformers import AutoModel, AutoProcessor

        super().__init__(model_name_or_path, processor_name_or_path, model_class=AutoModel,
                         processor_class=AutoProcessor, **kwargs)

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        """(N, D) float64 image embeddings on the CPU (not normalised: FD in CLIP features uses them as they are)."""
        return torch.cat([_tensor(self.model.get_image_features(pixel_values=self._pixels(batch))).double().cpu()
                          for batch in self._batches(list(images))])

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float64 text embeddings on the CPU."""
        out = []
        for batch in self._batches([str(t) for t in texts]):
            tokens = self.processor.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(_tensor(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"])).double().cpu())
        return torch.cat(out)


def clip_score(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score, torchmetrics' ``CLIPScore``: ``100 * max(cos(image embedding, text embedding), 0)``,
    in [0, 100]; row i of ``image_feats`` is paired with row i of ``text_feats``. Report its mean."""
    cos = torch.nn.functional.cosine_similarity(image_feats.double(), text_feats.double(), dim=-1)
    return 100 * cos.clamp(min=0)


class CLIPScore:
    """CLIP score of images against their prompts (:func:`clip_score` with a :class:`CLIPFeatures` model)."""

    def __init__(self, features: CLIPFeatures):
        self.features = features

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score pairs each image with its prompt: {len(images)} images, "
                             f"{len(prompts)} prompts.")
        return clip_score(self.features.image_features(images), self.features.text_features(prompts))


class PickScore:
    """PickScore (Kirstain et al. 2023, arXiv 2305.01569): a CLIP-shaped model fine-tuned on human preferences;
    the score of an image for a prompt is ``logit_scale.exp() * cos(image embedding, text embedding)`` (about
    20-23 for good images with ``yuvalkirstain/PickScore_v1``, whose processor is
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s)."""

    def __init__(self, model_name_or_path: str = DEFAULT_PICKSCORE_MODEL, processor_name_or_path: str | None = None,
                 **kwargs):
        self.features = CLIPFeatures(model_name_or_path, processor_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"PickScore pairs each image with its prompt: {len(images)} images, "
                             f"{len(prompts)} prompts.")
        cos = torch.nn.functional.cosine_similarity(self.features.image_features(images),
                                                    self.features.text_features(prompts), dim=-1)
        return float(self.features.model.logit_scale.detach().exp()) * cos


# ---- video -----------------------------------------------------------------------------------------------------------
def subject_consistency(frame_feats: torch.Tensor) -> float:
    """VBench's subject consistency of one clip from its (F, D) per-frame features: for every frame t >= 1 the mean
    of ``max(cos(f_t, f_{t-1}), 0)`` and ``max(cos(f_t, f_0), 0)``, averaged over t. 1.0 when every frame has the
    same features (a frozen clip scores 1 too: read it beside :func:`motion_magnitude`)."""
    feats = torch.as_tensor(frame_feats).double()
    if feats.shape[0] < 2:
        raise ValueError("subject_consistency needs at least 2 frames.")
    cos = torch.nn.functional.cosine_similarity
    to_previous = cos(feats[1:], feats[:-1], dim=-1).clamp(min=0)
    to_first = cos(feats[1:], feats[:1].expand_as(feats[1:]), dim=-1).clamp(min=0)
    return float(((to_previous + to_first) / 2).mean())


def motion_magnitude(frames) -> float:
    """Mean absolute difference between consecutive frames, pixels in [0, 1]: 0 for a frozen clip. ``frames``:
    a list of PIL images / HWC uint8 arrays, or a float (F, ...) array in [0, 1]."""
    if isinstance(frames, (list, tuple)):
        arr = np.stack([np.asarray(_as_pil(f), dtype=np.float64) / 255.0 for f in frames])
    else:
        arr = np.asarray(frames, dtype=np.float64)
    if arr.shape[0] < 2:
        raise ValueError("motion_magnitude needs at least 2 frames.")
    return float(np.abs(np.diff(arr, axis=0)).mean())
