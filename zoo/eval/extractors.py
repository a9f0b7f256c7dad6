"""Feature extractors for FID, KID and precision/recall, all registered with torch-fidelity.

- `judge` (torch-fidelity name `zoo-judge`): the project's own evaluation network for the built-in
  data (zoo/eval/judge.py). Features: its pooled penultimate activations, L2-normalised, so the
  Frechet distance lies in [0, 4] and reads the same whatever the network's activation scale
  (distances between unit vectors; identical sets give 0). It also returns class logits, which give
  the class accuracy of class-conditional samples.
- `inception` (torch-fidelity's `inception-v3-compat`, pool3 2048 features): the standard FID network.
- `dinov2` (`zoo-dinov2-vit-b-14`; also s, l, g): FD-DINOv2 on the CLS token, built with timm from the
  original DINOv2 weights file (torch-fidelity's own DINOv2 extractor can only download from the hub).

Nothing is downloaded: the InceptionV3 and DINOv2 weights are read from a local file
(`feature_extractor_weights_path`, `--weights`), and a missing file raises MissingWeightsError with
the command that fetches it on an online machine.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from zoo.cache import cache_dir
from zoo.teachers.pretrained import DINOV2_TIMM, dinov2_file, dinov2_url
from zoo.errors import ConfigError, MissingWeightsError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class FeatureExtractorJudge(FeatureExtractorBase):
    """torch-fidelity wrapper of the judge: uint8 images -> (L2-normalised features, class logits)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from zoo.eval.judge import load_judge

        if feature_extractor_weights_path is None:
            raise ConfigError("the judge extractor needs feature_extractor_weights_path (see `zoo prepare judge`)")
        self.net, self.record = load_judge(feature_extractor_weights_path)
        self.image_size = self.record["image_size"]

    def forward(self, x):
        x = x.float() / 127.5 - 1
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        pooled, logits = self.net(x)
        out = {"judge": F.normalize(pooled.float(), dim=1), "logits": logits.float()}
        return tuple(out[a] for a in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return ("judge", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "judge", "kid": "judge", "prc": "judge"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)


class FeatureExtractorDinoV2Local(FeatureExtractorBase):
    """DINOv2 ViT (timm) from the original weights file; torch-fidelity's preprocessing (224 px, ImageNet norm)."""

    INPUT_IMAGE_SIZE = 224

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        size = name.split("-")[-2]
        self.model = timm.create_model(DINOV2_TIMM[size], pretrained=False, img_size=self.INPUT_IMAGE_SIZE,
                                       num_classes=0)
        state = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(checkpoint_filter_fn(state, self.model))  # converts the original layout
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(self.INPUT_IMAGE_SIZE,) * 2, align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1) * 255
        return (self.model((x - mean) / std).float(),)

    @staticmethod
    def get_provided_features_list():
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "dinov2"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


def _register() -> None:
    entries = {"zoo-judge": FeatureExtractorJudge}
    entries.update({f"zoo-dinov2-vit-{s}-14": FeatureExtractorDinoV2Local for s in DINOV2_TIMM})
    for name, cls in entries.items():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


_register()


def file_identity(path: Path) -> dict:
    """What identifies a weights file in cache keys: its content hash when small, else size and mtime."""
    stat = path.stat()
    if stat.st_size <= 64 * 2**20:
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Extractor:
    """A torch-fidelity feature extractor with what the zoo needs around it: a cache identity and batching."""

    def __init__(self, short_name: str, fidelity_name: str, layer: str, weights: Path, device, with_logits=False):
        self.short_name, self.fidelity_name, self.layer = short_name, fidelity_name, layer
        self.weights, self.device, self.with_logits = Path(weights), torch.device(device), with_logits
        features = [layer, "logits"] if with_logits else [layer]
        self.module = create_feature_extractor(fidelity_name, features, cuda=self.device.type == "cuda",
                                               feature_extractor_weights_path=str(weights), verbose=False)
        self.module.to(self.device)
        self.identity = {"extractor": fidelity_name, "layer": layer, "weights": file_identity(self.weights)}

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 250, progress: bool = False, desc: str = "features") -> dict:
        """uint8 [N, 3, H, W] -> {"features": float32 [N, D], and "logits" [N, classes] for the judge}."""
        from tqdm import tqdm

        if images.dtype != torch.uint8:
            raise TypeError(f"feature extractors take uint8 images, got {images.dtype}")
        out = {"features": [], "logits": []}
        chunks = images.split(batch_size)
        for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress or len(chunks) < 2, leave=False):
            values = self.module.convert_features_tuple_to_dict(self.module(chunk.to(self.device)))
            out["features"].append(values[self.layer].float().cpu())
            if self.with_logits:
                out["logits"].append(values["logits"].float().cpu())
        return {k: torch.cat(v) for k, v in out.items() if v}


def _existing(path, what: str, default_name: str, url: str) -> Path:
    path = Path(path) if path else cache_dir("weights") / default_name
    if not path.exists():
        raise MissingWeightsError(what, path, f"curl -L -o {path.name} {url}")
    return path


def inception_weights(weights=None) -> Path:
    """torch-fidelity's InceptionV3 file (the FID network): `weights`, or its default place in the zoo's cache."""
    return _existing(weights, "InceptionV3 FID weights", INCEPTION_FILE, INCEPTION_URL)


def build_extractor(name: str, weights=None, data_cfg=None, device="cpu", progress: bool = True) -> Extractor:
    """`judge` (default weights: the cached judge for `data_cfg`, trained on first use), `inception`,
    or `dinov2` / `dinov2-vit-{s,b,l,g}-14` (default weights: in zoo.cache.cache_dir("weights"))."""
    if name == "judge":
        from zoo.eval.judge import ensure_judge

        if weights:
            weights = Path(weights)
            if not weights.exists():
                raise MissingWeightsError("judge weights", weights, "zoo prepare judge  # trains it, no download")
        elif data_cfg is None:
            raise ConfigError("the judge extractor needs the data config or explicit weights")
        else:
            weights = ensure_judge(data_cfg, progress=progress)
        return Extractor("judge", "zoo-judge", "judge", weights, device, with_logits=True)
    if name == "inception":
        return Extractor("inception", "inception-v3-compat", "2048", inception_weights(weights), device)
    if name == "dinov2" or (name.startswith("dinov2-vit-") and name.split("-")[2] in DINOV2_TIMM):
        size = "b" if name == "dinov2" else name.split("-")[2]
        path = _existing(weights, f"DINOv2 ViT-{size.upper()}/14 weights", dinov2_file(size), dinov2_url(size))
        return Extractor(f"dinov2-vit-{size}-14", f"zoo-dinov2-vit-{size}-14", "dinov2", path, device)
    raise ConfigError(f"unknown feature extractor {name!r}; valid: judge, inception, dinov2, dinov2-vit-{{s,b,l,g}}-14")
