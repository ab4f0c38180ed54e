"""The trained classifier: projection + group heads, scoring every cell of every group (dcfeat.runs saves it)."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import nn

from dcfeat.errors import IncompatibleFeatures
from dcfeat.heads import GroupHeads, Projection
from dcfeat.layout import IDENTITY_OPTIONS, identity_diff


class DCModel(nn.Module):
    """Projection + group heads; scores every class of every group for a batch of features."""

    def __init__(self, in_dim: int, dim: int, classes_per_group: list[int], *, head: str, s: float, m: float,
                 easy_margin: bool = False, test_prototypes: str = "normalised"):
        super().__init__()
        self.projection = Projection(in_dim, dim)
        self.heads = GroupHeads(classes_per_group, head=head, dim=dim, s=s, m=m, easy_margin=easy_margin,
                                test_prototypes=test_prototypes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    @property
    def device(self) -> torch.device:
        return self.projection.linear.weight.device

    def _on_device(self, rows) -> torch.Tensor:
        """A chunk of cached features (numpy, h5py slice or tensor) as a tensor on the model's device."""
        return (rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.asarray(rows))).to(self.device)

    @torch.no_grad()
    def embed(self, features, chunk: int = 65536) -> torch.Tensor:
        """Projected unit embeddings (n, dim) of cached features, on the model's device, chunk by chunk."""
        if len(features) == 0:
            return torch.zeros((0, self.projection.linear.out_features), device=self.device)
        return torch.cat([self.projection(self._on_device(features[i:i + chunk]))
                          for i in range(0, len(features), chunk)])

    @torch.no_grad()
    def topk(self, features: torch.Tensor | np.ndarray, k: int, *, chunk: int = 4096,
             softmax_scale: float | None = None, scoring: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
        """Global class ids (rows of classes.parquet) and scores of the top-k classes, best first.

        Scores where the model is: features go to the model's device chunk by chunk. With
        `softmax_scale`, the scores are softmax probabilities of scale × score over every
        class of every group. `scoring`: "cosine" or "group-softmax" (GroupHeads.scores).
        """
        was_training = self.training
        self.eval()
        ids, scores = [], []
        for start in range(0, len(features), chunk):
            s = self.heads.scores(self.projection(self._on_device(features[start:start + chunk])), scoring)
            if softmax_scale is not None:
                s = torch.softmax(softmax_scale * s.float(), dim=1)
            top = s.topk(min(k, s.shape[1]), dim=1)
            ids.append(top.indices.cpu().numpy())
            scores.append(top.values.float().cpu().numpy())
        self.train(was_training)
        if not ids:
            kk = min(k, sum(self.heads.classes_per_group))
            return np.zeros((0, kk), np.int64), np.zeros((0, kk), np.float32)
        return np.concatenate(ids), np.concatenate(scores)


def top_cells(model: DCModel, features, classes: pl.DataFrame, k: int, scoring: str = "cosine") -> dict[str, np.ndarray]:
    """Top-k class ids and scores and their cell centres (UTM) for a batch of cached features."""
    ids, scores = model.topk(features, k, scoring=scoring)
    return {"class": ids, "score": scores,
            "east": classes["cell_east"].to_numpy()[ids], "north": classes["cell_north"].to_numpy()[ids],
            "zone": classes["utm_zone"].to_numpy()[ids], "letter": classes["utm_letter"].to_numpy()[ids]}


def check_features(run_features: dict, split_attrs: dict, *, what: str) -> None:
    """Refuse to apply a run to features from another backbone, pooling, size, crop or dim."""
    diff = identity_diff(run_features, split_attrs)
    if diff:
        shown = "; ".join(f"{k}: run {a!r} vs {b!r}" for k, (a, b) in diff.items())
        options = " ".join(f"{IDENTITY_OPTIONS[k]} {run_features[k]}" for k in diff if k in IDENTITY_OPTIONS)
        raise IncompatibleFeatures(f"{what} was made by another backbone or setting than the run's training "
                                   f"features ({shown}); extract it with the run's "
                                   f"{options or '--model/--pooling/--image-size/--crop'}")
