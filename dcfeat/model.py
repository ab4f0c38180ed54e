"""The trained classifier: projection + group heads, scoring every cell of every group (dcfeat.run saves and loads it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from dcfeat.choices import SCORINGS
from dcfeat.heads import GroupHeads, Projection
from dcfeat.partition import centres_of

# Queries scored at once: their (chunk, classes) scores against every cell are what one pass holds.
SCORE_CHUNK = 4096
# Features projected at once by `DCModel.embed`.
EMBED_CHUNK = 65536


@dataclass
class Scores:
    """What one scoring pass (`DCModel.score`) says of each query: its top-k cells (n, k) under the pass's
    ranking and their "cosine" scores, the top cell's softmax probability over every cell and within its
    group, at the model's logit scale, the softmax's log normaliser over every cell (n,), and, where the
    ranking is not by cosine, the ranking's scores (n, k; None: the cosines); `softmax`, where asked for, the
    top cells' softmax probabilities over every cell (n, k)."""

    top_classes: np.ndarray
    cos_top: np.ndarray
    softmax_top1: np.ndarray
    group_top1: np.ndarray
    logit_scale: float
    log_norm: np.ndarray
    ranking: np.ndarray | None = None
    softmax: np.ndarray | None = None

    @property
    def score(self) -> np.ndarray:
        """The scores the cells are ranked by (n, k): cosines, or log group probabilities."""
        return self.cos_top if self.ranking is None else self.ranking

    def head(self, k: int) -> Scores:
        """These scores of the top k cells only (the top-1 figures are the same)."""
        return Scores(self.top_classes[:, :k], self.cos_top[:, :k], self.softmax_top1, self.group_top1,
                      self.logit_scale, self.log_norm, None if self.ranking is None else self.ranking[:, :k],
                      None if self.softmax is None else self.softmax[:, :k])

    def rows(self, index: np.ndarray) -> Scores:
        """These scores of some queries only (`index` into the rows)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Scores(self.top_classes[index], self.cos_top[index], self.softmax_top1[index], self.group_top1[index],
                      self.logit_scale, self.log_norm[index], pick(self.ranking), pick(self.softmax))

    def softmax_top(self, k: int) -> np.ndarray:
        """The top-k cells' softmax probabilities over every cell (n, k), at the logit scale."""
        return np.exp(self.logit_scale * self.cos_top[:, :k].astype(np.float64) - self.log_norm[:, None])


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

    def embedded(self, features, space: str) -> torch.Tensor:
        """Cached features as retrieval compares them, on the model's device: `embed`'s projection (space
        "projected"), or the features themselves ("raw")."""
        return self.embed(features) if space == "projected" else self._on_device(features)

    @torch.no_grad()
    def score(self, features: torch.Tensor | np.ndarray, k: int, *, scoring: str = "cosine",
              chunk: int = SCORE_CHUNK, softmax: bool = False, embedded: bool = False,
              normalisers: bool = True) -> Scores:
        """The one scoring of every cell of every group for cached features, chunk by chunk where the model
        is: per chunk one product with the prototypes (normalised once per call) gives the cosines, their
        top-k cells under `scoring` ("cosine" or "group-softmax", GroupHeads.scores), the log normaliser of
        the softmax over every cell and each group's, so that every probability follows without a second
        product. `softmax`: also the top cells' softmax probabilities over every cell as torch's softmax
        gives them (`Scores.softmax`; `softmax_top` is them within float rounding). `embedded`: the features
        are `embed`'s already (the caller needs them for more than the scores). Without `normalisers` (a
        ranking alone: `topk`, `top_cells`) no exp is taken over every cell under cosine scoring, and the
        probabilities and the log normaliser are NaN."""
        if scoring not in SCORINGS:
            raise ValueError(f"scoring {scoring!r}: choose one of {', '.join(SCORINGS)}")
        was_training = self.training
        self.eval()
        s, heads = self.heads.logit_scale, self.heads
        prototypes = heads.prototypes()
        group = torch.repeat_interleave(torch.arange(len(heads.classes_per_group)),
                                        torch.tensor(heads.classes_per_group, dtype=torch.long))  # each cell's group
        scale = torch.tensor([head_scale(heads[str(g)]) for g in range(len(heads.classes_per_group))])[group]
        group, scale = group.to(self.device), scale.to(self.device)
        kk = min(k, sum(heads.classes_per_group))
        out = {name: [] for name in ("ids", "cos", "soft", "group", "norm", "rank", "softmax")}
        for start in range(0, len(features), chunk):
            rows = self._on_device(features[start:start + chunk])
            cos, cosines, lse, norm = heads.cell_scores(rows if embedded else self.projection(rows), prototypes,
                                                        normalisers)
            log_group = lambda cols: ((scale[cols] * cosines.gather(1, cols) - lse[0].gather(1, group[cols]))  # noqa: E731
                                      - lse[1].gather(1, group[cols]))
            if scoring == "cosine":
                top = cos.topk(kk, dim=1)
                ids, values = top.indices, top.values
                first = log_group(ids[:, :1])[:, 0] if normalisers else None  # the top cell's log group probability
            else:
                top = heads.log_group_probabilities(cosines).topk(kk, dim=1)
                ids, values, first = top.indices, cos.gather(1, top.indices), top.values[:, 0]
                out["rank"].append(top.values.cpu().numpy())
            out["ids"].append(ids.cpu().numpy())
            out["cos"].append(values.cpu().numpy())
            if normalisers:
                out["norm"].append(norm.cpu().numpy())
                out["soft"].append(torch.exp(s * values[:, 0] - norm).cpu().numpy())
                out["group"].append(torch.exp(first).cpu().numpy())
            if softmax:
                out["softmax"].append(torch.softmax(s * cos, dim=1).gather(1, ids).cpu().numpy())
        self.train(was_training)
        if not out["ids"]:
            return Scores(np.zeros((0, kk), np.int64), np.zeros((0, kk), np.float32), np.zeros(0), np.zeros(0), s,
                          np.zeros(0), None if scoring == "cosine" else np.zeros((0, kk), np.float32),
                          np.zeros((0, kk), np.float32) if softmax else None)
        cat = lambda name, dtype=None: (np.concatenate(out[name]) if dtype is None  # noqa: E731
                                        else np.concatenate(out[name]).astype(dtype))
        if not normalisers:
            out["soft"] = out["group"] = out["norm"] = [np.full(len(features), np.nan)]
        return Scores(cat("ids"), cat("cos"), cat("soft", np.float64), cat("group", np.float64), s,
                      cat("norm", np.float64), cat("rank") if out["rank"] else None,
                      cat("softmax") if out["softmax"] else None)

    def topk(self, features: torch.Tensor | np.ndarray, k: int, *, chunk: int = SCORE_CHUNK,
             scoring: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
        """Global class ids (rows of classes.parquet) and scores of the top-k classes under `scoring`, best
        first (`score`)."""
        scores = self.score(features, k, scoring=scoring, chunk=chunk, normalisers=False)
        return scores.top_classes, scores.score


def head_scale(head: nn.Module) -> float:
    """The scale s of a group's probability: a margin head's s; 1 for a softmax head."""
    return float(getattr(head, "s", 1.0))


def top_cells(model: DCModel, features, classes: pl.DataFrame, k: int, scoring: str = "cosine",
              scores: Scores | None = None) -> dict[str, np.ndarray]:
    """Top-k class ids and scores and their cell centres (UTM) for a batch of cached features (or for
    `scores` already made for them under `scoring`)."""
    scores = scores if scores is not None else model.score(features, k, scoring=scoring, normalisers=False)
    ids, scores = scores.top_classes[:, :k], scores.score[:, :k]
    centres = centres_of(classes, ids)
    return {"class": ids, "score": scores, "east": centres.east, "north": centres.north, "zone": centres.zone,
            "letter": centres.letter}
