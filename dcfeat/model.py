"""The trained classifier: projection + group heads, scoring every cell of every group (dcfeat.run saves and loads it)."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import nn

from dcfeat.heads import GroupHeads, Projection
from dcfeat.partition import centres_of

# Queries scored at once: their (chunk, classes) scores against every cell are what one pass holds.
SCORE_CHUNK = 4096
# Features projected at once by `DCModel.embed`.
EMBED_CHUNK = 65536


class DCModel(nn.Module):
    """Projection + group heads; scores every class of every group for a batch of features."""

    def __init__(self, in_dim: int, dim: int, classes_per_group: list[int], *, head: str, s: float, m: float,
                 easy_margin: bool = False, test_prototypes: str = "normalised"):
        super().__init__()
        self.projection = Projection(in_dim, dim)
        self.heads = GroupHeads(classes_per_group, head=head, dim=dim, s=s, m=m, easy_margin=easy_margin,
                                test_prototypes=test_prototypes)

    @property
    def device(self) -> torch.device:
        return self.projection.linear.weight.device

    def _on_device(self, rows) -> torch.Tensor:
        """A chunk of cached features (numpy, h5py slice or tensor) as a tensor on the model's device."""
        return (rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.asarray(rows))).to(self.device)

    @torch.no_grad()
    def embed(self, features, chunk: int = EMBED_CHUNK) -> torch.Tensor:
        """Projected unit embeddings (n, dim) of cached features, on the model's device, chunk by chunk."""
        if len(features) == 0:
            return torch.zeros((0, self.projection.linear.out_features), device=self.device)
        return torch.cat([self.projection(self._on_device(features[i:i + chunk]))
                          for i in range(0, len(features), chunk)])

    @torch.no_grad()
    def topk(self, features: torch.Tensor | np.ndarray, k: int, *, chunk: int = SCORE_CHUNK,
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
    centres = centres_of(classes, ids)
    return {"class": ids, "score": scores, "east": centres.east, "north": centres.north, "zone": centres.zone,
            "letter": centres.letter}
