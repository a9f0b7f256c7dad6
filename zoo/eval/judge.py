"""The judge: a small supervised ResNet-style classifier that scores samples of the built-in data.

FID needs a feature network that knows the data. InceptionV3 and DINOv2 know ImageNet, not 32x32
procedural shapes, so for the built-in data the zoo trains its own evaluation network: a CNN
classifier trained with labels (cross-entropy) and its own seed. Its pooled penultimate features,
L2-normalised, are the space in which FID, KID and precision/recall are computed, and its class
predictions give the class accuracy of class-conditional samples.

It deliberately differs from every alignment teacher (REPA's built-in teacher is a self-supervised
ViT-style patch-token encoder trained without labels): other architecture (convolutions, global
pooling), other objective (supervised classification), other seed. A method that aligns its hidden
states to a teacher is therefore not scored by that same teacher.

The trained judge is cached under `zoo.cache.cache_dir("judge")`, keyed by a fingerprint of its
recipe and of the data distribution it was trained on; `zoo prepare judge` trains it explicitly,
and evaluation trains it on first use.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.cache import cache_dir, caller_random_state, fingerprint
from zoo.training.checkpoint import atomic_save, load_artifact
from zoo.data import data_identity, gather, training_images
from zoo.training.helper_lr import warmup_cosine
from zoo.errors import DataError

JUDGE_FORMAT = "repa-zoo-judge/1"


@dataclass(frozen=True)
class JudgeRecipe:
    """How the judge is built and trained; every field is part of the cache key."""
    stem: int = 16                  # channels of the full-resolution stem convolution
    widths: tuple = (32, 64, 128)   # channels of the stages, each halving the resolution (the last: feature size)
    blocks: int = 1                 # residual blocks per stage
    steps: int = 1000                # ~3-5 min on one CPU core; 600 steps already gave 0.998 held-out accuracy
    batch_size: int = 128
    lr: float = 2e-3                # AdamW, one-cycle cosine schedule with 5% warm-up
    weight_decay: float = 5e-4
    seed: int = 7_331               # its own seed, unrelated to any training run's
    num_images: int = 20_000        # training images drawn from the data's training distribution
    holdout: int = 2_000            # reference-split images on which the accuracy is reported


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class JudgeNet(nn.Module):
    """stem conv at full resolution -> stages of residual blocks, each starting with stride 2 -> global average
    pool -> linear. At 32x32: stages at 16, 8 and 4 pixels."""

    def __init__(self, num_classes: int, stem: int = 16, widths=(32, 64, 128), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        layers, c = [], stem
        for w in widths:
            for j in range(blocks):
                layers.append(ResidualBlock(c, w, stride=2 if j == 0 else 1))
                c = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.feature_dim = c

    def forward(self, images: torch.Tensor):
        """images in [-1, 1] -> (pooled penultimate features [B, D], logits [B, classes])."""
        pooled = self.stages(self.stem(images)).mean(dim=(2, 3))
        return pooled, self.head(pooled)


def judge_key(data_cfg, recipe: JudgeRecipe) -> str:
    return fingerprint({"judge": dataclasses.asdict(recipe), "data": data_identity(data_cfg), "format": JUDGE_FORMAT})


def default_judge_path(data_cfg, recipe: JudgeRecipe = JudgeRecipe()) -> Path:
    return cache_dir("judge") / f"judge-{judge_key(data_cfg, recipe)}.pt"


@torch.no_grad()
def accuracy(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    net.eval()
    hits = sum((net(x)[1].argmax(1) == y).sum().item() for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return hits / len(labels)


def train_judge(data_cfg, recipe: JudgeRecipe = JudgeRecipe(), path=None, progress: bool = True) -> Path:
    """Train the judge on the data's training distribution and save it with its reference accuracy."""
    from tqdm import tqdm

    from zoo.eval.reference import reference_images

    path = Path(path) if path else default_judge_path(data_cfg, recipe)
    dataset = training_images(data_cfg, recipe.num_images)
    if len(dataset) < recipe.batch_size:
        raise DataError(f"the judge needs at least one batch of {recipe.batch_size} images; the data has {len(dataset)}")
    torch.manual_seed(recipe.seed)
    net = JudgeNet(data_cfg.num_classes, recipe.stem, recipe.widths, recipe.blocks)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    gen = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="judge", unit="step", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    net.train()
    for step in bar:
        index = torch.randint(len(dataset), (recipe.batch_size,), generator=gen)
        flip = torch.rand(recipe.batch_size, generator=gen) < 0.5  # every class is mirror-symmetric in distribution
        batch = gather(dataset, index, flip)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * warmup_cosine(step, recipe.steps)
        loss = F.cross_entropy(net(batch["image"])[1], batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    images, labels = reference_images(data_cfg, recipe.holdout)
    ref_acc = accuracy(net, images.float() / 127.5 - 1, labels)
    state = {"format": JUDGE_FORMAT, "recipe": dataclasses.asdict(recipe), "data": data_identity(data_cfg),
             "num_classes": data_cfg.num_classes, "image_size": data_cfg.image_size, "weights": net.state_dict(),
             "reference_accuracy": ref_acc, "train_seconds": round(time.perf_counter() - start, 1),
             "key": judge_key(data_cfg, recipe)}
    atomic_save(state, path)
    return path


def load_judge(path) -> tuple:
    """(JudgeNet in eval mode, its saved record without the weights)."""
    state = load_artifact(path, JUDGE_FORMAT, "judge weights", "zoo prepare judge")
    recipe = state["recipe"]
    net = JudgeNet(state["num_classes"], recipe["stem"], tuple(recipe["widths"]), recipe["blocks"])
    net.load_state_dict(state.pop("weights"))
    return net.eval().requires_grad_(False), state


def ensure_judge(data_cfg, recipe: JudgeRecipe = JudgeRecipe(), progress: bool = True) -> Path:
    """The cached judge for this data, trained first (with progress) if it is not there yet."""
    import sys

    path = default_judge_path(data_cfg, recipe)
    if not path.exists():
        print(f"training the evaluation network (judge) for this data once; it is cached at {path}", file=sys.stderr)
        with caller_random_state():
            train_judge(data_cfg, recipe, path, progress)
    return path


def judge_accuracy(data_cfg, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The cached judge's class accuracy of generated images in [-1, 1], read from the same 8-bit pixels
    `zoo eval` scores."""
    from zoo.eval.evaluate import to_uint8_nchw

    net, _ = load_judge(ensure_judge(data_cfg))
    return accuracy(net, to_uint8_nchw(images).cpu().float() / 127.5 - 1, labels.cpu())
