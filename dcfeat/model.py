"""The trained classifier and its run folder (DESIGN.md, "Runs").

A run folder holds everything needed to evaluate or predict without the
training store: `model.safetensors` (projection + every group's prototypes in
one state dict), `config.json`, `classes.parquet`. No pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dcfeat.heads import GroupHeads, Projection
from dcfeat.partition import load_classes, save_classes
from dcfeat.store import StoreError, replace_atomically

# What the features a run was trained on must share with the features it is applied to.
FEATURE_KEYS = ("model", "model_fingerprint", "pooling", "image_size", "dim")


class DCModel(nn.Module):
    """Projection + group heads; scores every class of every group for a batch of features."""

    def __init__(self, in_dim: int, dim: int, classes_per_group: list[int], *, head: str, s: float, m: float):
        super().__init__()
        self.projection = Projection(in_dim, dim)
        self.heads = GroupHeads(classes_per_group, head=head, dim=dim, s=s, m=m)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    @torch.no_grad()
    def topk(self, features: torch.Tensor | np.ndarray, k: int, *, chunk: int = 4096,
             device: torch.device | str = "cpu", softmax_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Global class ids (rows of classes.parquet) and scores of the top-k classes, best first.

        With `softmax_scale`, the scores are softmax probabilities of scale × score over every
        class of every group.
        """
        was_training = self.training
        self.eval()
        ids, scores = [], []
        for start in range(0, len(features), chunk):
            rows = features[start:start + chunk]
            x = (rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.asarray(rows))).to(device)
            s = self.heads.scores(self.projection(x))
            if softmax_scale is not None:
                s = torch.softmax(softmax_scale * s.float(), dim=1)
            top = s.topk(min(k, s.shape[1]), dim=1)
            ids.append(top.indices.cpu().numpy())
            scores.append(top.values.float().cpu().numpy())
        self.train(was_training)
        return np.concatenate(ids), np.concatenate(scores)


@dataclass
class Run:
    directory: Path
    model: DCModel
    config: dict
    classes: pl.DataFrame

    @property
    def features(self) -> dict:
        return self.config["features"]


def save_run(directory: Path, model: DCModel, config: dict, classes: pl.DataFrame) -> None:
    """Write the model files of a run, each atomically (training may rewrite them per epoch)."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    replace_atomically(tmp, directory / "model.safetensors")
    tmp = directory / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    replace_atomically(tmp, directory / "config.json")
    if not (directory / "classes.parquet").is_file():
        tmp = directory / ".classes.parquet.tmp"
        save_classes(classes, tmp)
        replace_atomically(tmp, directory / "classes.parquet")


def load_run(directory: Path) -> Run:
    directory = Path(directory)
    missing = [n for n in ("model.safetensors", "config.json", "classes.parquet") if not (directory / n).is_file()]
    if missing:
        raise StoreError(f"{directory} is not a complete run folder (missing {', '.join(missing)}); "
                         "train one with `dcfeat train` or pass --run DIR")
    config = json.loads((directory / "config.json").read_text())
    classes = load_classes(directory / "classes.parquet")
    model = DCModel(config["features"]["dim"], config["dim"], config["classes_per_group"], head=config["head"],
                    s=config["s"], m=config["m"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.eval()
    return Run(directory=directory, model=model, config=config, classes=classes)


def check_features(run_features: dict, split_attrs: dict, *, what: str) -> None:
    """Refuse to apply a run to features from another backbone, pooling, size or dim."""
    diff = [f"{k}: run {run_features.get(k)!r} vs {split_attrs.get(k)!r}" for k in FEATURE_KEYS
            if k in run_features and k in split_attrs and run_features[k] != split_attrs[k]]
    if diff:
        raise StoreError(f"{what} was made by another backbone or setting than the run's training features "
                         f"({'; '.join(diff)}); extract it with the run's --model/--pooling/--image-size")
