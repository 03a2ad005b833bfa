"""--gradient_checkpointing_frozen_passes: the fake score's ODE step and the discriminator's backbone pass in ADM's
generator update (parameters frozen, gradient through their inputs to the generator) recompute their blocks in the
backward. The generator's gradient must be what it is without it (fp32, one iteration of the real loop on a tiny
SD3 teacher), for full roles and for LoRA roles that share the teacher's module (whose adapters switch between
passes: a block recomputed under another role's adapter would change the gradient), and the tensors the iteration
keeps for its backward must shrink."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import REPO, TINY_PROMPTS


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import sd3_components

    path = tmp_path_factory.mktemp("frozen_ckpt") / "sd3"
    parts = sd3_components(sample_size=8, num_layers=3, with_t5=False)
    StableDiffusion3Pipeline(**{k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
                             ).save_pretrained(path)
    (path.parent / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    return str(path)


def _parse(argv: list[str]):
    spec = importlib.util.spec_from_file_location("train_adm_sd3", os.path.join(REPO, "distill_scripts",
                                                                                "train_adm_sd3.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


class _Prompts:
    """The training prompts' conditioning, encoded once (what train_iteration asks of a prompt source)."""

    def __init__(self, adapter, prompts):
        self.negative = adapter.negative_conditioning("cpu")
        self.embeds = adapter.encode_prompts(prompts, "cpu")
        self.count = len(prompts)

    def batch(self, idx):
        n = idx.shape[0]
        return ({k: v[idx] for k, v in self.embeds.items()},
                {k: v.expand(n, *v.shape[1:]) for k, v in self.negative.items()})


def _iteration(teacher: str, tmp, *flags: str) -> tuple[dict, dict, int]:
    """Two iterations (fake score, generator, D updates); returns the second's generator gradients (captured as they
    are accumulated, before its optimizer step), its logged losses and the bytes of tensors autograd saved in it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmdx.pipelines.teachers import SD3Teacher
    from dmdx.training.loop import build_discriminator, build_models, prepare_models, train_iteration

    AcceleratorState._reset_state(True)
    args = _parse(["--pretrained_model_name_or_path", teacher, "--prompts_file",
                   os.path.join(os.path.dirname(teacher), "prompts.txt"), "--output_dir", str(tmp / "out"),
                   "--resolution", "16", "--train_batch_size", "2", "--mixed_precision", "no", "--drop_t5",
                   "--max_sequence_length", "16", "--discriminator_head_channels", "16",
                   "--discriminator_warmup_steps", "0", "--diagnostics_steps", "0", "--max_train_steps", "2",
                   "--generator_lr", "1e-3", *flags])
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    torch.manual_seed(args.seed)
    adapter = SD3Teacher(teacher, resolution=args.resolution, max_sequence_length=args.max_sequence_length,
                         drop_t5=True, shift_terminal=args.shift_terminal)
    models = build_models(adapter, args, accelerator, None)
    adapter.load_text_encoders(accelerator.device, models.weight_dtype, denoiser=models.teacher_base)
    source = _Prompts(adapter, TINY_PROMPTS)
    if args.distribution_loss == "adm":
        build_discriminator(adapter, args, models, source.negative, accelerator.device)
    prepare_models(args, accelerator, models)
    train_iteration(models, adapter, args, accelerator, source, 0)  # D's zero-initialised output layer learns first
    grads = {}
    for name, p in models.generator.named_parameters():
        p.register_post_accumulate_grad_hook(lambda q, name=name: grads.__setitem__(name, q.grad.detach().clone()))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logs = train_iteration(models, adapter, args, accelerator, source, 1)
    assert grads, "the generator received no gradient"
    return grads, logs, saved[0]


CASES = {  # LoRA roles share the teacher's module: the generator's, the fake score's and D's passes switch adapters
    "full": ["--lora_rank", "0", "--fake_score_lora_rank", "0", "--gradient_checkpointing"],
    "fake_lora": ["--lora_rank", "0", "--fake_score_lora_rank", "4"],
    "both_lora": ["--lora_rank", "4", "--fake_score_lora_rank", "4", "--gradient_checkpointing"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_adm_generator_gradient_is_unchanged(teacher, tmp_path, case):
    plain, logs_plain, saved_plain = _iteration(teacher, tmp_path, *CASES[case])
    checkpointed, logs_ckpt, saved_ckpt = _iteration(teacher, tmp_path, *CASES[case],
                                                     "--gradient_checkpointing_frozen_passes")
    assert plain.keys() == checkpointed.keys()
    scale = max(g.abs().max().item() for g in plain.values())
    assert scale > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    for key in ("loss_generator", "loss_fake_score", "loss_discriminator"):
        assert logs_ckpt[key] == pytest.approx(logs_plain[key], rel=1e-5, abs=1e-7), key
    # what autograd keeps for the backward (outside checkpointed blocks) drops: the frozen passes' activations
    assert saved_ckpt < 0.8 * saved_plain, (saved_ckpt, saved_plain)


def test_dmd_is_unaffected(teacher, tmp_path):
    """DMD2's frozen passes run without gradients: the flag changes nothing (not even what autograd saves)."""
    flags = ["--distribution_loss", "dmd", "--lora_rank", "0", "--fake_score_lora_rank", "0"]
    plain, _, saved_plain = _iteration(teacher, tmp_path, *flags)
    checkpointed, _, saved_ckpt = _iteration(teacher, tmp_path, *flags, "--gradient_checkpointing_frozen_passes")
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    assert saved_ckpt == saved_plain


def test_role_preserving_checkpoint_recomputes_under_the_forward_adapter():
    """The checkpointing function the flag installs: a LoRA block run under adapter "a" and recomputed after the base
    switched to "b" gives adapter "a"'s gradient; diffusers' default function would give "b"'s."""
    from peft import LoraConfig, inject_adapter_in_model

    from dmdx.training.freezing import role_preserving_checkpoint

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.tanh(self.proj(x)) ** 2

    block = Block()
    for name in ("a", "b"):
        block = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights="gaussian"), block,
                                        adapter_name=name)
    block.requires_grad_(False)
    layer = block.proj
    for weight in (*layer.lora_B.values(), *layer.lora_A.values()):  # peft starts B at zero: no effect yet
        torch.nn.init.normal_(weight.weight)

    def use(name):
        layer._active_adapter = [name]

    x = torch.randn(4, 8)
    grads = {}
    for name in ("a", "b"):
        use(name)
        xi = x.clone().requires_grad_(True)
        block(xi).sum().backward()
        grads[name] = xi.grad
    assert not torch.allclose(grads["a"], grads["b"])

    def checkpointed_grad(func):
        use("a")
        xi = x.clone().requires_grad_(True)
        out = func(block, xi)
        use("b")  # another role runs before the backward
        out.sum().backward()
        return xi.grad

    torch.testing.assert_close(checkpointed_grad(role_preserving_checkpoint), grads["a"])
    default = checkpointed_grad(lambda m, *a: torch.utils.checkpoint.checkpoint(m.__call__, *a, use_reentrant=False))
    assert not torch.allclose(default, grads["a"])  # the failure the role-preserving function prevents
