"""Where a run's numbers go besides RUN/metrics.jsonl (always written): `train.logger`.

  jsonl         nothing more (the default)
  tensorboard   RUN/tensorboard/: every logged value as a scalar, every sample grid as an image
  wandb         a Weights & Biases run in RUN/ (WANDB_MODE=offline is honoured: nothing leaves the machine)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from zoo.config import to_dict
from zoo.errors import ConfigError

LOGGERS = ("jsonl", "tensorboard", "wandb")


class RunLogger:
    """Scalars and images of one run for the chosen backend; `jsonl` alone does nothing here."""

    def __init__(self, kind: str, run_dir: Path, cfg):
        if kind not in LOGGERS:
            raise ConfigError(f"train.logger={kind!r}; valid: {', '.join(LOGGERS)}")
        self.kind, self.writer, self.run = kind, None, None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.logger=tensorboard needs the tensorboard package: pip install tensorboard") \
                    from None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.logger=wandb needs the wandb package: pip install wandb") from None
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "repa-zoo"), name=Path(run_dir).name,
                                  dir=str(run_dir), config=to_dict(cfg), resume="allow",
                                  mode=os.environ.get("WANDB_MODE", "online"))

    def scalars(self, record: dict) -> None:
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        """A PNG the run wrote (a sample grid)."""
        if self.writer is None and self.run is None:
            return
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        if self.writer is not None:
            self.writer.add_image(name, pixels, step, dataformats="HWC")
            self.writer.flush()
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
