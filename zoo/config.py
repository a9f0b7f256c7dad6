"""Typed configuration: a schema of dataclasses, filled from YAML presets and `key=value` overrides.

Resolution order (later wins):
  1. the schema's defaults below, plus the method's own dataclass under the key `<method name>`;
  2. `configs/presets/<preset>.yaml` (model size, data and the training recipe); a preset that names a
     `base` (a paper recipe such as imagenet256-XL on XL) is laid over the base's file;
  3. `configs/<method>.yaml`, then its `presets.<preset>` sections, the base's first (a section's `recipe`
     entry is the paper's record of that recipe, read by `zoo recipes`, not config);
  4. command-line overrides `key=value` (dotted keys, YAML values).
Every step is checked against the schema, so an unknown key or a wrong type is a one-line error
that lists the valid keys. The resolved config is written to the run folder and into every
checkpoint, so a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zoo.errors import ConfigError
from zoo.validation import check_ranges

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ODE_SOLVER_NAMES = ("euler", "heun", "heun_trapezoid", "dopri5")   # sample.solver (zoo/flow/samplers.py)
PRESET_DIR = CONFIG_DIR / "presets"


@dataclass
class ModelConfig:
    size: str = "tiny"          # micro | tiny | S | B | L | XL | custom
    patch: int = 4
    hidden: int = 0             # 0: take width, depth and heads from `size`
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1  # label dropout that trains the unconditional model for CFG
    max_tokens: int = 4096      # refuse a larger token grid (pixel space at 256 px is 16,384); 0: no limit
    norm: str = "layernorm"     # the blocks' norms: layernorm | rmsnorm
    norm_affine: bool = False   # a learned scale in the blocks' norms (DDT's RMSNorm has one)
    final_norm: str = ""        # the final layer's norm: "" (= norm) | layernorm | rmsnorm
    mlp: str = "gelu"           # gelu | swiglu
    qk_norm: bool = False
    qkv_bias: bool = True       # biases of the attention's qkv projection
    mlp_bias: bool = True       # biases of the MLP's linears
    rope: bool = False          # 2D rotary positions in attention
    rope_extent: float = 0.0    # 0: integer RoPE positions; > 0: the grid spread over [0, extent] (DDT: 16)
    pos_embed: str = "sincos"   # absolute positions added to the tokens: sincos | none (DDT)
    init: str = "dit"           # dit (xavier, zeroed adaLN) | ddt (PyTorch's defaults inside the blocks)
    time_scale: float = 1000.0  # the sinusoid embeds time_scale * t: 1000 on the CPU presets, 1 in SiT/REPA/DDT
    time_max_period: float = 10000.0  # longest period of the sinusoid (DDT: 10)
    time_convention: str = "noise"    # noise: the network sees the zoo's t (1 = noise) | data: it sees 1 - t and
                                      # predicts the velocity towards data (SiT's and DDT's code), negated


@dataclass
class DataConfig:
    dataset: str = "shapes"     # shapes (built in, generated from `seed`) | folder (one subfolder per class)
                                # | prepared (a store written by `zoo prepare dataset`: crops + VAE posteriors)
    root: str = ""              # the image folder (dataset=folder) or the store (dataset=prepared)
    image_size: int = 32
    num_classes: int = 10       # shapes: number of classes used (<= 10); folder: checked against the folder
    num_images: int = 20000     # shapes: size of the generated training set
    seed: int = 0               # shapes: the generator's seed (the reference split uses another)
    shape_scale: float = 1.0    # shapes: their size (1: radius 0.35-0.55 of the half-width); larger ones move less
    hflip: bool = True          # random horizontal flips
    num_workers: int = 0        # DataLoader workers for a folder or a store (0: batches gathered in this process)
    verify: bool = False        # folder: decode every image once before training, naming all unreadable ones
    vae: str = ""               # "": diffuse pixels | builtin (zoo prepare vae) | a diffusers AutoencoderKL folder


@dataclass
class FlowConfig:
    path: str = "linear"        # linear | cosine
    time: str = "uniform"       # uniform | logit_normal (REPA's "lognormal" is logit_normal(0, 1))
    time_mean: float = 0.0
    time_std: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0      # max global grad norm; 0 disables clipping
    warmup_steps: int = 0       # linear learning-rate warm-up
    schedule: str = "constant"  # after the warm-up: constant (the papers') | cosine (to 0 at train.steps)


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 64        # global batch, split across processes
    logger: str = "jsonl"       # metrics.jsonl always; tensorboard | wandb as well (zoo/training/loggers.py)
    accumulate: int = 1         # micro-batches per process and step: gradients summed, the same update in less memory
    ema_decay: float = 0.9999
    ema_warmup: bool = False    # decay min(ema_decay, (1 + step) / (10 + step)) for short runs
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0         # 0: only at the end
    sample_every: int = 0       # 0: only at the end
    out_dir: str = "runs"
    run_name: str = ""          # default: <method>-<preset>-<date>-<time>
    precision: str = "auto"     # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    threads: int = 0            # CPU threads for torch; 0 keeps torch's default
    divergence_factor: float = 100.0  # stop when a logged loss exceeds this many times its typical size (0: never)


@dataclass
class SampleConfig:
    sampler: str = "ode"        # ode | sde
    solver: str = "euler"       # euler | heun (REPA's) | heun_trapezoid | dopri5 (ode only)
    steps: int = 32
    last_step: float = 0.0      # ode: 0 = a uniform grid; > 0 = uniform to last_step, then one step to 0 (DDT: 0.04)
    cfg_scale: float = 1.0
    cfg_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])
    num: int = 64               # images in the grids written during training
    seed: int = 0
    use_ema: bool = True
    judge: bool = False         # print the judge's class accuracy of the final grid (the judge is trained once per dataset)


@dataclass
class TeacherConfig:
    """The built-in teacher encoder (zoo/teachers/builtin.py), used by aligning methods whose encoder is
    `builtin`: a small ViT trained self-supervised on the run's data. Every field but center_tokens is part of its cache key."""
    patch: int = 4              # 32x32 images -> an 8x8 token grid, the `tiny` SiT's
    width: int = 96             # token width D that projectors map to
    depth: int = 4
    heads: int = 4
    steps: int = 400            # ~5 minutes on 2 CPU threads
    batch_size: int = 128       # images per step; each is seen in two augmented views
    lr: float = 2e-3            # AdamW, warm-up then cosine
    weight_decay: float = 0.05
    expander: int = 512         # width of VICReg's BatchNorm'd expander head (training only)
    seed: int = 4_242           # its own seed, unrelated to training runs and to the judge's
    num_images: int = 20000     # training images drawn from the data's training distribution
    probe_images: int = 2000    # train and held-out images of the linear probe that reports its quality
    center_tokens: bool = False  # subtract the dataset's mean token (not part of the cache key: no retraining)


@dataclass
class ClusterTeacherConfig:
    """The cluster teacher (zoo/teachers/cluster.py, encoder `builtin-cluster`): clusters of the built-in teacher's
    features, found without labels, and a plain CNN trained to predict them. Every field is part of its cache key."""
    clusters: int = 0           # K; 0: the data's class count
    neighbours: int = 20        # nearest images (cosine, in the built-in teacher's pooled tokens) an image must agree with
    heads: int = 5              # clustering heads trained; the one with the lowest loss assigns the clusters
    head_steps: int = 1500
    head_batch: int = 1024
    entropy_weight: float = 5.0  # SCAN's weight on the entropy of the mean prediction (keeps all clusters in use)
    stem: int = 16
    widths: List[int] = field(default_factory=lambda: [32, 64, 128])  # channels of the CNN's stages, each halving
    stage: int = 2              # tokens: the map after this many stages (16 px images -> 4x4)
    steps: int = 1000           # the CNN's training on the clusters (~1 min on one CPU thread at 16 px)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 8_117
    num_images: int = 20000     # images clustered and trained on (an image folder: a seeded subset, every class in it)


@dataclass
class AutoencoderConfig:
    """The built-in VAE (zoo/latents/vae.py), used when data.vae=builtin: a small diffusers AutoencoderKL trained on
    the run's data with L1 + KL (+ a perceptual term on the built-in teacher). Every field is part of its cache key."""
    channels: List[int] = field(default_factory=lambda: [16, 32, 32])  # downsampling 2^(len - 1): 32 px -> 8x8
    layers_per_block: int = 1
    latent_channels: int = 4
    steps: int = 1000           # ~0.4 s/step on one CPU thread
    batch_size: int = 64
    lr: float = 1e-3            # AdamW, warm-up then cosine
    kl_weight: float = 1e-6     # as SD-VAE and REPA-E
    perceptual_weight: float = 0.0  # the built-in teacher's perceptual distance (zoo/latents/perceptual.py), beside L1
    seed: int = 5_151
    num_images: int = 20000


@dataclass
class RunConfig:
    method: str = "sit"
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cluster_teacher: ClusterTeacherConfig = field(default_factory=ClusterTeacherConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)


def schema_for(method_cls) -> Any:
    """The RunConfig schema extended by the method's own dataclass under the key `method_cls.name`."""
    own = getattr(method_cls, "config_class", None)
    if own is None:
        return RunConfig
    return dataclasses.make_dataclass(f"{method_cls.__name__}RunConfig",
                                      [(method_cls.name, own, field(default_factory=own))], bases=(RunConfig,))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _check_keys(node: Any, schema: DictConfig, where: str, source: str) -> None:
    """Raise a ConfigError naming the first key of `node` that the schema does not have."""
    if not isinstance(node, (dict, DictConfig)):
        return
    for key, value in node.items():
        if key not in schema:
            valid = sorted(str(k) for k in schema.keys())
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key '{where}{key}' in {source}{hint}; "
                              f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(valid)}")
        child = schema[key]
        if isinstance(child, DictConfig):
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"config key {where}{key} in {source} is a section; "
                                  f"set its keys instead: {', '.join(str(k) for k in child.keys())}")
            _check_keys(value, child, f"{where}{key}.", source)


def _merge(cfg: DictConfig, update: Any, source: str) -> DictConfig:
    _check_keys(update, cfg, "", source)
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        raise ConfigError(f"bad value for config key {key} in {source}: {exc.msg if hasattr(exc, 'msg') else exc}"
                          .splitlines()[0]) from None


def _load_yaml(path: Path) -> dict:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # a YAML syntax error
        raise ConfigError(f"cannot read config file {path}: {exc}".splitlines()[0]) from None
    return data or {}


def parse_overrides(overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}".splitlines()[0]) from None


def method_config_file(method_cls) -> Path:
    return Path(getattr(method_cls, "config_file", None) or CONFIG_DIR / f"{method_cls.name}.yaml")


def load_config(method: Optional[str], overrides: Optional[list[str]] = None, preset: Optional[str] = None) -> DictConfig:
    """Resolve the full config of `method` (see the module docstring for the order).

    `method=None` gives the shared sections alone (preset and overrides, no method file), for commands
    that need data or the built-in teacher's recipe but train no method.
    """
    from zoo.training.registry import get_method_class

    method_cls = get_method_class(method) if method is not None else None
    cli = parse_overrides(overrides or [])
    preset = cli.pop("preset", None) or preset or "tiny"
    cfg = OmegaConf.structured(schema_for(method_cls))
    layers = preset_layers(preset)
    for name, data in layers:
        cfg = _merge(cfg, data, str(PRESET_DIR / f"{name}.yaml"))
    own_file = method_config_file(method_cls) if method_cls is not None else None
    if own_file is not None and own_file.exists():
        own = _load_yaml(own_file)
        per_preset = own.pop("presets", {}) or {}
        cfg = _merge(cfg, own, str(own_file))
        for name, _ in layers:
            section = dict(per_preset.get(name) or {})
            section.pop("recipe", None)
            cfg = _merge(cfg, section, f"{own_file} (presets.{name})")
    cfg = _merge(cfg, cli, "the command line")
    cfg.method, cfg.preset = method or "", preset
    check_ranges(cfg)
    return cfg


def preset_layers(preset: str) -> list[tuple[str, dict]]:
    """[(name, settings)] of a preset and the bases it names, the deepest base first."""
    layers, name = [], preset
    while name is not None:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}" + (f" (the base of {preset!r})" if name != preset else "")
                              + f"; valid: {', '.join(available_presets())}")
        if any(name == seen for seen, _ in layers):
            raise ConfigError(f"preset {preset!r}: its bases form a loop at {name!r}")
        data = _load_yaml(path)
        base = data.pop("base", None)
        layers.append((name, data))
        name = base
    return layers[::-1]


def recipes() -> dict[str, dict[str, dict]]:
    """{method: {preset: its `recipe` record}} of the paper recipes in the methods' config files."""
    from zoo.training.registry import available_methods

    found = {}
    for name, cls in available_methods().items():
        path = method_config_file(cls)
        per_preset = (_load_yaml(path).get("presets") or {}) if path.exists() else {}
        records = {preset: section["recipe"] for preset, section in per_preset.items()
                   if isinstance(section, dict) and "recipe" in section}
        if records:
            found[name] = records
    return found


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a resolved config (e.g. from a checkpoint), validating it against today's schema."""
    from zoo.training.registry import get_method_class

    if "method" not in data:
        raise ConfigError("this config has no 'method' key")
    cfg = OmegaConf.structured(schema_for(get_method_class(data["method"])))
    return _merge(cfg, data, "the saved config")


def with_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    cfg = _merge(cfg, parse_overrides(overrides), "the command line")
    check_ranges(cfg)
    return cfg


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
