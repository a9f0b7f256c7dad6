"""The cluster teacher (`builtin-cluster`): a small CNN trained, without labels, to predict clusters of the built-in
teacher's features, whose feature map REPA aligns to.

Why: on the quick CPU protocol REPA with the built-in ViT gains 1.3x, while a CNN trained with the true labels gives
2.2x, and CNNs trained without labels by VICReg (1.4x) or on k-means clusters (1.3x) do not (docs/benchmarks.md,
"What kind of teacher gives REPA the papers' speed-up"). What helps is a map whose cells name the class in the way
the data's classes divide the images. The recipe finds that division without labels, as SCAN does (Van Gansbeke et
al. 2020, "Learning to classify images without labels"):
1. the built-in teacher's pooled tokens of the training images (self-supervised, zoo/teachers/builtin.py);
2. each image's `neighbours` nearest images by cosine similarity in that space;
3. `heads` clustering heads (an MLP to K = `clusters` outputs, by default the data's class count) trained on the
   frozen features so that an image and its neighbours get the same cluster (SCAN's loss: -log of the dot product
   of their softmax outputs, minus `entropy_weight` x the entropy of the mean prediction, which keeps every cluster
   in use); the head with the lowest loss gives each image its cluster, as SCAN picks its head;
4. a plain CNN (3x3 conv + BatchNorm + ReLU, two per stage, the first one strided: not the judge's residual
   network, and its own seed) trained with cross-entropy to predict those clusters, mirrored images included.
Its tokens are the map after its second stage (4x4 for 16 px images), centred by their mean over the training
images, as the built-in teacher's are with `teacher.center_tokens`. No label is read; the class count is the one
piece of knowledge about the data that it uses (SCAN's assumption too). Reported, for evaluation only: how often
the clusters agree with the classes (purity) and a linear probe of the CNN's pooled features on held-out images.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.cache import cache_dir, caller_random_state, fingerprint
from zoo.data import data_identity, gather, subset_index, training_images
from zoo.errors import ConfigError, DataError
from zoo.teachers import Encoder, register_encoder
from zoo.teachers.builtin import (ensure_teacher, load_teacher, pooled_features, probe_accuracy, teacher_key,
                                  token_direction_statistics)
from zoo.training.checkpoint import atomic_save, load_artifact
from zoo.training.helper_lr import warmup_cosine

CLUSTER_FORMAT = "repa-zoo-cluster-teacher/1"


class ClusterNet(nn.Module):
    """Stem (3x3 conv at full resolution) -> stages of two 3x3 convs (the first halves the resolution) -> global
    average pool -> linear. `features(images, stages)` is the map after the first `stages` stages."""

    def __init__(self, clusters: int, stem: int, widths):
        super().__init__()
        conv = lambda c_in, c_out, stride: [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),  # noqa: E731
                                            nn.BatchNorm2d(c_out), nn.ReLU()]
        self.stem = nn.Sequential(*conv(3, stem, 1))
        stages, c = [], stem
        for w in widths:
            stages.append(nn.Sequential(*conv(c, w, 2), *conv(w, w, 1)))
            c = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c, clusters)

    def features(self, images: Tensor, stages: int) -> Tensor:
        h = self.stem(images)
        for stage in self.stages[:stages]:
            h = stage(h)
        return h

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images, len(self.stages)).mean(dim=(2, 3)))


def scan_loss(anchor_logits: Tensor, neighbour_logits: Tensor, entropy_weight: float) -> tuple[Tensor, Tensor]:
    """SCAN's clustering loss: consistency = mean over pairs of -log <softmax(anchor), softmax(neighbour)>, minus
    entropy_weight x the entropy of the anchors' mean softmax. Returns (loss, consistency)."""
    p, q = anchor_logits.softmax(1), neighbour_logits.softmax(1)
    consistency = -torch.log((p * q).sum(1).clamp_min(1e-8)).mean()
    mean = p.mean(0)
    entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum()
    return consistency - entropy_weight * entropy, consistency


def nearest_neighbours(features: Tensor, k: int, chunk: int = 2000) -> Tensor:
    """[N, k] indices of each row's k most cosine-similar other rows."""
    x = F.normalize(features, dim=1)
    out = []
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ x.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -2.0  # not itself
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def scan_clusters(features: Tensor, recipe: dict, clusters: int, progress: bool = False) -> tuple[Tensor, float]:
    """Cluster of every row of `features` [N, D] from the best (lowest-loss) of recipe['heads'] SCAN heads."""
    from tqdm import tqdm

    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    k = min(recipe["neighbours"], len(features) - 1)
    neighbours = nearest_neighbours(features, k)
    gen = torch.Generator().manual_seed(recipe["seed"])
    batch = min(recipe["head_batch"], len(features))
    best = None
    bar = tqdm(total=recipe["heads"] * recipe["head_steps"], desc="cluster heads", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    for head_index in range(recipe["heads"]):
        torch.manual_seed(recipe["seed"] + head_index)
        head = nn.Sequential(nn.Linear(features.shape[1], 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, clusters))
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(recipe["head_steps"]):
            anchor = torch.randint(len(features), (batch,), generator=gen)
            partner = neighbours[anchor, torch.randint(k, (batch,), generator=gen)]
            logits = head(torch.cat([features[anchor], features[partner]]))
            loss, _ = scan_loss(*logits.chunk(2), recipe["entropy_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
        head.eval()
        with torch.no_grad():
            logits = head(features)
            final, _ = scan_loss(logits, logits[neighbours[:, 0]], recipe["entropy_weight"])
        if best is None or final.item() < best[0]:
            best = (final.item(), logits.argmax(1))
    bar.close()
    return best[1], best[0]


def purity(clusters: Tensor, labels: Tensor) -> float:
    """The share of images whose cluster's most common class is their own (evaluation only)."""
    hits = sum(int(torch.bincount(labels[clusters == c]).max()) for c in clusters.unique())
    return hits / len(labels)


def cluster_recipe(cfg) -> dict:
    """cfg.cluster_teacher as plain values (its widths a list)."""
    return {key: list(value) if key == "widths" else value for key, value in cfg.cluster_teacher.items()}


def cluster_key(cfg) -> str:
    return fingerprint({"cluster": cluster_recipe(cfg), "teacher": teacher_key(cfg.data, cfg.teacher),
                        "data": data_identity(cfg.data), "format": CLUSTER_FORMAT})


def default_cluster_path(cfg) -> Path:
    return cache_dir("teacher") / f"cluster-{cluster_key(cfg)}.pt"


def cluster_count(cfg) -> int:
    return int(cfg.cluster_teacher.clusters) or int(cfg.data.num_classes)


def _pooled_vit_features(cfg, images: Tensor) -> Tensor:
    """The built-in teacher's pooled tokens of images in [-1, 1] (trained first if needed), as its probe reads them."""
    vit, _ = load_teacher(ensure_teacher(cfg))  # frozen: no graph is kept
    return pooled_features(vit, ((images + 1) * 127.5).round().to(torch.uint8))


def train_cluster_teacher(cfg, path=None, progress: bool = True) -> Path:
    """Steps 1-4 of the module docstring; saves the CNN with its token mean, purity and probe."""
    from tqdm import tqdm

    recipe = cluster_recipe(cfg)
    path = Path(path) if path else default_cluster_path(cfg)
    dataset = training_images(cfg.data, recipe["num_images"])
    if len(dataset) < recipe["batch_size"]:
        raise DataError(f"the cluster teacher needs at least one batch of {recipe['batch_size']} images; "
                        f"the data has {len(dataset)}")
    start = time.perf_counter()
    # the built-in shapes are exactly num_images; an image folder may be far larger: a seeded subset, all classes
    pool = subset_index(len(dataset), recipe["num_images"])
    every = gather(dataset, pool)
    clusters = cluster_count(cfg)
    assigned, scan_final = scan_clusters(_pooled_vit_features(cfg, every["image"]), recipe, clusters, progress)
    torch.manual_seed(recipe["seed"])
    net = ClusterNet(clusters, recipe["stem"], tuple(recipe["widths"]))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    bar = tqdm(range(recipe["steps"]), desc="cluster teacher", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    net.train()
    for step in bar:
        pick = torch.randint(len(pool), (recipe["batch_size"],), generator=gen)
        flip = torch.rand(recipe["batch_size"], generator=gen) < 0.5
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * warmup_cosine(step, recipe["steps"])
        loss = F.cross_entropy(net(gather(dataset, pool[pick], flip)["image"]), assigned[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    net.eval()
    probe_index = subset_index(len(pool), 2000)
    with torch.no_grad():
        tokens = net.features(every["image"][probe_index], recipe["stage"]).flatten(2).transpose(1, 2).flatten(0, 1)
    state = {"format": CLUSTER_FORMAT, "recipe": recipe, "clusters": clusters, "data": data_identity(cfg.data),
             "weights": net.state_dict(), **token_direction_statistics(tokens), "scan_loss": scan_final,
             "purity": purity(assigned, every["label"]),
             "probe_accuracy": probe_accuracy(lambda images: _pooled(net, images), cfg.data, cfg.teacher.probe_images),
             "train_seconds": round(time.perf_counter() - start, 1), "key": cluster_key(cfg)}
    atomic_save(state, path)
    return path


@torch.no_grad()
def _pooled(net: ClusterNet, images: Tensor) -> Tensor:
    """uint8 images -> the pooled last map [B, widths[-1]], for the linear probe."""
    return torch.cat([net.features(x.float() / 127.5 - 1, len(net.stages)).mean(dim=(2, 3)) for x in images.split(500)])


def load_cluster_teacher(path) -> tuple:
    """(ClusterNet in eval mode, its saved record without the weights)."""
    state = load_artifact(path, CLUSTER_FORMAT, "cluster-teacher weights", "zoo prepare teacher --cluster")
    recipe = state["recipe"]
    net = ClusterNet(state["clusters"], recipe["stem"], tuple(recipe["widths"]))
    net.load_state_dict(state.pop("weights"))
    return net.eval().requires_grad_(False), state


def ensure_cluster_teacher(cfg, progress: bool = True) -> Path:
    path = default_cluster_path(cfg)
    if not path.exists():
        print(f"training the cluster teacher for this data once (the built-in teacher first, if needed); it is "
              f"cached at {path}", file=sys.stderr)
        with caller_random_state():
            train_cluster_teacher(cfg, path, progress)
    return path


class ClusterTeacher(Encoder):
    """The cluster teacher's map after stage `cluster_teacher.stage`, as centred tokens, at the data's resolution."""

    name = "builtin-cluster"

    def __init__(self, net: ClusterNet, record: dict, grid: int, path: Path):
        super().__init__(grid)
        self.net, self.record, self.path = net, record, Path(path)
        self.stage = record["recipe"]["stage"]
        self.dim = record["recipe"]["widths"][self.stage - 1]
        self.register_buffer("token_mean", record["token_mean"].float(), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        return images

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        return self.net.features(pixels, self.stage).flatten(2).transpose(1, 2) - self.token_mean

    def identity(self) -> dict:
        return {"name": self.name, "grid": self.grid, "teacher": self.record["key"], "path": str(self.path)}


def _build(name: str, weights: str, grid: int, cfg) -> ClusterTeacher:
    path = Path(weights) if weights else ensure_cluster_teacher(cfg)
    net, record = load_cluster_teacher(path)
    if record["recipe"]["widths"][record["recipe"]["stage"] - 1] != _dim(name, cfg):
        raise ConfigError(f"the cluster teacher in {path} has other widths than cluster_teacher.widths; "
                          f"set cluster_teacher.widths={list(record['recipe']['widths'])}")
    return ClusterTeacher(net, record, grid, path)


def _dim(name: str, cfg) -> int:
    recipe = cfg.cluster_teacher
    return int(recipe.widths[recipe.stage - 1])


register_encoder("builtin-cluster", _build, _dim)
