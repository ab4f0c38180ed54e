"""The frozen DINOv2 backbone: loading, pooling, and what identifies its features.

Any checkpoint `transformers.AutoModel` loads as DINOv2 (hub id or local
directory, with or without registers). A local directory whose config.json has
`"dcfeat_random_init": true` is a randomly initialised model (the demo's and
the tests'); every number made with it is labelled as such.
"""

from __future__ import annotations

from dcfeat.errors import EnvironmentProblem

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dcfeat.images import normalize

DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
DEFAULT_MODEL = "facebook/dinov2-base"


class BackboneError(EnvironmentProblem):
    """The backbone could not be loaded; the message says how to fix it."""


def _gem(tokens: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return tokens.float().clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)


# name → (pooled dim as a multiple of the hidden size, pooling of (CLS, patch tokens))
POOLINGS = {
    "cls": (1, lambda cls, patches: cls),
    "mean": (1, lambda cls, patches: patches.mean(dim=1)),
    "gem": (1, lambda cls, patches: _gem(patches)),
    "cls+mean": (2, lambda cls, patches: torch.cat([cls, patches.mean(dim=1)], dim=1)),
}


def pool(sequence: torch.Tensor, pooling: str, registers: int) -> torch.Tensor:
    """(B, dim) float32 pooled feature of final-layer-normed tokens (B, T, hidden).

    Token 0 is CLS (`pooler_output` is exactly it), then `registers` register tokens, then patches.
    """
    return POOLINGS[pooling][1](sequence[:, 0], sequence[:, 1 + registers:]).float()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


@dataclass
class Backbone:
    model: nn.Module
    name: str  # hub id, or the directory's name for a local checkpoint
    source: str  # what to pass to load_backbone again: hub id or absolute directory
    fingerprint: str
    random_init: bool
    pooling: str
    device: torch.device
    dtype: torch.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dim(self) -> int:
        return POOLINGS[self.pooling][0] * self.hidden_size

    @property
    def num_register_tokens(self) -> int:
        return getattr(self.model.config, "num_register_tokens", 0) or 0

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def tokens_per_image(self, image_size: int) -> int:
        return 1 + self.num_register_tokens + (image_size // self.model.config.patch_size) ** 2

    @torch.inference_mode()
    def embed(self, batch_uint8: torch.Tensor, *, cache_tokens: int = 0):
        """(B, S, S, 3) uint8 crops → (B, dim) float32 pooled features.

        With `cache_tokens=K`, also the hidden states entering block L − K (B, T, hidden), in the
        model's dtype: `hidden_states[0]` is the embeddings' output and `hidden_states[i]` block i's.
        """
        x = normalize(batch_uint8.to(self.device, non_blocking=True), self.dtype)
        out = self.model(pixel_values=x, output_hidden_states=bool(cache_tokens))
        pooled = pool(out.last_hidden_state, self.pooling, self.num_register_tokens)
        if not cache_tokens:
            return pooled
        return pooled, out.hidden_states[self.num_layers - cache_tokens]


def _fingerprint(model: nn.Module) -> str:
    """Identifies the weights cheaply: config + a few whole tensors, not the full file."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    state = model.state_dict()
    for key in sorted(state)[:4] + sorted(state)[-4:]:
        h.update(state[key].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_backbone(model: str = DEFAULT_MODEL, *, pooling: str = "cls", device: str = "auto") -> Backbone:
    """Load a DINOv2 checkpoint frozen, in eval mode, SDPA attention, bf16 on CUDA."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if pooling not in POOLINGS:
        raise BackboneError(f"--pooling {pooling}: choose one of {', '.join(POOLINGS)}")
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    local = Path(model).is_dir()
    try:
        config = AutoConfig.from_pretrained(model)
        if config.model_type not in DINOV2_TYPES:
            raise BackboneError(f"--model {model}: a '{config.model_type}' checkpoint, not DINOv2 "
                                f"({', '.join(DINOV2_TYPES)})")
        net = AutoModel.from_pretrained(model, attn_implementation="sdpa", dtype=dtype)
    except BackboneError:
        raise
    except (OSError, ValueError) as e:
        where = "the directory" if local else "the Hugging Face hub or its local cache"
        raise BackboneError(
            f"could not load DINOv2 weights '{model}' from {where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0]}\n"
            "Without network access, download them once where there is network "
            f"(`hf download {model if not local else 'facebook/dinov2-base'} --local-dir DIR`) "
            "and pass --model DIR, or set HF_HOME to a cache that holds them."
        ) from None
    net.eval().requires_grad_(False).to(dev)
    random_init = bool(getattr(config, "dcfeat_random_init", False))
    return Backbone(model=net, name=Path(model).name if local else model,
                    source=str(Path(model).resolve()) if local else model, fingerprint=_fingerprint(net),
                    random_init=random_init, pooling=pooling, device=dev, dtype=dtype)


def save_random_dinov2(directory: Path, *, hidden_size: int = 384, layers: int = 12, heads: int = 6,
                       patch_size: int = 14, image_size: int = 224, registers: int = 0,
                       seed: int = 0) -> Path:
    """A randomly initialised DINOv2 saved like a real checkpoint, marked as random.

    ViT-S/14 shape by default; tests pass tiny sizes.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    kwargs = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden_size, patch_size=patch_size, image_size=image_size)
    torch.manual_seed(seed)
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        net = Dinov2WithRegistersModel(config)
    else:
        config = Dinov2Config(**kwargs)
        net = Dinov2Model(config)
    net.config.dcfeat_random_init = True
    net.save_pretrained(directory)
    return Path(directory)
