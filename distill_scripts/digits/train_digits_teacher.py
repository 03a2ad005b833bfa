"""Train the embedded default's teacher: a tiny diffusion model of the real SDXL or SD3 (text-to-image) or CogVideoX
(text-to-video) architecture on scikit-learn's real handwritten digits, saved as a stock
``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``CogVideoXPipeline`` folder. The video teacher learns
the digits moving across the frame in a prompted direction (``moving_digits.py``: "a handwritten digit seven
moving left").

Order of work, as for the real models:
  1. build the components from configs (``dmdx.pipelines.tiny_components``; tokenizers in code, no downloads);
  2. train the ``AutoencoderKL`` on the digits (reconstruction + a small KL term), then set its ``scaling_factor``
     (and ``shift_factor`` for SD3) from the latents' statistics, as SD3's VAE does;
  3. train the denoiser with the teacher's own objective on the frozen VAE's latents:
     SDXL: epsilon-prediction DDPM over its 1000 timesteps, with text_time conditioning (pooled text embedding +
     original_size / crops / target_size time ids); SD3: rectified flow (velocity ``noise - x0``) with
     logit-normal noise levels; CogVideoX: v-prediction on its CogVideoXDDIMScheduler's zero-terminal-SNR schedule,
     with the rotary position embeddings the pipeline builds. Captions are dropped (10% by default) so
     classifier-free guidance works; an EMA copy of the denoiser is what gets saved;
  4. save with ``save_pretrained`` and check: samples for "a handwritten digit k" (25 steps, CFG) must be
     recognised by the digit classifier (``digit_classifier.py``), reported as ``prompt_accuracy``; for video, frame
     by frame, with the motion direction too (``direction_accuracy``).

The text encoders are tiny (1 layer) and stay frozen at their random initialisation: distinct prompts still give
distinct embeddings, and the denoiser learns to read them. Since there are only twelve distinct conditionings
(ten digits, the class-free caption, the empty prompt), their embeddings are computed once with the pipeline's own
``encode_prompt``, exactly as inference computes them.

Reproduce the committed teacher (see README.md in this folder for the measured numbers):

    python distill_scripts/digits/train_digits_teacher.py --architecture sdxl \
        --output_dir distill_scripts/digits/assets/digits-sdxl-teacher

The video teacher took two runs, the second continuing the first (``--init_from``); README.md in this folder has
both commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digit_classifier import ASSETS_DIR, load_classifier  # noqa: E402
from digits_data import CLASS_FREE_PROMPT, class_prompts, evaluation_prompts, load_digits_split, make_captions  # noqa: E402
from moving_digits import clip_scores, judge_clips, load_moving_digits, video_prompts  # noqa: E402

logger = logging.getLogger("train_digits_teacher")

INFO_NAME = "digits_teacher_info.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a tiny SDXL/SD3-architecture teacher on real digits.")
    parser.add_argument("--architecture", required=True, choices=["sdxl", "sd3", "cogvideox"])
    parser.add_argument("--output_dir", default=None,
                        help="Pipeline folder to write (default: distill_scripts/digits/assets/digits-<arch>-teacher).")
    parser.add_argument("--resolution", type=int, default=16, help="Pixel size; the VAE halves it.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init_from", default=None,
                        help="A teacher folder this script wrote: continue from its VAE and denoiser (the VAE is kept "
                             "as it is, with its latent normalisation, when --vae_train_steps is 0).")
    parser.add_argument("--vae_from", default=None,
                        help="A teacher folder this script wrote: start from its VAE only (kept as it is, with its "
                             "latent normalisation, when --vae_train_steps is 0); the denoiser and text encoder are "
                             "built fresh. Compares denoiser recipes on one VAE.")
    # text path (CogVideoX)
    parser.add_argument("--text_vocabulary", default="characters", choices=["characters", "words"],
                        help="CogVideoX's T5 tokenizer: 'characters' (one piece per character, as "
                             "tiny_components builds it) or 'words' (the same pieces plus one piece per word of the "
                             "training prompts, as a real T5 vocabulary has for common words; the T5 is rebuilt, "
                             "seeded, for the larger vocabulary). See README.md in this folder.")
    parser.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=False,
                        help="CogVideoX: train the T5 with the denoiser (same optimiser, EMA and lr) instead of "
                             "keeping it at its random initialisation; it is saved with the pipeline.")
    # data
    parser.add_argument("--class_free_fraction", type=float, default=0.2,
                        help="Share of images captioned with the class-free prompt 'a handwritten digit'.")
    parser.add_argument("--caption_dropout", type=float, default=0.1,
                        help="Probability of replacing a caption by the unconditional input (for CFG).")
    # VAE
    parser.add_argument("--vae_train_steps", type=int, default=400)
    parser.add_argument("--vae_learning_rate", type=float, default=1e-3)
    parser.add_argument("--vae_kl_weight", type=float, default=1e-4)
    parser.add_argument("--vae_batch_size", type=int, default=64)
    # denoiser
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64],
                        help="SDXL UNet widths (one per resolution level).")
    parser.add_argument("--sd3_num_layers", type=int, default=2, help="MMDiT joint blocks.")
    parser.add_argument("--sd3_num_attention_heads", type=int, default=4)
    parser.add_argument("--sd3_attention_head_dim", type=int, default=16)
    parser.add_argument("--sd3_patch_size", type=int, default=1,
                        help="MMDiT patch size (SD3's own is 2; at 8x8 latents 2 measured worse, see README.md).")
    parser.add_argument("--sd3_shift", type=float, default=1.0,
                        help="Timestep shift of the SD3 teacher's FlowMatchEulerDiscreteScheduler.")
    parser.add_argument("--cogvideox_num_layers", type=int, default=2, help="CogVideoX transformer blocks.")
    parser.add_argument("--cogvideox_num_attention_heads", type=int, default=4)
    parser.add_argument("--cogvideox_attention_head_dim", type=int, default=16,
                        help="A multiple of 8 (rotary embeddings split it over time, height and width).")
    parser.add_argument("--cogvideox_rotary", action=argparse.BooleanOptionalAction, default=True,
                        help="Rotary position embeddings (CogVideoX-5b style); --no-cogvideox_rotary adds fixed 3-D "
                             "sin-cos positions to the video tokens instead (CogVideoX-2b style).")
    parser.add_argument("--cogvideox_patch_size", type=int, default=1,
                        help="Spatial patch size (CogVideoX's own is 2; 1 keeps a token per latent pixel at 8x8).")
    parser.add_argument("--num_frames", type=int, default=9,
                        help="Video frames (CogVideoX); (num_frames - 1) must be even (the VAE halves time).")
    parser.add_argument("--clip_offsets", default="random", choices=["random", "centre"],
                        help="Position of each training clip's digit across its motion: drawn per clip, or the "
                             "frame's centre line (the prompt then fixes the whole path; digits/README.md).")
    parser.add_argument("--clips_per_digit", type=int, default=4,
                        help="Video clips made of each train digit (directions cycle; see --clip_offsets).")
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", default="cosine",
                        choices=["constant", "constant_with_warmup", "cosine", "linear"])
    parser.add_argument("--lr_warmup_steps", type=int, default=200)
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    # check
    parser.add_argument("--validation_steps", type=int, default=25, help="Sampler steps of the final check.")
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--num_validation_images", type=int, default=20, help="Per class prompt.")
    parser.add_argument("--classifier_dir", default=ASSETS_DIR)
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = os.path.join(ASSETS_DIR, f"digits-{args.architecture}-teacher")
    if args.resolution % 4 != 0:
        raise ValueError(f"--resolution must be a multiple of 4 (the VAE and the UNet each halve it), "
                         f"got {args.resolution}.")
    if not 0 <= args.caption_dropout < 1:
        raise ValueError("--caption_dropout must lie in [0, 1).")
    if args.architecture != "cogvideox" and (args.text_vocabulary != "characters" or args.train_text_encoder):
        raise ValueError("--text_vocabulary words and --train_text_encoder are for --architecture cogvideox.")
    if args.vae_from is not None and args.init_from is not None:
        raise ValueError("--vae_from and --init_from both give a VAE; pass one.")
    if args.architecture == "cogvideox" and (args.num_frames < 3 or args.num_frames % 2 == 0 or args.num_frames > 9):
        raise ValueError(f"--num_frames {args.num_frames}: the VAE halves time, so it must be odd, and a digit "
                         f"moving a pixel per frame crosses the 16px frame in at most 9 frames: 3, 5, 7 or 9.")
    return args


# ---- components -------------------------------------------------------------------------------------------------
def build_pipeline(args):
    from diffusers import CogVideoXPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from dmdx.pipelines.tiny_components import cogvideox_components, sd3_components, sdxl_components

    latent_size = args.resolution // 2
    if args.architecture == "cogvideox":
        comps = cogvideox_components(sample_size=latent_size, sample_frames=args.num_frames,
                                     num_layers=args.cogvideox_num_layers, patch_size=args.cogvideox_patch_size,
                                     attention_head_dim=args.cogvideox_attention_head_dim,
                                     num_attention_heads=args.cogvideox_num_attention_heads,
                                     use_rotary_positional_embeddings=args.cogvideox_rotary, seed=args.seed)
        pipe = CogVideoXPipeline(**comps)
        if args.text_vocabulary == "words":
            word_level_text_path(pipe, [prompt for prompt, _, _ in video_prompts()], args.seed)
    elif args.architecture == "sdxl":
        comps = sdxl_components(sample_size=latent_size, block_out_channels=tuple(args.block_out_channels),
                                vae_block_out_channels=(32, 64), seed=args.seed)
        pipe = StableDiffusionXLPipeline(**comps)
    else:
        comps = sd3_components(sample_size=latent_size, num_layers=args.sd3_num_layers,
                               patch_size=args.sd3_patch_size, attention_head_dim=args.sd3_attention_head_dim,
                               num_attention_heads=args.sd3_num_attention_heads, vae_block_out_channels=(32, 64),
                               shift=args.sd3_shift, with_t5=True, seed=args.seed)
        pipe = StableDiffusion3Pipeline(**comps)
    return frozen_text_encoders(pipe)


def word_level_text_path(pipe, prompts, seed):
    """Give the T5 tokenizer one piece per word of ``prompts`` (scored above any spelling of the word, so the
    unigram tokenizer picks it), keeping every character piece and its id, and rebuild the T5 (seeded, random, its
    config otherwise unchanged) for the larger vocabulary.

    Why: CogVideoX's transformer gives text tokens no position (its rotary embeddings cover the video tokens only),
    and the random 1-layer T5 adds little context, so with one piece per character the denoiser reads a prompt
    nearly as a bag of characters, in which "seven" and "six" (or "one", whose letters all occur in "handwritten
    ... moving") differ by one or two of ~32 tokens. A word piece makes the digit one token of its own, as a real
    T5 vocabulary does for common words."""
    import json as _json

    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = pipe.tokenizer
    pieces = [tuple(p) for p in _json.loads(tok.backend_tokenizer.to_str())["model"]["vocab"]]
    known = {p for p, _ in pieces}
    words = sorted({w for prompt in prompts for w in prompt.split()})
    pieces += [("\u2581" + w, 0.0) for w in words if "\u2581" + w not in known]
    word_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=tok.model_max_length,
                               pad_token=tok.pad_token, eos_token=tok.eos_token, unk_token=tok.unk_token)
    config = T5Config(**{**pipe.text_encoder.config.to_dict(), "vocab_size": len(pieces)})
    torch.manual_seed(seed)
    pipe.register_modules(tokenizer=word_tok, text_encoder=T5EncoderModel(config).eval())
    return pipe


def load_pipeline(path: str):
    """A teacher folder of this script's (``--init_from``), text encoders frozen as ``build_pipeline`` leaves them."""
    from diffusers import DiffusionPipeline

    return frozen_text_encoders(DiffusionPipeline.from_pretrained(path))


def frozen_text_encoders(pipe):
    """The text encoders stay at their seeded random initialisation (the denoiser learns to read them), unless
    ``--train_text_encoder`` (``train_denoiser`` then unfreezes CogVideoX's T5)."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).eval()
    return pipe


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


# ---- 2. the VAE -------------------------------------------------------------------------------------------------
def train_vae(args, vae, images, known_mse=None):
    """``images`` (N, 3, H, W), or video clips (N, F, 3, H, W) (the 3-D VAE takes (B, 3, F, H, W); its latents come
    back as the pipeline keeps them, (N, F', C, h, w)). ``known_mse``: the reconstruction MSE a kept VAE (0 steps)
    was measured at on these images, reused rather than decoding them all again."""
    from tqdm.auto import tqdm

    video = images.ndim == 5
    if video:
        images = images.transpose(1, 2)

    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.vae_train_steps)
    gen = torch.Generator().manual_seed(args.seed)
    for step in (bar := tqdm(range(args.vae_train_steps), desc="1/2 VAE")):
        idx = torch.randint(0, len(images), (args.vae_batch_size,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_sched.step()
        if step % 50 == 0 or step == args.vae_train_steps - 1:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
        if known_mse is not None and args.vae_train_steps == 0:  # an unchanged VAE: skip the decoding pass
            rec_mse = known_mse
        else:
            recon = torch.cat([vae.decode(latents[i:i + 256]).sample for i in range(0, len(latents), 256)])
            rec_mse = F.mse_loss(recon, images).item()
    return (latents.transpose(1, 2) if video else latents), rec_mse


def set_latent_normalisation(args, vae, latents):
    """SDXL: ``latents * scaling_factor`` has unit std. SD3: ``(latents - shift_factor) * scaling_factor``."""
    if args.architecture == "sd3":
        shift = latents.mean().item()
        scale = 1.0 / (latents - shift).std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        return (latents - shift) * scale
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    return latents * scale


# ---- conditioning -----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_conditionings(args, pipe, prompts):
    """Per prompt (plus the two unconditional forms: the empty prompt and all-zero embeddings), the pipeline's own
    prompt encoding: ``{"prompt_embeds": (P, L, D), "pooled": (P, Dp)}``; the last two rows are "" and zeros.
    CogVideoX has no pooled embedding, and its pipeline's unconditional input is the encoded "" (never zeros), so
    its last row repeats "" and "pooled" is empty."""
    embeds, pooled = [], []
    for prompt in list(prompts) + [""]:
        if args.architecture == "cogvideox":
            e, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                      max_sequence_length=pipe.transformer.config.max_text_seq_length, device="cpu")
            embeds.append(e[0])
            pooled.append(torch.zeros(0))
            continue
        if args.architecture == "sdxl":
            e, _, p, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
        else:
            e, _, p, _ = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None, device="cpu",
                                            num_images_per_prompt=1, do_classifier_free_guidance=False)
        embeds.append(e[0])
        pooled.append(p[0])
    embeds.append(embeds[-1].clone() if args.architecture == "cogvideox" else torch.zeros_like(embeds[-1]))
    pooled.append(torch.zeros_like(pooled[-1]))
    return {"prompt_embeds": torch.stack(embeds), "pooled": torch.stack(pooled)}


def sdxl_time_ids(args, batch_size):
    """SDXL's micro-conditioning: original_size, crops_coords_top_left, target_size (what the pipeline passes
    for a default call at this resolution)."""
    r = args.resolution
    return torch.tensor([r, r, 0, 0, r, r], dtype=torch.float32).repeat(batch_size, 1)


def denoiser_forward(args, model, x_t, t, prompt_embeds, pooled, rotary=None):
    if args.architecture == "cogvideox":
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds,
                     image_rotary_emb=rotary).sample
    if args.architecture == "sdxl":
        cond = {"text_embeds": pooled, "time_ids": sdxl_time_ids(args, x_t.shape[0])}
        return model(x_t, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=cond).sample
    return model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled).sample


# ---- 3. the denoiser --------------------------------------------------------------------------------------------
def sample_timesteps(args, schedule, batch_size, gen):
    if args.architecture in ("sdxl", "cogvideox"):  # DDPM family: uniform over the integer training timesteps
        return torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=gen).float()
    # rectified flow: logit-normal noise levels (SD3's default weighting), then the teacher's shift
    sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
    sigma = args.sd3_shift * sigma / (1 + (args.sd3_shift - 1) * sigma)
    return sigma * schedule.T


def text_encoder_inputs(args, pipe, prompts):
    """Token ids of ``prompts`` and "" exactly as CogVideoXPipeline tokenizes them (``max_length`` padding, no
    attention mask), for training the T5 with the denoiser."""
    return pipe.tokenizer(list(prompts) + [""], padding="max_length", truncation=True, add_special_tokens=True,
                          max_length=pipe.transformer.config.max_text_seq_length, return_tensors="pt").input_ids


def train_denoiser(args, pipe, latents, cond_index, conds, num_prompts, text_ids=None):
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from dmdx.training import per_sample_mean, schedule_from_scheduler_config

    schedule = schedule_from_scheduler_config(pipe.scheduler)
    model = denoiser_of(pipe)
    rotary = None
    if args.architecture == "cogvideox" and model.config.use_rotary_positional_embeddings:
        # exactly the embeddings CogVideoXPipeline builds for this size and latent frame count
        rotary = pipe._prepare_rotary_positional_embeddings(args.resolution, args.resolution, latents.shape[1], "cpu")
    model.train().requires_grad_(True)
    params = list(model.parameters())
    text_encoder = pipe.text_encoder if text_ids is not None else None
    if text_encoder is not None:  # --train_text_encoder: one optimiser and one EMA over both
        text_encoder.train().requires_grad_(True)
        params += list(text_encoder.parameters())
    ema = EMAModel(params, decay=args.ema_decay, model_cls=type(model), model_config=model.config) \
        if args.use_ema else None
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    lr_sched = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                             num_training_steps=args.max_train_steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    empty_idx, zeros_idx = num_prompts, num_prompts + 1
    running = None
    for step in (bar := tqdm(range(args.max_train_steps), desc="2/2 denoiser")):
        idx = torch.randint(0, len(latents), (args.train_batch_size,), generator=gen)
        x0, c = latents[idx], cond_index[idx].clone()
        # caption dropout: half of the dropped captions become the empty prompt, half all-zero embeddings
        # (SDXL pipelines zero the negative embeddings when force_zeros_for_empty_prompt is set)
        drop = torch.rand(len(c), generator=gen) < args.caption_dropout
        zeros = torch.rand(len(c), generator=gen) < 0.5
        c[drop & zeros], c[drop & ~zeros] = zeros_idx, empty_idx
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(args, schedule, len(x0), gen)
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.model_target(x0, noise, t)
        prompt_embeds = conds["prompt_embeds"]
        if text_encoder is not None:  # encoded now; the last row repeats "" (as in encode_conditionings)
            encoded = text_encoder(text_ids)[0]
            prompt_embeds = torch.cat([encoded, encoded[-1:]])
        pred = denoiser_forward(args, model, x_t, t, prompt_embeds[c], conds["pooled"][c], rotary)
        loss = per_sample_mean((pred - target) ** 2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite denoising loss at step {step}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_sched.step()
        if ema is not None:
            ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == args.max_train_steps - 1:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
    if ema is not None:
        ema.copy_to(params)
    model.eval().requires_grad_(False)
    if text_encoder is not None:
        text_encoder.eval().requires_grad_(False)
    return running


# ---- 4. check ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_prompt_accuracy(args, pipe, classifier):
    """Classifier accuracy on ``num_validation_images`` samples per class prompt (25 steps, CFG)."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    correct, per_class = 0, []
    for k, prompt in enumerate(tqdm(class_prompts(), desc="check")):
        gen = torch.Generator().manual_seed(args.seed + k)
        images = pipe(prompt, num_inference_steps=args.validation_steps, guidance_scale=args.guidance_scale,
                      num_images_per_prompt=args.num_validation_images, generator=gen, output_type="pt").images
        pred = classifier(images * 2 - 1).argmax(1)
        per_class.append((pred == k).float().mean().item())
        correct += (pred == k).sum().item()
    gen = torch.Generator().manual_seed(args.seed + 10)
    images = pipe(CLASS_FREE_PROMPT, num_inference_steps=args.validation_steps, guidance_scale=args.guidance_scale,
                  num_images_per_prompt=5 * args.num_validation_images, generator=gen, output_type="pt").images
    counts = torch.bincount(classifier(images * 2 - 1).argmax(1), minlength=10)
    return correct / (10 * args.num_validation_images), per_class, counts.tolist()


@torch.no_grad()
def check_video_accuracy(args, pipe, classifier):
    """Frame-level prompt accuracy (overall and per digit) and motion-direction accuracy on
    ``num_validation_images`` clips per video prompt (``validation_steps``, CFG), judged as ``evaluate.py`` judges
    them (``moving_digits.judge_clips``)."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    judged = []
    for i, (prompt, _, _) in enumerate(tqdm(video_prompts(), desc="check")):
        gen = torch.Generator().manual_seed(args.seed + i)
        # the prompt repeated: CogVideoXPipeline ignores num_videos_per_prompt (diffusers 0.42)
        clips = pipe([prompt] * args.num_validation_images, num_inference_steps=args.validation_steps,
                     guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                     num_frames=args.num_frames, generator=gen, output_type="pt",
                     max_sequence_length=pipe.transformer.config.max_text_seq_length).frames
        judged.append(judge_clips(classifier, clips))
    scores = clip_scores(judged)
    return sum(scores["accuracy"]) / len(judged), scores["per_class"], sum(scores["direction"]) / len(judged)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    classifier = load_classifier(args.classifier_dir)  # fail early if the judge is missing
    start = time.time()

    # 1. components and data
    pipe = build_pipeline(args) if args.init_from is None else load_pipeline(args.init_from)
    if args.init_from is not None and args.text_vocabulary == "words" and \
            "\u2581digit" not in pipe.tokenizer.get_vocab():  # a character-level teacher moved to word pieces
        word_level_text_path(pipe, [prompt for prompt, _, _ in video_prompts()], args.seed)
    if args.vae_from is not None:
        pipe.register_modules(vae=type(pipe.vae).from_pretrained(args.vae_from, subfolder="vae"))
    if args.architecture == "cogvideox":  # clips of the train digits moving, captioned with their direction
        images, labels, _, captions = load_moving_digits("train", args.num_frames, args.clips_per_digit, args.seed,
                                                          offsets=args.clip_offsets)
        prompts = [prompt for prompt, _, _ in video_prompts()]
    else:
        images, labels = load_digits_split("train", args.resolution)
        captions = make_captions(labels.numpy(), args.class_free_fraction, args.seed)
        prompts = evaluation_prompts()
    cond_index = torch.tensor([prompts.index(c) for c in captions])
    logger.info("%d train digits at %dpx; %d captions class-free; architecture %s", len(images), args.resolution,
                sum(c == CLASS_FREE_PROMPT for c in captions), args.architecture)

    # 2. VAE, then latent normalisation
    source = args.init_from or args.vae_from
    known_mse = None
    if source is not None and os.path.exists(os.path.join(source, INFO_NAME)):
        with open(os.path.join(source, INFO_NAME)) as f:
            known_mse = json.load(f).get("vae_reconstruction_mse")
    raw_latents, rec_mse = train_vae(args, pipe.vae, images, known_mse)
    if (args.init_from or args.vae_from) is not None and args.vae_train_steps == 0:  # kept with its normalisation
        latents = (raw_latents - (pipe.vae.config.get("shift_factor") or 0.0)) * pipe.vae.config.scaling_factor
    else:
        latents = set_latent_normalisation(args, pipe.vae, raw_latents)
    logger.info("VAE reconstruction MSE %.5f; latents %s, scaling_factor %.4f", rec_mse, tuple(latents.shape[1:]),
                pipe.vae.config.scaling_factor)
    vae_seconds = time.time() - start

    # 3. denoiser with the teacher's own objective
    conds = encode_conditionings(args, pipe, prompts)
    text_ids = text_encoder_inputs(args, pipe, prompts) if args.train_text_encoder else None
    final_loss = train_denoiser(args, pipe, latents, cond_index, conds, len(prompts), text_ids)
    train_seconds = time.time() - start
    logger.info("trained in %.1f s (VAE %.1f s); final denoising loss %.4f", train_seconds, vae_seconds, final_loss)

    # save (atomically: write next to the target, then move into place)
    tmp_dir = args.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe.save_pretrained(tmp_dir)

    # 4. check from the saved folder with stock diffusers
    from diffusers import DiffusionPipeline

    reloaded = DiffusionPipeline.from_pretrained(tmp_dir)
    if args.architecture == "cogvideox":
        acc, per_class, direction_acc = check_video_accuracy(args, reloaded, classifier)
        extra = {"direction_accuracy": round(direction_acc, 4), "num_frames": args.num_frames}
    else:
        acc, per_class, class_free_counts = check_prompt_accuracy(args, reloaded, classifier)
        extra = {"class_free_prompt_class_counts": class_free_counts}
    info = {
        "architecture": args.architecture, "pipeline_class": type(reloaded).__name__,
        "prompt_accuracy": round(acc, 4), "per_class_accuracy": [round(a, 3) for a in per_class], **extra,
        "check": {"num_inference_steps": args.validation_steps, "guidance_scale": args.guidance_scale,
                  "images_per_class": args.num_validation_images},
        "vae_reconstruction_mse": round(rec_mse, 6), "final_denoising_loss": round(final_loss, 5),
        "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
        "args": {k: v for k, v in vars(args).items() if k not in ("output_dir", "classifier_dir")},
    }
    with open(os.path.join(tmp_dir, INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)
    os.replace(tmp_dir, args.output_dir)
    logger.info("prompt accuracy %.3f (per class %s); %s", acc, [round(a, 2) for a in per_class], extra)
    logger.info("saved %s to %s", type(reloaded).__name__, args.output_dir)
    return info


if __name__ == "__main__":
    main()
