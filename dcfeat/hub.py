"""VPR descriptor models published through torch.hub (MegaLoc, CosPlace, EigenPlaces, BoQ, SALAD) as the frozen backbone.

`torchhub:OWNER/REPO:ENTRY` is `torch.hub.load("OWNER/REPO", "ENTRY")` (the repository and the weights its
entry fetches download where the network allows); `torchhub:/path/to/clone:ENTRY` is
`torch.hub.load("/path/to/clone", "ENTRY", source="local")`. The entry's keyword arguments follow a `?`:
`torchhub:gmberton/cosplace:get_trained_model?backbone=ResNet50&fc_output_dim=2048` (integers, floats,
true/false and none are parsed; anything else stays a string).

Loading runs the repository's hubconf.py and all it imports: torch.hub's trust model, the same as calling
torch.hub.load yourself. Naming a GitHub repository on the command line is taken as trusting it
(`trust_repo=True`: torch.hub's own yes/no prompt would stall a server or a batch job); name only
repositories you trust. The weights such an entry fetches are read by the repository's own code.

The model maps an ImageNet-normalised batch (B, 3, H, W) to descriptors (B, d); a model that returns a tuple
(BoQ: descriptor, attention maps) gives its first element. dcfeat stores the descriptors as returned
(no L2 normalisation of its own), with pooling "descriptor": the model pools itself. The model runs frozen,
in eval mode, under bf16 autocast on CUDA (float32 weights), float32 on the CPU; d comes from one probe
forward pass when it loads.

What identifies the features: the repository (GitHub OWNER/REPO, or a clone's folder name, never its path),
the entry, its keyword arguments and a weights fingerprint (the class, its repr, the entry, its keyword
arguments and every tensor of the state dict; dcfeat.identity).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import torch
from torch import nn

from dcfeat.choices import DESCRIPTOR_POOLING, HUB_PREFIX
from dcfeat.devices import autocast, compute_dtype, resolve_device
from dcfeat.errors import BadInput, EnvironmentProblem, first_line
from dcfeat.identity import weights_fingerprint
from dcfeat.images import normalize

FORMS = ("torchhub:OWNER/REPO:ENTRY (GitHub) or torchhub:/path/to/clone:ENTRY (a local clone), entry keyword "
         "arguments after a ?, e.g. torchhub:gmberton/cosplace:get_trained_model?backbone=ResNet50&fc_output_dim=2048")
_GITHUB = re.compile(r"[A-Za-z0-9-]+/[A-Za-z0-9_.-]+(:[A-Za-z0-9_./-]+)?")
_INT = re.compile(r"[+-]?[0-9]+")
GITHUB_URL = "https://github.com"
# How long the GitHub form waits for GitHub to answer before it calls the machine offline: one try, no retries.
REACH_TIMEOUT_S = 5.0
PROBE_SIDE = 224  # the probe forward's image side (rounded up to the model's patch size) when no size is documented
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads HF_HUB_OFFLINE


@dataclass(frozen=True)
class KnownHubModel:
    """What a public VPR repository's README and hubconf.py document about one of its models."""

    repo: str  # GitHub OWNER/REPO
    entry: str
    kwargs: dict  # the README's call; a dcfeat model string names them all (hubconf defaults changed over time)
    dim: int  # descriptor width
    image_size: int | None  # the README's (square) input side; None where it documents none
    patch_size: int  # input sides must be multiples of it (1: any size)
    note: str = ""

    @property
    def model(self) -> str:
        return HubSpec(self.repo, self.entry, self.kwargs, local=False).name


# The public VPR models dcfeat knows, from their READMEs and hubconf.py files. Only the patch size is used
# (sizes a model cannot take are refused before extraction); the rest is the documentation's.
KNOWN_HUB_MODELS = {
    "megaloc": KnownHubModel("gmberton/MegaLoc", "get_trained_model", {}, 8448, None, 1,
                             "rounds H and W to multiples of 14 itself; its hubconf also loads facebookresearch/dinov2 "
                             "through torch.hub"),
    "cosplace": KnownHubModel("gmberton/CosPlace", "get_trained_model", {"backbone": "ResNet50", "fc_output_dim": 2048},
                              2048, None, 1, "ResNet18/50/101/152 or VGG16; fc_output_dim 32 to 2048 by backbone"),
    "eigenplaces": KnownHubModel("gmberton/EigenPlaces", "get_trained_model",
                                 {"backbone": "ResNet50", "fc_output_dim": 2048}, 2048, None, 1,
                                 "ResNet18 (256, 512), ResNet50/101 (128, 256, 512, 2048), VGG16 (512)"),
    "boq-resnet50": KnownHubModel("amaralibey/Bag-of-Queries", "get_trained_boq",
                                  {"backbone_name": "resnet50", "output_dim": 16384}, 16384, 384, 1,
                                  "returns (descriptor, attentions): dcfeat keeps the descriptor"),
    "boq-dinov2": KnownHubModel("amaralibey/Bag-of-Queries", "get_trained_boq",
                                {"backbone_name": "dinov2", "output_dim": 12288}, 12288, 322, 14,
                                "returns (descriptor, attentions): dcfeat keeps the descriptor"),
    "salad": KnownHubModel("serizba/salad", "dinov2_salad", {}, 8448, 322, 14, "DINOv2 ViT-B/14 + SALAD"),
}


def is_hub(model: str) -> bool:
    return str(model).startswith(HUB_PREFIX)


def _parse_value(text: str):
    if _INT.fullmatch(text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _format_value(value) -> str:
    """What `_parse_value` reads back as `value`."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class HubSpec:
    """A parsed `torchhub:` model string."""

    repo: str  # GitHub OWNER/REPO[:REF], or the clone's absolute folder
    entry: str
    kwargs: dict = field(default_factory=dict)
    local: bool = False

    @property
    def repo_name(self) -> str:
        """What identity records of the repository: the GitHub OWNER/REPO[:REF], or the clone's folder name."""
        return Path(self.repo).name if self.local else self.repo

    def _text(self, repo: str) -> str:
        query = "&".join(f"{k}={_format_value(v)}" for k, v in sorted(self.kwargs.items()))
        return f"{HUB_PREFIX}{repo}:{self.entry}" + (f"?{query}" if query else "")

    @property
    def name(self) -> str:
        """For people and for identity: no path, keyword arguments sorted."""
        return self._text(self.repo_name)

    @property
    def source(self) -> str:
        """What to pass to `load_backbone` again: the clone's absolute folder where it is local."""
        return self._text(self.repo)

    @property
    def known(self) -> KnownHubModel | None:
        """The public model this is, matched by repository name (a clone's folder keeps it), entry and kwargs."""
        name = self.repo_name.split(":")[0].split("/")[-1].lower()
        for known in KNOWN_HUB_MODELS.values():
            if (known.repo.split("/")[-1].lower() == name and known.entry == self.entry
                    and all(self.kwargs.get(k) == v for k, v in known.kwargs.items())):
                return known
        return None


def parse_hub(model: str) -> HubSpec:
    """`torchhub:REPO:ENTRY[?k=v&…]` → HubSpec; BadInput naming the two forms for anything else."""
    head, _, query = model[len(HUB_PREFIX):].partition("?")
    repo, sep, entry = head.rpartition(":")
    if not (model.startswith(HUB_PREFIX) and sep and repo and entry.isidentifier()):
        raise BadInput(f"--model {model}: not a torch.hub model; write {FORMS}")
    kwargs = {}
    for pair in query.split("&") if query else []:
        key, eq, value = pair.partition("=")
        if not (eq and key.isidentifier()):
            raise BadInput(f"--model {model}: '{pair}' is not a keyword argument KEY=VALUE; write {FORMS}")
        if key in kwargs:
            raise BadInput(f"--model {model}: keyword argument '{key}' is given twice")
        kwargs[key] = _parse_value(value)
    folder = Path(repo).expanduser()
    if folder.is_dir():
        return HubSpec(str(folder.resolve()), entry, kwargs, local=True)
    if not _GITHUB.fullmatch(repo):
        what = "not a folder" if folder.exists() else "no such folder"
        raise BadInput(f"--model {model}: {repo} is {what} here, nor a GitHub OWNER/REPO; write {FORMS}")
    return HubSpec(repo, entry, kwargs)


def _offline() -> bool:
    """HF_HUB_OFFLINE=1, dcfeat's one offline switch, keeps torch.hub models from contacting GitHub too."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES


def _unreachable(url: str, timeout: float) -> str | None:
    """Why `url` did not answer within `timeout` seconds (one try), or None when it answered at all."""
    try:
        with urlopen(Request(url, method="HEAD"), timeout=timeout):
            return None
    except HTTPError:  # it answered
        return None
    except (URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def _offline_fix(spec: HubSpec, why: str) -> EnvironmentProblem:
    """An EnvironmentProblem saying how to load `spec` without network: a local clone, and the weights' cache."""
    weights = (f"the weights its entry downloads are kept in {Path(torch.hub.get_dir()) / 'checkpoints'}: copy that "
               "folder from a machine where the entry ran, or set TORCH_HOME to one that holds them")
    if spec.local:
        return EnvironmentProblem(f"--model {spec.source}: {why}. Run it once where there is network: {weights}")
    owner_repo = spec.repo.split(":")[0]
    local = HubSpec(f"/path/to/{owner_repo.split('/')[1]}", spec.entry, spec.kwargs).source
    return EnvironmentProblem(f"--model {spec.source}: {why}. Where there is network, `git clone "
                              f"https://github.com/{owner_repo}` and pass --model {local}; {weights}")


def _github_repo(spec: HubSpec) -> str:
    """The repo string for torch.hub.load: pinned to the ref torch.hub's cache holds (then torch.hub asks GitHub
    nothing for the code), else the one given once GitHub answered within REACH_TIMEOUT_S; offline, at once
    an EnvironmentProblem naming the local form."""
    owner_repo, _, ref = spec.repo.partition(":")
    owner, name = owner_repo.split("/")
    hub_dir = Path(torch.hub.get_dir())
    for candidate in [ref] if ref else ["main", "master"]:
        if (hub_dir / f"{owner}_{name}_{candidate.replace('/', '_')}").is_dir():
            return f"{owner_repo}:{candidate}"
    why = "offline (HF_HUB_OFFLINE is set)" if _offline() else _unreachable(GITHUB_URL, REACH_TIMEOUT_S)
    if why:
        raise _offline_fix(spec, f"GitHub cannot be reached ({why}) and torch.hub's cache ({hub_dir}) holds no copy "
                                 f"of {owner_repo}")
    return spec.repo


def _entries(hubconf: Path) -> list[str]:
    """The public functions a hubconf.py defines, read from its source (not run again)."""
    try:
        tree = ast.parse(hubconf.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]


def load_hub_model(spec: HubSpec) -> nn.Module:
    """Run the entry (torch.hub.load); every failure a user can fix is a DcfeatError naming the entry or file."""
    what = spec.source
    hubconf = Path(spec.repo) / "hubconf.py" if spec.local else f"hubconf.py of github.com/{spec.repo.split(':')[0]}"
    call = f"{spec.entry}({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())})"
    if spec.local and not hubconf.is_file():
        raise BadInput(f"--model {what}: {hubconf} does not exist; a torch.hub repository keeps its entries in "
                       "hubconf.py at its top. Pass the folder of a clone of the model's repository")
    try:
        if spec.local:  # torch.hub asks no trust for a local folder: the user put it there
            net = torch.hub.load(spec.repo, spec.entry, source="local", **spec.kwargs)
        else:
            net = torch.hub.load(_github_repo(spec), spec.entry, trust_repo=True, verbose=False, **spec.kwargs)
    except ModuleNotFoundError as e:
        raise EnvironmentProblem(f"--model {what}: {hubconf} imports '{e.name}', which is not installed here: install "
                                 f"it (pip install {e.name}; a torchvision build must match the installed torch)") from None
    except RuntimeError as e:
        text = str(e)
        if text.startswith("Cannot find callable"):
            entries = ", ".join(_entries(hubconf)) if spec.local else ""
            raise BadInput(f"--model {what}: {hubconf} has no entry '{spec.entry}'"
                           + (f"; its entries: {entries}" if entries else "")) from None
        if text.startswith("Missing dependencies"):
            raise EnvironmentProblem(f"--model {what}: {hubconf} lists dependencies that are not installed here "
                                     f"({text.split(':', 1)[1].strip()}): install them") from None
        if "no internet connection" in text:
            raise _offline_fix(spec, f"{call} loads code that is neither cached nor reachable ({text})") from None
        raise
    except (URLError, ConnectionError, TimeoutError) as e:
        raise _offline_fix(spec, f"{call} could not download what it needs ({getattr(e, 'reason', e)})") from None
    except (TypeError, ValueError, AssertionError) as e:
        raise BadInput(f"--model {what}: {call} refused its arguments ({type(e).__name__}: {e}); see the entry "
                       f"in {hubconf} for the keyword arguments it takes") from None
    if not isinstance(net, nn.Module):
        raise BadInput(f"--model {what}: {call} returned a {type(net).__name__}, not a torch.nn.Module mapping an image "
                       "batch to descriptors")
    return net


def hub_fingerprint(net: nn.Module, spec: HubSpec) -> str:
    """The class, its repr, the entry and its keyword arguments (which may change what the weights compute
    without changing a tensor), and every tensor: never the repository's path or name."""
    architecture = json.dumps({"class": f"{type(net).__module__}.{type(net).__qualname__}", "repr": repr(net),
                               "entry": spec.entry, "kwargs": spec.kwargs}, sort_keys=True, default=str)
    return weights_fingerprint(architecture, net.state_dict())


def descriptors(out, batch: int, what: str) -> torch.Tensor:
    """A model's output for `batch` images → (batch, d) float32; BadInput naming the model when it is not that."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"--model {what}: the model returned {shape} for a batch of {batch} images; dcfeat needs a "
                       f"(batch, d) descriptor tensor (or a tuple whose first element is one)")
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        raise BadInput(f"--model {what}: the model's descriptors hold NaN or inf: its weights are damaged or its "
                       "activations overflow. Check the checkpoint, or pass another --model")
    return out


@dataclass
class HubBackbone:
    """A torch.hub descriptor model, frozen: what dcfeat.backbone.FrozenBackbone says a backbone offers."""

    model: nn.Module
    spec: HubSpec
    fingerprint: str
    dim: int
    patch_size: int  # 1 (any size) unless the model is one of KNOWN_HUB_MODELS that needs multiples
    device: torch.device
    dtype: torch.dtype  # what it computes in: bf16 autocast on CUDA (float32 weights), float32 on the CPU
    random_init: bool = False
    pooling: str = DESCRIPTOR_POOLING

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> str:
        return self.spec.source

    @property
    def record(self) -> dict:
        """What a store records of the model besides the common attributes (no path)."""
        return {"hub_repo": self.spec.repo_name, "hub_entry": self.spec.entry,
                "hub_kwargs": json.dumps(self.spec.kwargs, sort_keys=True)}

    def check_cache_tokens(self, cache_tokens: int) -> None:
        if cache_tokens:
            raise BadInput(f"--cache-tokens {cache_tokens}: {self.name} is a torch.hub descriptor model; cached tokens "
                           "and tuned blocks (--finetune-blocks) are for DINOv2/DINOv3 checkpoints. Pass --cache-tokens 0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised float32 on the device → (B, d) float32, checked."""
        try:
            with autocast(self.device):
                out = self.model(x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            line = first_line(e)
            raise BadInput(f"--model {self.name}: the model failed on a batch of shape {tuple(x.shape)} ({line}); "
                           "pass an --image-size it takes (e.g. the one its README names)") from None
        return descriptors(out, len(x), self.name)

    @torch.inference_mode()
    def embed(self, batch_uint8: torch.Tensor, *, cache_tokens: int = 0) -> torch.Tensor:
        """(B, H, W, 3) uint8 images of one shape → (B, dim) float32 descriptors, as the model returns them."""
        self.check_cache_tokens(cache_tokens)
        out = self.forward(normalize(batch_uint8.to(self.device, non_blocking=True), torch.float32))
        if out.shape[1] != self.dim:
            raise BadInput(f"--model {self.name}: descriptors of {out.shape[1]} values for {tuple(batch_uint8.shape[1:3])} "
                           f"images, of {self.dim} for the probe: its width depends on the input size, so descriptors "
                           "of different sizes share no space. Use --crop centre, and an --image-size it keeps the width at")
        return out


def load_hub_backbone(model: str, *, pooling: str | None = None, device: str | torch.device = "auto") -> HubBackbone:
    """`torchhub:` model string → HubBackbone, its width from one probe forward pass
    of two images of the ImageNet mean colour (zeros once normalised)."""
    spec = parse_hub(model)
    if pooling not in (None, DESCRIPTOR_POOLING):
        raise BadInput(f"--pooling {pooling}: {spec.name} is a torch.hub descriptor model, which pools its own "
                       f"features; leave --pooling out (its features are recorded with pooling '{DESCRIPTOR_POOLING}')")
    dev = resolve_device(device)
    net = load_hub_model(spec)
    net.eval().requires_grad_(False)
    fingerprint = hub_fingerprint(net, spec)  # before the move: the bytes as the entry made them
    net.to(dev)
    known = spec.known
    patch = known.patch_size if known else 1
    backbone = HubBackbone(model=net, spec=spec, fingerprint=fingerprint, dim=0, patch_size=patch, device=dev,
                           dtype=compute_dtype(dev))
    side = math.ceil((known.image_size if known and known.image_size else PROBE_SIDE) / patch) * patch
    with torch.inference_mode():
        backbone.dim = backbone.forward(torch.zeros(2, 3, side, side, device=dev)).shape[1]
    return backbone
