"""Fine-tuning the last K ViT blocks on cached tokens (`--cache-tokens K`, `--finetune-blocks K`).

`dcfeat extract --cache-tokens K` stores, per image, the hidden states entering block L − K
(`/<split>/tokens`, rows × T × hidden). Training then runs only those K blocks, the final layer
norm and the pooling (`TailBlocks`) on the cache, tuned with the projection and the heads: the
first L − K blocks never run again. A split cached deeper (K' > K) is fine: its extra K' − K
blocks run frozen. DINOv3's blocks also take RoPE position embeddings, recomputed from
the patch grid the cached tokens imply (square crops). The run keeps the tuned blocks and layer norm in `blocks.safetensors`;
evaluation embeds cached tokens through them, prediction swaps them into the full backbone.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcfeat import sampling
from dcfeat.backbone import POOLERS, Backbone, load_backbone, pool
from dcfeat.choices import DESCRIPTOR_POOLING
from dcfeat.devices import autocast
from dcfeat.errors import BadInput, DamagedRun, IncompatibleFeatures
from dcfeat.identity import model_source
from dcfeat.run import BLOCKS_FILE, save_tensors
from dcfeat.sampling import InMemoryBatches, StreamedBatches, read_rows
from dcfeat.store import Split, split_info

# Splits whose tokens take at most this much are trained from memory (on the training device);
# larger ones are streamed. ViT-B/14 at 224: 20 k images.
MEMORY_BYTES = 8 << 30
EMBED_ROWS = 256  # images per forward pass when embedding a split's tokens


class TailBlocks(nn.Module):
    """Last blocks of a ViT + final layer norm + pooling: cached tokens → pooled features.

    `frozen` blocks run first without gradients (tokens cached deeper than the tuned depth),
    then the `tuned` ones; only `tuned.*` and `layernorm.*` are the run's (`tuned_state`).
    `rope` (DINOv3) gives every block its position embeddings; it has no weights.
    """

    def __init__(self, frozen: list[nn.Module], tuned: list[nn.Module], layernorm: nn.Module, pooling: str,
                 registers: int, rope: nn.Module | None = None, patch_size: int = 14):
        super().__init__()
        self.frozen = nn.ModuleList(frozen).requires_grad_(False)
        self.tuned = nn.ModuleList(tuned)
        self.layernorm = layernorm
        self.rope = rope
        self.pooling, self.registers, self.patch_size = pooling, registers, patch_size

    def train(self, mode: bool = True) -> TailBlocks:
        # In training mode DINOv3's RoPE jitters and rescales patch coordinates; the cached tokens
        # were made without that, and evaluation runs without it, so positions stay as in eval.
        super().train(mode)
        if self.rope is not None:
            self.rope.eval()
        return self

    def _block_inputs(self, x: torch.Tensor) -> dict:
        if self.rope is None:
            return {}
        patches = x.shape[1] - 1 - self.registers
        side = math.isqrt(patches)
        if side * side != patches:
            raise BadInput(f"cached tokens of {x.shape[1]} per image do not form a square patch grid after CLS "
                           f"and {self.registers} registers; DINOv3 tails need square crops")
        # RoPE reads only the grid's shape; its cos/sin take the grid's dtype, which is bf16 under autocast as
        # in the bf16 backbone (fp32 cos/sin beside bf16 values would make attention's inputs disagree).
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        grid = x.new_empty(1, 1, side * self.patch_size, side * self.patch_size, dtype=dtype)
        return {"position_embeddings": self.rope(grid)}

    @property
    def depth(self) -> int:
        """Deepest cache this tail accepts: tokens entering the last `depth` blocks."""
        return len(self.frozen) + len(self.tuned)

    def forward(self, tokens: torch.Tensor, cached: int | None = None) -> torch.Tensor:
        """(B, T, hidden) tokens entering the last `cached` blocks → (B, dim) float32."""
        cached = self.depth if cached is None else cached
        x = tokens.to(self.layernorm.weight.dtype)
        extra = self._block_inputs(x)
        with torch.no_grad():
            for block in self.frozen[self.depth - cached:]:
                x = block(x, **extra)
        for block in self.tuned:
            x = block(x, **extra)
        return pool(self.layernorm(x), self.pooling, self.registers)

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """The run's part of the tail (tuned blocks, layer norm), copied to the CPU."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()
                if not k.startswith("frozen.")}


def require_tokens(store: Path, split: str, blocks: int) -> int:
    """K' of the split's cached tokens, refusing a split that holds none or too few blocks' worth."""
    have = split_info(store, split).cache_tokens
    if have < blocks:
        what = f"tokens entering only the last {have} blocks" if have else "no cached tokens"
        raise IncompatibleFeatures(f"split '{split}' of {store} has {what}, and the run tunes the last {blocks} "
                                   f"blocks. Add them with `dcfeat extract --split {split} --out {store} "
                                   f"--cache-tokens {blocks} --overwrite` and the split's other options as before")
    return have


def check_blocks(store: Path, split: str, blocks: int) -> None:
    """Refuse --finetune-blocks below 1, naming the depth the split's cached tokens allow, and any on the
    descriptors of a torch.hub model (no blocks dcfeat knows)."""
    info = split_info(store, split)
    if info.attrs.get("pooling") == DESCRIPTOR_POOLING:
        raise BadInput(f"--finetune-blocks {blocks}: split '{split}' of {store} holds the descriptors of "
                       f"{info.attrs.get('model')}, a torch.hub model; tuned blocks are for DINOv2/DINOv3 checkpoints. "
                       "Pass --finetune-blocks 0")
    if blocks >= 1:
        return
    have = info.cache_tokens
    if have:
        raise BadInput(f"--finetune-blocks {blocks}: choose 1 to {have} (split '{split}' of {store} caches the "
                       f"tokens entering the last {have} blocks), or 0 to tune no block")
    raise BadInput(f"--finetune-blocks {blocks}: choose 0 (tune no block), or 1 to K after caching tokens with "
                   f"`dcfeat extract --split {split} --out {store} --cache-tokens K --overwrite` (split '{split}' "
                   "caches none)")


def load_tail(features: dict, cached: int, tuned: int) -> TailBlocks:
    """The last `cached` blocks of the features' own checkpoint (checked), the last `tuned` trainable; fp32, CPU."""
    source = model_source(features)
    backbone = load_backbone(source, pooling=features["pooling"], device="cpu")
    if backbone.fingerprint != features.get("model_fingerprint"):
        raise IncompatibleFeatures(f"checkpoint '{source}' holds other weights than the model that cached the "
                                   f"tokens (fingerprint {backbone.fingerprint} vs "
                                   f"{features.get('model_fingerprint')}): tuned blocks must start from the very "
                                   f"same checkpoint. Restore it, or re-extract with --model {source}")
    L = backbone.num_layers
    if not 0 < tuned <= cached:
        raise BadInput(f"--finetune-blocks {tuned}: choose 1 to {cached} (the split caches the tokens entering "
                       f"the last {cached} of {L} blocks)")
    if cached > L:
        raise IncompatibleFeatures(f"the split caches the tokens entering the last {cached} blocks, but checkpoint "
                                   f"'{source}' has {L}: re-extract the split with --model {source}")
    layers = backbone.blocks
    tail = TailBlocks(list(layers[L - cached:L - tuned]), list(layers[L - tuned:]), backbone.norm,
                      backbone.pooling, backbone.num_register_tokens, backbone.rope, backbone.patch_size)
    tail.tuned.requires_grad_(True)
    tail.layernorm.requires_grad_(True)
    return tail


@torch.no_grad()
def embed_tokens(tail: TailBlocks, store: Path, split: str, cached: int, device: torch.device,
                 rows: int = EMBED_ROWS) -> np.ndarray:
    """(rows, dim) float32 features of a split's cached tokens through `tail`."""
    was_training = tail.training
    tail.eval()
    n = split_info(store, split).rows
    out = []
    for start in range(0, n, rows):
        x = torch.from_numpy(read_rows(store, split, "tokens", [(start, min(start + rows, n))])).to(device)
        with autocast(device):
            out.append(tail(x, cached).float().cpu().numpy())
    tail.train(was_training)
    dim = POOLERS[tail.pooling][0] * tail.layernorm.normalized_shape[0]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


class TokenTraining:
    """train.train's hook when the last K blocks are tuned: batches of cached tokens through the tail."""

    def __init__(self, store: Path, split: str, tail: TailBlocks, lr: float, cached: dict[str, int]):
        self.store, self.split, self.tail, self.lr, self.cached = Path(store), split, tail, lr, cached
        self.streamed = False
        self.source: InMemoryBatches | StreamedBatches | None = None  # the batches of cached tokens (start)

    @classmethod
    def open(cls, store: Path, split: str, val_split: str | None, features: dict, blocks: int,
             lr: float) -> TokenTraining:
        check_blocks(store, split, blocks)
        cached = {s: require_tokens(store, s, blocks) for s in (split, val_split) if s}
        return cls(store, split, load_tail(features, max(cached.values()), blocks), lr, cached)

    def param_groups(self) -> list[dict]:
        return [{"params": [*self.tail.tuned.parameters(), *self.tail.layernorm.parameters()], "lr": self.lr}]

    def start(self, part, sampler, steps: int, config, device: torch.device):
        """The batch source of train.train: (group, pooled features with gradients, labels) per step."""
        self.tail.to(device).train()
        info = split_info(self.store, self.split)
        cached = self.cached[self.split]
        if info.rows * info.token_bytes_per_image <= MEMORY_BYTES:
            tokens = torch.from_numpy(read_rows(self.store, self.split, "tokens", [(0, info.rows)])).to(device)
            self.source = InMemoryBatches(tokens, sampler, config.batch_size)
        else:
            self.streamed = True
            self.source = StreamedBatches(self.store, self.split, "tokens", info.rows, part, steps,
                                          config.batch_size, device, sampler.generator, config.seed)

        def batches(step: int, groups: list[int]):
            g, tokens, labels = self.source(step, groups)
            return g, self.tail(tokens, cached), labels

        return batches

    def features_of(self, split: Split) -> Split:
        dev = self.tail.layernorm.weight.device
        return replace(split, embeddings=embed_tokens(self.tail, self.store, split.name, self.cached[split.name], dev))

    def save(self, out: Path, epoch: int, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Write the tuned blocks (or `state`, a copy of them) with the run, recording their epoch;
        returns what was written, a CPU copy."""
        state = state if state is not None else self.tail.tuned_state()
        save_tensors(Path(out) / BLOCKS_FILE, state, {"epoch": str(epoch)})
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Back to blocks that `save` wrote (the kept epoch's)."""
        self.tail.load_state_dict(state, strict=False)

    def tokens(self) -> dict:
        """How the cached tokens are read, for the run's record (`RunDetails.tokens`)."""
        tokens = {"cached": self.cached, "streamed": self.streamed}
        if self.streamed:
            tokens.update(chunk_rows=sampling.CHUNK_ROWS, buffer_chunks=sampling.BUFFER_CHUNKS)
        return tokens


def tuned_splits(run, store: Path, splits: list[Split], device: torch.device) -> list[Split]:
    """The splits with their features recomputed from cached tokens through the run's tuned blocks."""
    blocks = int(run.finetune_blocks)
    cached = [require_tokens(store, s.name, blocks) for s in splits]
    tail = load_tail(run.feature_identity.attrs(), max(cached), blocks)
    load_blocks(tail, run, strict=False)
    tail.to(device)
    return [replace(s, embeddings=embed_tokens(tail, store, s.name, c, device)) for s, c in zip(splits, cached)]


def use_tuned_blocks(backbone: Backbone, run) -> None:
    """Replace the backbone's last K blocks and final layer norm by the run's tuned ones, in place."""
    blocks = int(run.finetune_blocks)
    layers = backbone.blocks
    target = nn.Module()
    target.tuned = nn.ModuleList(layers[len(layers) - blocks:])
    target.layernorm = backbone.norm
    load_blocks(target, run)


def load_blocks(module: nn.Module, run, *, strict: bool = True) -> None:
    """The run's tuned blocks (`tuned.*`, `layernorm.*`) into `module`; a file that does not fit is damaged."""
    try:
        missing, unexpected = module.load_state_dict(run.blocks, strict=strict)
    except RuntimeError as e:  # shapes, or (strict) keys
        missing, unexpected = [str(e).strip().splitlines()[-1].strip()], []
    missing = [k for k in missing if not k.startswith("frozen.")]
    if missing or unexpected:
        path = Path(run.directory) / BLOCKS_FILE
        raise DamagedRun(f"{path} does not fit the last {run.finetune_blocks} blocks of the run's "
                         f"backbone ({(missing + unexpected)[0]}): it was edited or damaged. Restore it from a copy "
                         "of the run, or train the run again with the command in its command.txt")
