"""`zoo new-method NAME`: the four files of a new method, from templates that already pass the shared contract.

A method is one module, one config, one docs page and one test file (docs/extending.md). The templates
below are a working method that adds no loss yet: vanilla flow matching that already reads the hidden
state of one block, with TODO comments where the new method's loss and hooks go.
"""
from __future__ import annotations

from pathlib import Path

from zoo.errors import ConfigError

MODULE = '''"""{name}: TODO one sentence on what the method changes. See docs/methods/{name}.md.

    L = L_v + weight * L_{name}        <- TODO: the method's equations, as in the paper

Everything else is vanilla flow matching (zoo/training/method.py): override only the hooks the method changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo.training.method import Method, Term  # noqa: F401  (Term: what extra_losses returns)
from zoo.training.registry import register


@dataclass
class {cls}Config:
    """The method's options, at cfg.{name} (defaults mirrored in configs/{name}.yaml)."""
    depth: int = 8          # the block (counted from 1) whose output tokens the loss reads
    weight: float = 0.5     # the weight of the method's loss


@register
class {cls}(Method):
    name = "{name}"
    description = "{name}: TODO one line for `zoo list`"
    config_class = {cls}Config
    # next to this file, so the method also works from another package (docs/extending.md)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "{name}.yaml"

    def hidden_layers(self) -> tuple:
        """The backbone returns the tokens after these blocks in `state.output.hidden`."""
        return (self.options.depth,)

    # TODO: trainable modules beside the backbone (a projector, a head) are EMA'd and saved with it:
    # def build_extras(self, backbone) -> dict:
    #     return {{"projector": projector(backbone.hidden_size, 512, 256)}}   # from zoo.teachers.alignment

    # TODO: frozen helpers (a teacher encoder) are loaded here, onto `device`, never saved:
    # def setup(self, device, training=True):
    #     super().setup(device, training)

    def extra_losses(self, model, state, ctx) -> dict:
        """The method's losses beside the flow loss, as {{name: Term(value, weight)}}."""
        hidden = state.output.hidden[self.options.depth]  # [B, N, C] tokens after block `depth`, noisy input
        # TODO: the method's loss on `hidden` (and state.x, state.t, state.targets, ctx.ema, ...), e.g.
        #   return {{"{name}": Term(my_loss(hidden, state.targets["tokens"]), self.options.weight)}}
        del hidden
        return {{}}
'''

CONFIG = '''# {name}: TODO one line. See docs/methods/{name}.md.
# Every key of the section below is an option of {cls}Config (methods/{name}.py); presets override them by size.
{name}:
  depth: 8
  weight: 0.5
presets:
  micro:   # the contract tests' size: 2 blocks
    {name}: {{depth: 1}}
  tiny:    # the CPU comparison's size: 6 blocks
    {name}: {{depth: 2}}
'''

DOCS = '''# {name}

*TODO paper title*, authors, venue — [paper](TODO), [official code](TODO). `zoo train --method {name}`.

TODO: two sentences on what the method changes and why.

## Equations and where they are computed

Time convention as everywhere in the zoo: t = 1 is noise.

| term | equation | code |
| --- | --- | --- |
| hidden state | $h_t$ = tokens after block $k$ of $v_\\theta(x_t, t, y)$ | `{cls}.hidden_layers` (`methods/{name}.py`) |
| TODO the method's loss | $\\mathcal{{L}}_{{{name}}} = \\dots$ | `{cls}.extra_losses` |
| total | $\\mathcal{{L}} = \\mathcal{{L}}_v + w\\,\\mathcal{{L}}_{{{name}}}$ | the trainer adds the weighted terms |

## Options (`{name}.*`, configs/{name}.yaml)

| key | default | meaning |
| --- | --- | --- |
| `depth` | 8 (2 on `tiny`, 1 on `micro`) | $k$: the block whose output the loss reads |
| `weight` | 0.5 | $w$ |

## Measured

TODO: `zoo compare --methods sit,{name} ...` on the CPU benchmark (docs/benchmarks.md).
'''

TEST = '''"""{name}: its equations against direct transcriptions. The shared contract (tests/test_contract.py)
runs for every registered method; a method in another package calls zoo.training.contract.check_all("{name}")."""
import torch

from zoo.training.contract import micro_config
from zoo.training.method import TrainContext
from zoo.training.generate import build_method


def test_its_loss_terms_are_the_ones_it_declares():
    method = build_method(micro_config("{name}"))
    model = method.build_model()
    batch = {{"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 1])}}
    terms = method.loss_terms(model, batch, TrainContext(0, model))
    # TODO: once extra_losses returns the method's loss, assert its value against a direct
    # transcription of the paper's equation on hand-built tensors, as tests/methods/test_repa.py does.
    assert set(terms) == {{"flow"}}
    assert torch.isfinite(terms["flow"].value)
'''


def class_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def method_files(name: str, root: Path) -> dict:
    """{path: text} of the four files of method `name` under the project root `root`."""
    fields = {"name": name, "cls": class_name(name)}
    return {root / "methods" / f"{name}.py": MODULE.format(**fields),
            root / "configs" / f"{name}.yaml": CONFIG.format(**fields),
            root / "docs" / "methods" / f"{name}.md": DOCS.format(**fields),
            root / "tests" / "methods" / f"test_{name}.py": TEST.format(**fields)}


def check_name(name: str) -> None:
    import dataclasses

    from zoo.config import RunConfig
    from zoo.training.registry import available_methods

    if not name.isidentifier() or name != name.lower():
        raise ConfigError(f"method name {name!r} must be a lower-case Python identifier (e.g. my_method)")
    if name in available_methods():
        raise ConfigError(f"method {name!r} exists already; taken names: {', '.join(available_methods())}")
    core_sections = [f.name for f in dataclasses.fields(RunConfig)]
    if name in core_sections:
        raise ConfigError(f"{name!r} is a config section of the core; taken: {', '.join(core_sections)}")


def write_method(name: str, root: Path) -> list:
    """Write the four files; refuses to overwrite any of them. Returns the paths written."""
    check_name(name)
    files = method_files(name, Path(root))
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
