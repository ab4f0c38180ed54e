"""The frozen backbone: loading, pooling, and what identifies its features.

`load_backbone` gives a `FrozenBackbone`, the one thing the stages use: a DINOv2/DINOv3 `Backbone`
(below), or a torch.hub descriptor model, `dcfeat.hub.HubBackbone`, for a `torchhub:` model string.

Any checkpoint `transformers.AutoModel` loads as one of `FAMILIES` (hub id or local directory):
DINOv2 with or without registers, DINOv3 ViT; patch size, registers and depth come from its config.
Weights load from safetensors only: a pickled `pytorch_model.bin` can run code when loaded. A local
directory whose config.json has `"dcfeat_random_init": true` is a randomly initialised model (the
demo's and the tests'); every number made with it is labelled as such.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from dcfeat.checkpoints import hub_source, looks_like_path, missing_weights
from dcfeat.choices import DEFAULT_MODEL
from dcfeat.devices import compute_dtype, resolve_device
from dcfeat.errors import BadInput, EnvironmentProblem, writing
from dcfeat.hub import HubBackbone, is_hub, load_hub_backbone
from dcfeat.identity import weights_fingerprint
from dcfeat.images import normalize


@dataclass(frozen=True)
class Family:
    """Where one transformers model type keeps its parts (submodule paths), for the tuned tail."""

    blocks: str  # the transformer blocks, in order; hidden_states[i] is the first i blocks' output
    norm: str  # the final layer norm, whose output is pooled
    rope: str | None  # module whose output every block takes as `position_embeddings` (RoPE), if any
    example: str  # a hub id of the family, for messages


# model_type → Family. Token order is the same in all: CLS, then registers, then patches.
FAMILIES = {
    "dinov2": Family("encoder.layer", "layernorm", None, "facebook/dinov2-base"),
    "dinov2_with_registers": Family("encoder.layer", "layernorm", None, "facebook/dinov2-with-registers-base"),
    "dinov3_vit": Family("model.layer", "norm", "rope_embeddings", "facebook/dinov3-vitb16-pretrain-lvd1689m"),
}
# Said wherever numbers of features from a randomly initialised backbone appear.
RANDOM_NOTICE = "RANDOM BACKBONE: these numbers measure the pipeline, not DINOv2"
# Config keys that do not change the function the weights compute (bookkeeping, dtype, output switches).
_NOT_ARCHITECTURE = {"transformers_version", "torch_dtype", "dtype", "architectures", "attn_implementation",
                     "return_dict", "output_hidden_states", "output_attentions", "use_cache", "id2label",
                     "label2id"}


def _gem(tokens: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return tokens.float().clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)


# choices.POOLINGS name → (pooled dim as a multiple of the hidden size, pooling of (CLS, patch tokens))
POOLERS = {
    "cls": (1, lambda cls, patches: cls),
    "mean": (1, lambda cls, patches: patches.mean(dim=1)),
    "gem": (1, lambda cls, patches: _gem(patches)),
    "cls+mean": (2, lambda cls, patches: torch.cat([cls, patches.mean(dim=1)], dim=1)),
}


def pool(sequence: torch.Tensor, pooling: str, registers: int) -> torch.Tensor:
    """(B, dim) float32 pooled feature of final-layer-normed tokens (B, T, hidden).

    Token 0 is CLS (`pooler_output` is exactly it), then `registers` register tokens, then patches.
    """
    return POOLERS[pooling][1](sequence[:, 0], sequence[:, 1 + registers:]).float()


class FrozenBackbone(Protocol):
    """What extract, predict and serve use of a backbone: `Backbone` and `dcfeat.hub.HubBackbone` both offer it."""

    model: nn.Module
    fingerprint: str  # the weights' (dcfeat.identity.weights_fingerprint)
    random_init: bool
    pooling: str
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str: ...  # for people: hub id, folder name or torch.hub model string, never a path

    @property
    def source(self) -> str: ...  # what to pass to load_backbone again

    @property
    def dim(self) -> int: ...

    @property
    def patch_size(self) -> int: ...  # image sides are multiples of it (1: any size)

    @property
    def record(self) -> dict: ...  # what a store records of the model besides the common attributes

    def check_cache_tokens(self, cache_tokens: int) -> None: ...

    def embed(self, batch_uint8: torch.Tensor, *, cache_tokens: int = 0): ...


@dataclass
class Backbone:
    """A DINOv2/DINOv3 ViT checkpoint, frozen: a FrozenBackbone with blocks the tuned tail (dcfeat.finetune) reuses."""

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
        return POOLERS[self.pooling][0] * self.hidden_size

    @property
    def num_register_tokens(self) -> int:
        return getattr(self.model.config, "num_register_tokens", 0) or 0

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @cached_property
    def family(self) -> Family:
        return FAMILIES[self.model.config.model_type]

    @property
    def blocks(self) -> nn.ModuleList:  # the model's own modules: tuning them tunes the backbone
        return self.model.get_submodule(self.family.blocks)

    @property
    def norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.norm)

    @property
    def rope(self) -> nn.Module | None:
        return self.model.get_submodule(self.family.rope) if self.family.rope else None

    @property
    def record(self) -> dict:
        return {}

    def check_cache_tokens(self, cache_tokens: int) -> None:
        if not 0 <= cache_tokens <= self.num_layers:
            raise BadInput(f"--cache-tokens {cache_tokens}: {self.name} has {self.num_layers} blocks; "
                           f"choose 0 to {self.num_layers}")

    def tokens_per_image(self, image_size: int) -> int:
        return 1 + self.num_register_tokens + (image_size // self.patch_size) ** 2

    @torch.inference_mode()
    def embed(self, batch_uint8: torch.Tensor, *, cache_tokens: int = 0):
        """(B, H, W, 3) uint8 images of one shape (H, W patch multiples) → (B, dim) float32 pooled features.

        With `cache_tokens=K`, also the hidden states entering the last K blocks (B, T, hidden), in
        the model's dtype: `hidden_states[0]` is the embeddings' output, `hidden_states[i]` that of
        the first i blocks, so `hidden_states[L − K]`.
        """
        x = normalize(batch_uint8.to(self.device, non_blocking=True), self.dtype)
        out = self.model(pixel_values=x, output_hidden_states=bool(cache_tokens))
        pooled = pool(out.last_hidden_state, self.pooling, self.num_register_tokens)
        if not cache_tokens:
            return pooled
        return pooled, out.hidden_states[self.num_layers - cache_tokens]


def _fingerprint(model: nn.Module, *, hash_name: str = "sha256") -> str:
    """The checkpoint's weights fingerprint: its config (architecture keys only) and every tensor."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in _NOT_ARCHITECTURE}
    return weights_fingerprint(json.dumps(config, sort_keys=True, default=str), model.state_dict(),
                               hash_name=hash_name)


def _safetensors_fix(where: str) -> str:
    return (f"{where} holds no safetensors weights, and dcfeat does not unpickle pytorch_model.bin (loading a "
            "pickle can run any code). Convert a checkpoint you trust once: `python -c \"from transformers "
            "import AutoModel; AutoModel.from_pretrained('DIR', use_safetensors=False)"
            ".save_pretrained('DIR-safe')\"` and pass --model DIR-safe")


def _unsupported(where: str, model_type) -> BadInput:
    examples = ", ".join(f.example for f in FAMILIES.values())
    return BadInput(f"--model {where}: a '{model_type}' checkpoint; dcfeat supports {', '.join(FAMILIES)} "
                    f"checkpoints (e.g. {examples})")


def _check_folder(folder: Path) -> None:
    """Refuse a local folder that is not a supported safetensors checkpoint, before transformers reads it."""
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise BadInput(f"--model {folder}: cannot read {config_file} ({type(e).__name__}); a checkpoint folder "
                       "holds config.json and model.safetensors, as `hf download facebook/dinov2-base "
                       f"--local-dir {folder}` writes them") from None
    if model_type not in FAMILIES:
        raise _unsupported(str(folder), model_type)
    if not any(folder.glob("*.safetensors")):
        raise BadInput(_safetensors_fix(f"--model {folder}"))


def _load_model(model: str, *, local: bool) -> nn.Module:
    """The checkpoint on the CPU in the dtype it stores; errors name the option and the fix.

    A hub id loads from the local cache's snapshot when that holds the whole checkpoint (no request),
    else from the hub once it answers (dcfeat.checkpoints): offline it fails at once.
    """
    from huggingface_hub import is_offline_mode

    where = model if local else hub_source(model)
    # After the checks: importing transformers takes seconds, and offline the answer comes without it.
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(where)
        if config.model_type not in FAMILIES:
            raise _unsupported(model, config.model_type)
        return AutoModel.from_pretrained(where, config=config, attn_implementation="sdpa", dtype="auto",
                                         use_safetensors=True)
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if local:
            raise BadInput(f"--model {model}: cannot load this checkpoint folder ({reason}). Download it again "
                           f"where there is network (`hf download facebook/dinov2-base --local-dir {model}`)") from None
        if where != model:
            raise EnvironmentProblem(f"--model {model}: its copy in the local Hugging Face cache ({where}) cannot be "
                                     f"loaded ({reason}). Delete that snapshot and download it again where there is "
                                     f"network (`hf download {model}`)") from None
        # Offline, a weights file missing from the cache reads the same as a repo without safetensors.
        if "cannot be loaded with `safetensors`" in str(e) and not is_offline_mode():
            raise BadInput(_safetensors_fix(f"--model {model} (hub)")) from None
        raise missing_weights(model, reason) from None


def load_backbone(model: str = DEFAULT_MODEL, *, pooling: str | None = None, device: str = "auto",
                  _dtype: torch.dtype | None = None) -> Backbone | HubBackbone:
    """Load a checkpoint of one of FAMILIES frozen, in eval mode, SDPA attention, bf16 on CUDA (`_dtype`: tests),
    pooled by `pooling` (default "cls"); or a `torchhub:` model (dcfeat.hub), which pools its own features."""
    if is_hub(model):
        return load_hub_backbone(model, pooling=pooling, device=device)
    pooling = pooling or "cls"
    if pooling not in POOLERS:
        raise BadInput(f"--pooling {pooling}: choose one of {', '.join(POOLERS)}")
    dev = resolve_device(device)
    dtype = _dtype or compute_dtype(dev)
    folder = Path(model).expanduser()
    local = folder.is_dir()
    if not local and looks_like_path(model):
        what = "not a directory" if folder.exists() else "no such directory"
        raise BadInput(f"--model {model}: {what}. Pass a checkpoint folder, or download one there where there is "
                       f"network (`hf download facebook/dinov2-base --local-dir {model}`)")
    if local:
        folder = folder.resolve()
        _check_folder(folder)
    source = str(folder) if local else model
    net = _load_model(source, local=local)
    _check_finite(net, source)
    fingerprint = _fingerprint(net)  # before the cast: the stored dtype's bytes
    net.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    random_init = bool(getattr(net.config, "dcfeat_random_init", False))
    return Backbone(model=net, name=folder.name if local else model, source=source, fingerprint=fingerprint,
                    random_init=random_init, pooling=pooling, device=dev, dtype=dtype)


def _check_finite(net: nn.Module, source: str) -> None:
    """Refuse a checkpoint holding NaN or inf when it is loaded (extract, predict, serve, a tuned tail):
    every feature would be NaN."""
    tensors = [(n, t) for n, t in [*net.named_parameters(), *net.named_buffers()]
               if t.is_floating_point() and t.numel()]
    if not tensors:
        return
    # A tensor's smallest and largest values: NaN propagates into both and an infinity is one of them. One pass
    # and no bool copy of the weights: ~30x faster than isfinite().all() on this CPU (BENCHMARKS.md, fingerprint).
    finite = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all() for _, t in tensors]).cpu().numpy()
    bad = [n for (n, _), ok in zip(tensors, finite) if not ok]
    if bad:
        raise BadInput(f"--model {source}: the checkpoint's weights are not finite: {len(bad)} of "
                       f"{len(tensors)} tensors hold NaN or inf, first: {', '.join(bad[:3])}. The checkpoint is "
                       "damaged or was saved from a diverged training: download or save it again, or pass another "
                       "--model")


# name → (hidden size, layers, heads): the shapes of the public DINOv2 checkpoints.
VIT_SHAPES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}


def save_random_vit(shape: str, directory: Path, **kw) -> Path:
    """`save_random_dinov2` at the shape of a public checkpoint ("vits14", "vitb14", "vitl14")."""
    hidden, layers, heads = VIT_SHAPES[shape]
    return save_random_dinov2(directory, hidden_size=hidden, layers=layers, heads=heads, **kw)


def random_vit(folder: Path) -> Path:
    """The randomly initialised DINOv2-S/14 (`save_random_vit("vits14")`, seed 0) in `folder`, saved there on
    first use and reused after: every copy has the same weights, so the same fingerprint.

    Saved under a temporary name and renamed into place, so a killed save leaves no folder that
    looks complete; of two processes saving at once (torchrun ranks), the first rename wins.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    with writing(folder.parent):  # a full disk or a read-only folder: one message naming it
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            save_random_vit("vits14", tmp)
            if folder.exists() and not (folder / "model.safetensors").is_file():
                shutil.rmtree(folder)  # an incomplete save of an older dcfeat, which saved in place
            try:
                tmp.rename(folder)
            except OSError:
                if not (folder / "model.safetensors").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_random_dinov2(directory: Path, *, hidden_size: int = 384, layers: int = 12, heads: int = 6,
                       patch_size: int = 14, image_size: int = 224, registers: int = 0,
                       seed: int = 0) -> Path:
    """A randomly initialised DINOv2 saved like a real checkpoint, marked as random.

    ViT-S/14 shape by default; tests pass tiny sizes.
    """
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    kwargs = {"hidden_size": hidden_size, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": 4 * hidden_size, "patch_size": patch_size, "image_size": image_size}
    torch.manual_seed(seed)
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        net = Dinov2WithRegistersModel(config)
    else:
        config = Dinov2Config(**kwargs)
        net = Dinov2Model(config)
    return _save_random(net, directory)


def save_random_dinov3(directory: Path, *, hidden_size: int = 384, layers: int = 12, heads: int = 6,
                       patch_size: int = 16, image_size: int = 224, registers: int = 4, seed: int = 0) -> Path:
    """A randomly initialised DINOv3 ViT (RoPE, registers) saved like a real checkpoint, marked as random."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=4 * hidden_size, patch_size=patch_size, image_size=image_size,
                             num_register_tokens=registers)
    torch.manual_seed(seed)
    return _save_random(DINOv3ViTModel(config), directory)


def _save_random(net: nn.Module, directory: Path) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    net.config.dcfeat_random_init = True
    net.save_pretrained(directory)
    return Path(directory)
