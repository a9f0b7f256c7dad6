"""Golden outputs of the official implementations (fixtures/, see README.md) and how to build the zoo beside them."""
from pathlib import Path

import torch

from zoo.config import load_config
from zoo.training.method import DataInfo
from zoo.training.registry import get_method_class

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOL = 1e-5   # max abs difference in fp32


def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def sit_overrides(config: dict) -> list:
    """The zoo's `model.*` for an official SiT's constructor arguments."""
    return ["model.size=custom", f"model.hidden={config['hidden_size']}", f"model.depth={config['depth']}",
            f"model.heads={config['num_heads']}", f"model.patch={config['patch_size']}"]


def official_method(name: str, data: DataInfo, *overrides):
    """The zoo's method `name` on the micro preset (CPU, fp32) with `overrides`, for a diffusion state of `data`'s
    shape and classes (the official fixtures are 4x8x8 latents)."""
    cfg = load_config(name, ["preset=micro", "train.device=cpu", *overrides])
    return get_method_class(name)(cfg, data)


def loaded(method, state_dict: dict):
    """The method's model with the official weights, through `Method.from_official`; every key must be used."""
    model = method.build_model()
    state, unused = method.from_official(state_dict)
    assert not unused, f"official keys left unused: {unused}"
    model.load_state_dict(state, strict=True)
    return model.eval()


def assert_close(actual, expected, tol=TOL, what=""):
    expected = expected.to(actual.dtype) if torch.is_tensor(expected) else torch.as_tensor(expected)
    diff = (actual.detach() - expected).abs().max().item()
    assert diff <= tol, f"{what}: max abs difference {diff:.3g} > {tol:g}"



def zoo_entries(method, official: dict, key: str, value):
    """Where the official tensor `key` (here holding `value`, e.g. its gradient) lands in the zoo's state dict:
    [(zoo key, value there, mask of the entries it fills)], through `Method.from_official`."""
    probe = {k: v if k == "pos_embed" else torch.zeros_like(v) for k, v in official.items()}  # a fixed table stays
    values, _ = method.from_official({**probe, key: value})
    masks, _ = method.from_official({**probe, key: torch.ones_like(value)})
    return [(k, values[k], masks[k] != 0) for k in masks if masks[k].any()]


def assert_grads(method, model, official: dict, grads: dict, tol=TOL):
    """Each official gradient equals the zoo's on the entries its parameter maps to."""
    params = dict(model.named_parameters())
    for key, grad in grads.items():
        entries = zoo_entries(method, official, key, grad)
        assert entries, f"{key} maps to nothing"
        for zoo_key, expected, mask in entries:
            assert_close(params[zoo_key].grad[mask], expected[mask], tol, what=f"gradient of {key} ({zoo_key})")


def assert_total_and_grads(method, model, terms: dict, total, official: dict, grads: dict):
    """The trainer's weighted sum of `terms` equals the official total, and its gradients the official ones."""
    weighted = sum(term.weight * term.value for term in terms.values())
    assert_close(weighted, total, what="total")
    weighted.backward()
    assert_grads(method, model, official, grads)
    model.zero_grad(set_to_none=True)
