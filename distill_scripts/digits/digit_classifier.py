"""A small CNN digit classifier trained on the real digits' train split: the evaluation's judge and feature extractor.

``DigitClassifier.features`` (the 64-d penultimate layer) feeds digit-FID and the diversity metric;
``DigitClassifier.forward`` gives class logits for prompt accuracy and mode coverage. Inputs are images in
[-1, 1], (B, 1 or 3, H, W), any size (resized to 16x16, channels averaged to grey).

Reproduce the committed asset (about 20 s on one core):

    python distill_scripts/digits/digit_classifier.py --output_dir distill_scripts/digits/assets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_data import load_digits_split  # noqa: E402

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
WEIGHTS_NAME = "digit_classifier.safetensors"
CONFIG_NAME = "digit_classifier.json"


class DigitClassifier(nn.Module):
    def __init__(self, resolution: int = 16, channels: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"resolution": resolution, "channels": channels, "feature_dim": feature_dim,
                       "num_classes": num_classes}
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * c * (resolution // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Expected images of shape (B, 1 or 3, H, W), got {tuple(x.shape)}.")
        x = x.mean(1, keepdim=True)
        r = self.config["resolution"]
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim)."""
        return F.relu(self.fc(self.conv(self.preprocess(images)).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


def load_classifier(directory: str = ASSETS_DIR, device="cpu") -> DigitClassifier:
    """Load the committed (or a re-trained) classifier in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    model = DigitClassifier(**config["model"])
    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
    return model.to(device).eval()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel, contrast jitter and a little pixel noise (robustness to generated digits)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=generator)
    dy = torch.randint(0, 3, (b,), generator=generator)
    h, w = x.shape[-2:]
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    scale = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    out = (out + 1) * scale - 1 + 0.05 * torch.randn(out.shape, generator=generator)
    return out.clamp(-1, 1)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the digit classifier used by distill_scripts/evaluate.py.")
    parser.add_argument("--output_dir", default=ASSETS_DIR)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--num_train_epochs", type=int, default=40)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_split("train", args.resolution)
    x_held, y_held = load_digits_split("held_out", args.resolution)
    model = DigitClassifier(resolution=args.resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    steps_per_epoch = -(-len(x_train) // args.train_batch_size)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate,
                                                   total_steps=args.num_train_epochs * steps_per_epoch)
    start = time.time()
    for _epoch in (bar := tqdm(range(args.num_train_epochs), desc="classifier")):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), args.train_batch_size):
            idx = perm[i:i + args.train_batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", held_out_acc=f"{accuracy(model, x_held, y_held):.4f}")
    held_acc = accuracy(model, x_held, y_held)
    train_acc = accuracy(model, x_train, y_train)
    os.makedirs(args.output_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.output_dir, WEIGHTS_NAME))
    with open(os.path.join(args.output_dir, CONFIG_NAME), "w") as f:
        json.dump({"model": model.config, "held_out_accuracy": round(held_acc, 4),
                   "train_accuracy": round(train_acc, 4), "num_train_epochs": args.num_train_epochs,
                   "seed": args.seed}, f, indent=2)
    print(f"held-out accuracy {held_acc:.4f} (train {train_acc:.4f}) in {time.time() - start:.1f} s; "
          f"saved to {args.output_dir}")
    return held_acc


if __name__ == "__main__":
    main()
