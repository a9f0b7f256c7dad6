"""The built-in teacher: a small ViT trained self-supervised on the run's own data.

REPA aligns the diffusion model to a pretrained self-supervised encoder (DINOv2 at scale). On an
offline CPU machine there is none, and ImageNet encoders know nothing of 32x32 procedural shapes,
so the zoo trains its own teacher once per data distribution and caches it (`zoo prepare teacher`,
or on first use).

Objective: VICReg (variance-invariance-covariance) between two augmented views of each image, on the
mean of the patch tokens through a BatchNorm'd expander. Why this one:
- it needs no labels, like DINOv2, so the teacher brings structure the diffusion loss does not
  already get from the class label, and it differs in objective and architecture from the judge (a
  supervised CNN, zoo/eval/judge.py), so no method is rewarded for aligning to the network that scores it;
- it needs no negatives, so it is stable with the small batches a CPU affords, where SimCLR's NT-Xent
  (the previous objective) barely moved in the same budget (loss 5.5 -> 5.25, probe 0.13-0.15, below a
  random-init teacher's ~0.2); self-distillation (DINO, BYOL) needs centring or EMA targets and long
  schedules;
- the augmentations are generic image nuisances, set to the spread of the built-in data's own (rotation,
  scale, shift, flips, colour permutation, inversion, grey, contrast, brightness), so what survives them
  is shape, fill and texture; without the colour changes the probe falls below random-init (colour alone
  identifies an image).
The ViT gets a small BatchNorm'd conv stem in place of the linear patch embedding: with it the same
budget learns markedly faster (probe 0.42 vs 0.34 after 150 steps); its output is still one token per
`patch` x `patch` cell (8x8 for 32 px images), the grid REPA aligns to.
Its quality is reported as the accuracy of a linear probe on its pooled tokens, on held-out images,
beside the same probe on a randomly initialised copy: with the default recipe (400 steps of 128 images,
305 s on 2 CPU threads) it is 0.48 on 2,000 held-out shapes (chance 0.10) against 0.17 at random init; the
`quick` preset's (16 px, 16 tokens per image, so 3000 steps cost about 9 minutes) reaches 0.92.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.backbones.layers import sincos_pos_embed_2d
from zoo.cache import cache_dir, caller_random_state, fingerprint
from zoo.training.checkpoint import atomic_save, load_artifact
from zoo.data import data_identity, gather, shapes_split, subset_index, training_images
from zoo.teachers import Encoder, register_encoder, resize_images
from zoo.errors import ConfigError, DataError
from zoo.training.helper_lr import warmup_cosine

TEACHER_FORMAT = "repa-zoo-teacher/3"  # 3: the official sin-cos channel order


class TeacherViT(nn.Module):
    """Convolutional stem (3x3 convs, BatchNorm, one stride-2 conv per halving: `patch` x `patch` pixels per
    token) + fixed 2D sin-cos positions -> pre-norm transformer layers -> LayerNorm."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int):
        super().__init__()
        if image_size % patch:
            raise ConfigError(f"teacher.patch={patch} does not divide the image size {image_size}")
        halvings, hidden = int(math.log2(patch)), max(8, width // 2)
        if 2 ** halvings != patch:
            raise ConfigError(f"teacher.patch={patch} must be a power of two (its stem halves the image)")
        layers = [nn.Conv2d(3, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        for _ in range(halvings - 1):
            layers += [nn.Conv2d(hidden, hidden, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        layers.append(nn.Conv2d(hidden, width, 3, 2 if halvings else 1, 1))
        self.embed = nn.Sequential(*layers)
        self.register_buffer("pos", sincos_pos_embed_2d(width, image_size // patch)[None], persistent=False)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, images: Tensor) -> Tensor:
        """images in [-1, 1] -> patch tokens [B, N, width]."""
        tokens = self.embed(images).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.blocks(tokens))


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """One random view per image: rotation, scale, shift and flip in one resampling, then colour changes."""
    b = images.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    angle = u(b) * 2 * math.pi
    scale = 0.75 + 0.5 * u(b)                  # zoom 0.75x .. 1.25x
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # shifts as large as the data's own spread of positions, so that where a shape sits (and how far from
    # the centre) cannot identify an image: only what the shape is can
    theta = torch.stack([torch.stack([cos * flip, -sin, 0.7 * (u(b) - 0.5)], 1),
                         torch.stack([sin * flip, cos, 0.7 * (u(b) - 0.5)], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = torch.gather(view, 1, torch.argsort(u(b, 3), dim=1)[:, :, None, None].expand_as(view))  # permute RGB
    view = torch.where(u(b, 1, 1, 1) < 0.3, -view, view)                                         # invert
    grey = view.mean(1, keepdim=True).expand_as(view)
    view = torch.where(u(b, 1, 1, 1) < 0.2, grey, view)
    return (view * (0.6 + 0.8 * u(b, 1, 1, 1)) + 0.4 * (u(b, 1, 1, 1) - 0.5)).clamp(-1, 1)  # contrast, brightness


def vicreg(z1: Tensor, z2: Tensor, invariance: float = 25.0, variance: float = 25.0,
           covariance: float = 1.0) -> Tensor:
    """VICReg (Bardes et al. 2022) between the embeddings [B, E] of two views of the same images:
    invariance * mean squared distance between partners
    + variance * mean over views and dimensions of relu(1 - std) (keeps every dimension alive: no collapse)
    + covariance * sum over views of the squared off-diagonal covariances / E (decorrelates the dimensions)."""
    loss = invariance * F.mse_loss(z1, z2)
    for z in (z1, z2):
        z = z - z.mean(0)
        loss = loss + variance * F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean() / 2
        cov = z.t() @ z / (len(z) - 1)
        loss = loss + covariance * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return loss


def expander(width: int, dim: int) -> nn.Module:
    """VICReg's expander: two BatchNorm'd hidden layers, used only for the training objective."""
    return nn.Sequential(nn.Linear(width, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))


USE_ONLY = ("center_tokens",)  # recipe fields that change how a trained teacher is used, not how it is trained


def teacher_key(data_cfg, recipe) -> str:
    trained = {k: v for k, v in dict(recipe).items() if k not in USE_ONLY}
    return fingerprint({"teacher": trained, "data": data_identity(data_cfg), "format": TEACHER_FORMAT})


def default_teacher_path(data_cfg, recipe) -> Path:
    return cache_dir("teacher") / f"teacher-{teacher_key(data_cfg, recipe)}.pt"


@torch.no_grad()
def pooled_features(net: TeacherViT, images: Tensor, batch_size: int = 500) -> Tensor:
    net.eval()
    return torch.cat([net(x.float() / 127.5 - 1).mean(1) for x in images.split(batch_size)])


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, steps: int = 300) -> float:
    """Accuracy of a multinomial logistic regression (standardised features, L-BFGS) on held-out features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def probe_accuracy(features: Callable[[Tensor], Tensor], data_cfg, num: int) -> float:
    """Linear probe of `features` (uint8 images [B, 3, H, W] -> [B, D]) trained on `num` training images, tested on
    `num` images of the held-out split."""
    if data_cfg.dataset == "shapes":
        train, test = shapes_split(data_cfg, num_images=num), shapes_split(data_cfg, reference=True, num_images=num)
        return linear_probe(features(train.images), train.labels, features(test.images), test.labels)
    from zoo.eval.reference import reference_images  # a folder: a seeded subset, split in two

    images, labels = reference_images(data_cfg, 2 * num)
    feats = features(images)
    # alternate images, not halves: the subset is in folder order (sorted by class), so its halves share no class
    return linear_probe(feats[0::2], labels[0::2], feats[1::2], labels[1::2])


@torch.no_grad()
def token_statistics(net: TeacherViT, images: Tensor) -> dict:
    """The dataset's mean token and how much the tokens share its direction (the mean cosine of a token to the mean
    token). Near 1, a projector satisfies most of REPA's cosine loss by predicting that one vector for every token."""
    net.eval()
    return token_direction_statistics(torch.cat([net(x.float() / 127.5 - 1) for x in images.split(250)]).flatten(0, 1))


def token_direction_statistics(tokens: Tensor) -> dict:
    """For tokens [M, D]: their mean token, the mean cosine of a token to it, and the best cosine one constant reaches
    against the centred tokens (what a teacher's record stores and `zoo prepare teacher` prints)."""
    mean = tokens.mean(0)
    return {"token_mean": mean, "token_mean_cosine": float(F.cosine_similarity(tokens, mean[None], dim=1).mean()),
            "centred_constant_cosine": constant_prediction_cosine(tokens - mean)}


def constant_prediction_cosine(tokens: Tensor) -> float:
    """The best mean cosine similarity that one constant vector reaches against every token [M, D]: the length of
    the mean unit token (the constant is its direction). It is what REPA's projector earns by ignoring its input,
    so it says how much of the loss a target leaves to learn; for centred tokens the mean cosine to the mean token
    is undefined (the mean is zero) and this is the measure that stays meaningful."""
    return float(F.normalize(tokens, dim=1).mean(0).norm())


def train_teacher(data_cfg, recipe, path=None, progress: bool = True) -> Path:
    """Train the teacher with the recipe (cfg.teacher) on the data's training distribution, save it with its probe."""
    from tqdm import tqdm

    recipe = dict(recipe)
    path = Path(path) if path else default_teacher_path(data_cfg, recipe)
    dataset = training_images(data_cfg, recipe["num_images"])
    if len(dataset) < recipe["batch_size"]:
        raise DataError(f"the teacher needs at least one batch of {recipe['batch_size']} images; "
                        f"the data has {len(dataset)}")
    torch.manual_seed(recipe["seed"])
    shape = dict(image_size=data_cfg.image_size, patch=recipe["patch"], width=recipe["width"],
                 depth=recipe["depth"], heads=recipe["heads"])
    net = TeacherViT(**shape)
    pooled = lambda images: pooled_features(net, images)  # noqa: E731
    random_probe = probe_accuracy(pooled, data_cfg, recipe["probe_images"])
    head = expander(recipe["width"], recipe["expander"])
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps = recipe["steps"]
    gen = torch.Generator().manual_seed(recipe["seed"])
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="teacher", unit="step", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    net.train(), head.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * warmup_cosine(step, steps)
        index = torch.randint(len(dataset), (recipe["batch_size"],), generator=gen)
        images = gather(dataset, index)["image"]
        views = augment(torch.cat([images, images]), gen)
        z1, z2 = head(net(views).mean(1)).chunk(2)
        loss = vicreg(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = round(time.perf_counter() - start, 1)
    index = subset_index(len(dataset), 2000)  # not the leading images: an image folder is sorted by class
    probe_set = gather(dataset, index)
    stats = token_statistics(net, ((probe_set["image"] + 1) * 127.5).round().to(torch.uint8))
    state = {"format": TEACHER_FORMAT, "recipe": recipe, "data": data_identity(data_cfg), "shape": shape, **stats,
             "weights": net.state_dict(), "probe_accuracy": probe_accuracy(pooled, data_cfg, recipe["probe_images"]),
             "random_init_probe_accuracy": random_probe, "train_seconds": seconds, "key": teacher_key(data_cfg, recipe)}
    atomic_save(state, path)
    return path


def load_teacher(path) -> tuple:
    """(TeacherViT in eval mode, its saved record without the weights)."""
    state = load_artifact(path, TEACHER_FORMAT, "teacher weights", "zoo prepare teacher")
    net = TeacherViT(**state["shape"])
    net.load_state_dict(state.pop("weights"))
    return net.eval().requires_grad_(False), state


def ensure_teacher(cfg, progress: bool = True) -> Path:
    """The cached teacher for this data and recipe, trained first (with progress) if it is not there yet."""
    path = default_teacher_path(cfg.data, cfg.teacher)
    if not path.exists():
        print(f"training the built-in teacher encoder for this data once; it is cached at {path}", file=sys.stderr)
        with caller_random_state():
            train_teacher(cfg.data, cfg.teacher, path, progress)
    return path


class BuiltinTeacher(Encoder):
    """The built-in teacher as an `Encoder`: images at the data's resolution, no normalisation beyond [-1, 1]."""

    name = "builtin"

    def __init__(self, net: TeacherViT, record: dict, grid: int, path: Path, center: bool = False):
        super().__init__(grid)
        self.net, self.record, self.path = net, record, Path(path)
        self.dim, self.image_size = record["shape"]["width"], record["shape"]["image_size"]
        self.center = center
        if center:
            self.register_buffer("token_mean", record["token_mean"].float(), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        return resize_images(images, self.image_size, "bilinear")

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        tokens = self.net(pixels)
        return tokens - self.token_mean if self.center else tokens

    def identity(self) -> dict:
        out = {"name": self.name, "grid": self.grid, "teacher": self.record["key"], "path": str(self.path)}
        return {**out, "centred": True} if self.center else out  # (a key only when on: old caches keep theirs)


def _build(name: str, weights: str, grid: int, cfg) -> BuiltinTeacher:
    path = Path(weights) if weights else ensure_teacher(cfg)
    net, record = load_teacher(path)
    if record["shape"]["width"] != cfg.teacher.width:
        raise ConfigError(f"the teacher in {path} is {record['shape']['width']} wide but teacher.width is "
                          f"{cfg.teacher.width}; set teacher.width={record['shape']['width']}")
    center = cfg.teacher.center_tokens
    if center and "token_mean" not in record:
        raise ConfigError(f"teacher.center_tokens=true needs the teacher's mean token, which {path} predates; "
                          "train it again with `zoo prepare teacher --force`")
    return BuiltinTeacher(net, record, grid, path, center)


register_encoder("builtin", _build, lambda name, cfg: cfg.teacher.width)
