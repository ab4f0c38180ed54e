"""Projection and classification heads: h = L2norm(W_proj f), one head per group.

Margin heads keep L2-normalised prototypes, so the logit of class k is
s·cos θ_k and training only moves angles. All margin arithmetic runs in
float32 even under autocast: cos θ near ±1 and the sin θ derived from it lose
everything in bf16 (8 bits of mantissa cannot tell cos 2° from 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dcfeat.choices import SCORINGS, TEST_PROTOTYPES
from dcfeat.devices import inner_products, is_cuda

_EPS = 1e-6  # keeps sin θ = sqrt(1 - cos² θ) and its gradient finite at cos θ = ±1


class Projection(nn.Module):
    """h = L2norm(W f): the learned map from cached backbone features to embeddings."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Cached features are often float16; the output is float32 for the heads.
        h = self.linear(features.to(self.linear.weight.dtype))
        return F.normalize(h.float(), dim=1, eps=_EPS)


class _MarginHead(nn.Module):
    """Cosine classifier with scale s; subclasses define the target-logit margin."""

    def __init__(self, dim: int, classes: int, s: float, m: float, easy_margin: bool = False) -> None:
        super().__init__()
        self.dim, self.classes, self.s, self.m, self.easy_margin = dim, classes, s, m, easy_margin
        self.weight = nn.Parameter(torch.empty(classes, dim))
        if classes:  # a group can end up with no class; init refuses empty tensors
            nn.init.xavier_uniform_(self.weight)

    def cosine(self, h: torch.Tensor) -> torch.Tensor:
        """cos θ (n, C) between embeddings and prototypes, returned as float32.

        Norms are taken in float32; the product itself runs in the autocast dtype
        when autocast is on: it is the step's largest matrix product (batch × d ×
        classes), and float32 there made a GPU step 8× slower than its bf16 matmuls
        (BENCHMARKS.md). bf16 cosines are good to ~3 digits, far finer than m.
        """
        h = F.normalize(h.float(), dim=1, eps=_EPS)
        w = F.normalize(self.weight.float(), dim=1, eps=_EPS)
        return F.linear(h, w).float()

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits s·cos θ (n, C); with labels, the margin is applied to each target logit.

        `classes` (sampled negatives): score only those prototypes; `labels` then index into them.

        Training logits stay in the autocast dtype: s is folded into the product and
        only the n target logits are recomputed, in float32 from their own rows, and
        written in place. Every full (n, C) float32 pass that this avoids cost as much
        as the matrix product itself on a GPU (BENCHMARKS.md).
        """
        if labels is None:
            return self.s * self.cosine(h)
        h = F.normalize(h.float(), dim=1, eps=_EPS)
        weight = self.weight if classes is None else self.weight[classes]
        w = F.normalize(weight.float(), dim=1, eps=_EPS)
        labels = labels.long()
        logits = F.linear(h * self.s, w)
        with torch.autocast(h.device.type, enabled=False):
            target = self.s * self.margin((h * w[labels]).sum(dim=1).clamp(-1.0, 1.0))
        return logits.scatter_(1, labels.unsqueeze(1), target.unsqueeze(1).to(logits.dtype))

    def extra_repr(self) -> str:
        return f"classes={self.classes}, dim={self.dim}, s={self.s:g}, m={self.m:g}"


class AAMC(_MarginHead):
    """Additive angular margin (ArcFace, D&C's head): target logit s·cos(θ_y + m)."""

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        cos = cos.clamp(-1.0, 1.0)
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=_EPS))
        shifted = cos * math.cos(self.m) - sin * math.sin(self.m)  # cos(θ + m), no acos
        # Past θ = π - m, cos(θ + m) rises again and would reward the target
        # prototype for moving further away. There ArcFace (insightface) uses
        # cos θ - m·sin m, cos(θ + m) to first order in m at θ = π - m: a
        # CosFace-like penalty that keeps the target logit falling in θ (it
        # jumps by at most m²/2 at the switch, which training never notices).
        # "Easy margin" (no margin while cos θ ≤ 0) is the other known fix, and
        # D&C's: it drops the margin for exactly the hardest examples, so it is
        # the dc-paper preset's choice only.
        if self.easy_margin:
            return torch.where(cos > 0, shifted, cos)
        return torch.where(cos > math.cos(math.pi - self.m), shifted, cos - self.m * math.sin(self.m))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", easy_margin=True" if self.easy_margin else "")


class LMCC(_MarginHead):
    """Large margin cosine (CosFace, CosPlace's head): target logit s·(cos θ_y − m)."""

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


class SoftmaxHead(nn.Module):
    """Plain linear layer with bias (PlaNet-style ablation); no scale, no margin."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.dim, self.classes = dim, classes
        self.weight = nn.Parameter(torch.empty(classes, dim))
        self.bias = nn.Parameter(torch.zeros(classes))
        if classes:
            nn.init.xavier_uniform_(self.weight)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits W h + b (n, C), or of `classes` only; labels are accepted for a common signature and ignored."""
        weight, bias = (self.weight, self.bias) if classes is None else (self.weight[classes], self.bias[classes])
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), weight.float(), bias.float())

    def extra_repr(self) -> str:
        return f"classes={self.classes}, dim={self.dim}"


def sample_negatives(labels: torch.Tensor, classes: int, fraction: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PartialFC-style class sampling: (classes to score, labels as positions among them).

    Every class present in the batch is kept, and each other class with probability `fraction`,
    so a step costs about fraction × the classes of the group instead of all of them.
    """
    keep = torch.rand(classes, generator=generator, device=labels.device) < fraction
    keep[labels] = True
    subset = torch.nonzero(keep).squeeze(1)
    position = torch.full((classes,), -1, dtype=torch.long, device=labels.device)
    position[subset] = torch.arange(len(subset), device=labels.device)
    return subset, position[labels]


# The class of each of choices.HEADS.
HEAD_CLASSES: dict[str, type[nn.Module]] = {"aamc": AAMC, "lmcc": LMCC, "softmax": SoftmaxHead}


# Queries whose s × cosines `_group_lse` exponentiates at once on a CPU: such a block of one group's cells stays
# in the cache between its passes (0.009 ms per query for the normalisers against 0.011 with a whole chunk at
# once: 3,146 cells in 4 groups, one thread). A GPU takes the chunk at once (a block is a kernel launch).
LSE_ROWS = 256


def _group_lse(cos: torch.Tensor, s: float) -> torch.Tensor:
    """(2, n): each query's largest s × cosine over one group's cells (n, cells) and the log of the sum of
    exp(s × cosine − largest), as `cell_scores` gives them; `LSE_ROWS` queries at a time."""
    # s × the largest cosine is the largest of s × cosine, bit for bit (rounding is monotone).
    peak = s * cos.amax(dim=1) if cos.shape[1] else torch.zeros(len(cos), device=cos.device)
    total, rows = torch.empty_like(peak), max(1, len(cos) if is_cuda(cos.device) else LSE_ROWS)
    for lo in range(0, len(cos), rows):
        total[lo:lo + rows] = (s * cos[lo:lo + rows]).sub_(peak[lo:lo + rows, None]).exp_().sum(dim=1)
    return torch.stack([peak, torch.log(total)])


class GroupHeads(nn.ModuleDict):
    """One head per group, keys "0", "1", ...; one flat state dict for the checkpoint.

    Global class id = offsets[g] + index, the row of the class table.
    """

    def __init__(self, classes_per_group: list[int], *, head: str, dim: int, s: float, m: float,
                 easy_margin: bool = False, test_prototypes: str = "normalised") -> None:
        if head not in HEAD_CLASSES:
            raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEAD_CLASSES)}")
        if test_prototypes not in TEST_PROTOTYPES:
            raise ValueError(f"test_prototypes {test_prototypes!r}: choose one of {', '.join(TEST_PROTOTYPES)}")
        make = HEAD_CLASSES[head]
        margin = issubclass(make, _MarginHead)
        super().__init__({str(g): make(dim, c, s, m, easy_margin) if margin else make(dim, c)
                          for g, c in enumerate(classes_per_group)})
        self.head, self.classes_per_group, self.test_prototypes = head, list(classes_per_group), test_prototypes
        # The scale of a probability over cells: s for margin heads, whose logits are s·cos θ;
        # 1 for the softmax head, whose logits are not cosines.
        self.logit_scale = float(s) if margin else 1.0
        self.offsets = [0]
        for c in self.classes_per_group:
            self.offsets.append(self.offsets[-1] + c)

    def scores(self, h: torch.Tensor, scoring: str = "cosine") -> torch.Tensor:
        """Inference scores (n, total classes), groups concatenated in group order.

        "cosine": margin heads score cos θ to every prototype, or h·w with the prototypes as trained
        when `test_prototypes` is "raw" (D&C's code; the paper's rule is the cosine).
        "group-softmax": the log of each group's own softmax probability at scale s, P(u, v) of
        D&C's Eq. 4.19-4.20: a cell wins by how sure its group's classifier is, not by its raw
        cosine. Softmax heads always score log-softmax within each group: raw logits of
        separately trained softmax heads are not comparable (cross-entropy is blind to a
        constant added to one group's logits), log-probabilities remove that offset.
        """
        if scoring not in SCORINGS:
            raise ValueError(f"scoring {scoring!r}: choose one of {', '.join(SCORINGS)}")
        parts = []
        unit = F.normalize(h.float(), dim=1, eps=_EPS)
        for g in range(len(self.classes_per_group)):
            head = self[str(g)]
            if isinstance(head, _MarginHead):
                # float16 operands, float32 cosines on CUDA: 5x the float32 product's speed. Raw
                # prototypes (D&C's test rule) only change the cosine ranking; a group's
                # probability is as trained, always on cosines.
                w = head.weight.float()
                if scoring == "cosine" and self.test_prototypes == "raw":
                    parts.append(inner_products(unit, w))
                else:
                    cos = inner_products(unit, F.normalize(w, dim=1, eps=_EPS))
                    parts.append(cos if scoring == "cosine" else F.log_softmax(head.s * cos, dim=1))
            else:
                parts.append(F.log_softmax(head(h), dim=1))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def prototypes(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per group, what `cell_scores` multiplies the queries by, made once per scoring pass: a margin
        head's normalised prototypes, and under raw `test_prototypes` the prototypes as trained too (they rank
        the cells; a probability is always on cosines); (None, None) for a softmax head."""
        out = []
        for g in range(len(self.classes_per_group)):
            head = self[str(g)]
            if not isinstance(head, _MarginHead):
                out.append((None, None))
                continue
            w = F.normalize(head.weight.float(), dim=1, eps=_EPS)
            out.append((w, head.weight.float() if self.test_prototypes == "raw" else None))
        return out

    def cell_scores(self, h: torch.Tensor, prototypes: list, normalisers: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The queries against every prototype (`prototypes()`): the "cosine" scores (n, total classes) that
        rank the cells, the cosines probabilities are made of (the same tensor but under raw prototypes),
        every group's log-sum-exp of s × cosine as (2, n, groups): its largest term and the log of the
        sum of exp(s × cosine − largest), and the log-sum-exp over every cell of s × the ranking scores (n,),
        the softmax's normaliser. The log of a cell's probability within its group is
        (s × cosine − largest) − log sum, as log_softmax makes it (0 and 0 for a softmax head, whose scores
        are already that); both normalisers None without `normalisers`. One product per group (two under raw
        prototypes); each group's exps are taken on its own product as it is made (`_group_lse`), and where
        the ranking is by cosine the normaliser over every cell is then their log-sum-exp (equal to the
        direct one within float32 rounding): no exp pass of its own over every cell."""
        unit = F.normalize(h.float(), dim=1, eps=_EPS)
        s = self.logit_scale  # every margin head's s
        ranks, cosines, lse = [], [], []
        for g, (w, raw) in enumerate(prototypes):
            cos = F.log_softmax(self[str(g)](h), dim=1) if w is None else inner_products(unit, w)
            ranks.append(cos if raw is None else inner_products(unit, raw))
            cosines.append(cos)
            if normalisers:
                lse.append(torch.zeros((2, len(h)), device=cos.device) if w is None else _group_lse(cos, s))
        rank = torch.cat(ranks, dim=1)
        cosines = rank if self.test_prototypes != "raw" else torch.cat(cosines, dim=1)
        if not normalisers:
            return rank, cosines, None, None
        lse = torch.stack(lse, dim=2)
        # Where the groups' terms are the ranking's (normalised prototypes, margin heads), the normaliser over
        # every cell is the log-sum-exp of the groups' own.
        if cosines is rank and all(w is not None for w, _ in prototypes):
            return rank, cosines, lse, torch.logsumexp(lse[0] + lse[1], dim=1)
        return rank, cosines, lse, torch.logsumexp(s * rank, dim=1)

    def log_group_probabilities(self, cos: torch.Tensor) -> torch.Tensor:
        """Every cell's log probability within its group (n, total classes) from `cell_scores`' cosines:
        the "group-softmax" scores, with no second product."""
        parts = []
        for g in range(len(self.classes_per_group)):
            head, part = self[str(g)], cos[:, self.offsets[g]:self.offsets[g + 1]]
            parts.append(F.log_softmax(head.s * part, dim=1) if isinstance(head, _MarginHead) else part)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def init_prototypes_(self, group: int, means: torch.Tensor) -> None:
        """Set group's prototypes to the given (C, d) class means, L2-normalised."""
        head = self[str(group)]
        if means.shape != head.weight.shape:
            raise ValueError(f"group {group} has prototypes {tuple(head.weight.shape)}, got means {tuple(means.shape)}")
        head.weight.copy_(F.normalize(means.to(head.weight), dim=1, eps=_EPS))
        if isinstance(head, SoftmaxHead):
            head.bias.zero_()
