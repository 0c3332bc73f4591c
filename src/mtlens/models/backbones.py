"""Shared encoders: timm ResNets (dense, dilated or globally pooled), MultiLeNet, small CNN/MLP.

Every encoder returns the shared representation ``Z`` explicitly: B×C×h×w for dense encoders,
B×C for pooled/vector ones. Each exposes ``out_channels`` (C) and, when dense, ``output_stride``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigurationError, MissingDependencyError, ShapeError
from . import _torchvision_shim  # noqa: F401  (before timm imports torchvision)

OUTPUT_STRIDES = (8, 16, 32)
DEFAULT_PRETRAINED_TAG = "tv_in1k"
"""timm tag of the ImageNet weights downloaded for ``pretrained=True``: torchvision's original
ResNet weights, the ones LibMTL, MTAN, Nash-MTL and Rep-MTL start from."""


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state_dict from ``path`` (``torch.save`` file or ``.safetensors``).

    Accepts a bare state_dict or a checkpoint holding one under ``state_dict``, ``model`` or
    ``model_state_dict``; strips a DDP ``module.`` prefix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(
            f"weights file '{p}' does not exist; pass the path of a state_dict saved with "
            "torch.save(model.state_dict(), path) (or a .safetensors file)"
        )
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with timm
            raise MissingDependencyError(
                f"reading '{p}' needs the package 'safetensors': pip install safetensors"
            ) from exc
        obj: Any = load_file(str(p), device="cpu")
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt/unsafe files
            raise CheckpointError(f"could not read weights file '{p}': {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"'{p}' does not hold a state_dict (a mapping of parameter names to tensors); "
            "save one with torch.save(model.state_dict(), path)"
        )
    out = {}
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def load_weights_into(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str,
                      drop_prefixes: Sequence[str] = (), in_channels: int | None = None,
                      first_conv: str | None = None) -> None:
    """Strictly load ``state_dict`` into ``module`` with a readable error on any mismatch.

    Keys under ``drop_prefixes`` (e.g. an ImageNet classifier ``fc.``) are ignored. When
    ``first_conv`` names the input convolution and its weights have 3 input channels but the
    module has ``in_channels`` ≠ 3, they are adapted as timm does for ``in_chans``
    (``timm.models.adapt_input_conv``: summed for 1 channel, repeated and rescaled otherwise).
    """
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in drop_prefixes)}
    own = module.state_dict()
    if first_conv is not None and in_channels is not None:
        key = f"{first_conv}.weight"
        if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
            from timm.models import adapt_input_conv

            sd[key] = adapt_input_conv(in_channels, sd[key], base_chans=sd[key].shape[1])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with another shape (e.g. {k}: file {tuple(sd[k].shape)} vs model "
                f"{tuple(own[k].shape)})"
            )
        raise CheckpointError(
            f"weights from {source} do not fit the {type(module).__name__}: " + "; ".join(parts)
            + ". Pass a state_dict of the same architecture (for ResNets: a timm or torchvision "
            "resnet of the same depth; the classifier 'fc.*' is ignored)."
        )
    module.load_state_dict(sd, strict=True)


def _no_pretrained_error(arch: str, tag: str, exc: BaseException | None) -> MissingDependencyError:
    why = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if exc is not None else ""
    return MissingDependencyError(
        f"pretrained=True needs the ImageNet weights '{arch}.{tag}', which could not be "
        f"downloaded{why}. Fix: on a machine with network run "
        f"`torch.save(timm.create_model('{arch}.{tag}', pretrained=True).state_dict(), 'w.pt')` "
        "and pass weights='w.pt' (or pretrained_cfg_overlay=dict(file='w.pt')), "
        "or use pretrained=False."
    )


def cached_pretrained_file(arch: str, tag: str = DEFAULT_PRETRAINED_TAG) -> str | None:
    """The local file of timm's ``arch.tag`` ImageNet weights, or ``None``; never touches the network.

    Looks where timm's own download would have put them: the Hugging Face hub cache
    (``huggingface_hub.try_to_load_from_cache``, honouring ``HF_HOME`` / ``HF_HUB_CACHE``) for
    weights hosted on the hub, then torch.hub's ``checkpoints/`` folder (``TORCH_HOME``) for
    weights given by URL (torchvision's original files)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if filename:
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str) and Path(found).is_file():
                    return found
    if cfg.url:
        from urllib.parse import urlparse

        # timm's url is a string, or a (url, file name) pair whose file name is the cached file's (timm's
        # check_cached_file reads both forms)
        name = cfg.url[1] if isinstance(cfg.url, tuple) else Path(urlparse(cfg.url).path).name
        local = Path(torch.hub.get_dir()) / "checkpoints" / name
        if local.is_file():
            return str(local)
    return None


def _not_cached_error(arch: str, tag: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"pretrained=True needs the ImageNet weights '{arch}.{tag}', which are not in the local caches "
        f"(Hugging Face hub cache, torch hub '{Path(torch.hub.get_dir()) / 'checkpoints'}'), and mtlens "
        "downloads nothing unless asked. Fix: allow the download with download=True (command line: --set "
        "model.kwargs.download=true), or pass a local file with weights='w.pt' (saved on a machine with network "
        f"by `torch.save(timm.create_model('{arch}.{tag}', pretrained=True).state_dict(), 'w.pt')`), or use "
        "pretrained=False."
    )


def build_timm_resnet(
    arch: str,
    *,
    pooled: bool,
    in_channels: int = 3,
    output_stride: int = 32,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    pretrained_tag: str = DEFAULT_PRETRAINED_TAG,
    pretrained_cfg_overlay: dict | None = None,
    download: bool = False,
) -> nn.Module:
    """A timm ResNet trunk: dense features of the last stage, or globally pooled (B×C).

    ``output_stride`` 16 or 8 replaces the strides of the last one or two stages by dilation
    (timm ``output_stride``; the dilated ResNet of DeepLabV3, arXiv:1706.05587, and of
    LibMTL's ``resnet_dilated``). Weights, in order of precedence: ``weights`` (a local
    state_dict file), ``pretrained_cfg_overlay`` (timm's local ``file=``/``state_dict=``
    override), then ``pretrained=True``: timm's ``arch.pretrained_tag`` weights from the local
    caches (:func:`cached_pretrained_file`); when they are not cached, a timm download only with
    ``download=True``, otherwise at once a :class:`MissingDependencyError` naming the fixes (no
    network is reached unless asked: offline clusters are the normal case).
    """
    import timm

    if output_stride not in OUTPUT_STRIDES:
        raise ConfigurationError(f"output_stride={output_stride}; choose one of {OUTPUT_STRIDES}")
    if pooled and output_stride != 32:
        raise ConfigurationError("a globally pooled ResNet encoder keeps output_stride=32 (dilation "
                                 "only changes the cost before pooling)")
    kw: dict[str, Any] = {"in_chans": in_channels}
    if pooled:
        kw.update(num_classes=0, global_pool="avg")
    else:
        kw.update(features_only=True, out_indices=(-1,), output_stride=output_stride)
    name = f"{arch}.{pretrained_tag}"
    if weights is not None:
        net = timm.create_model(arch, pretrained=False, **kw)
        load_weights_into(net, read_state_dict(weights), source=f"'{weights}'", drop_prefixes=("fc.",),
                          in_channels=in_channels, first_conv="conv1")
    elif pretrained_cfg_overlay is not None:
        try:
            net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=pretrained_cfg_overlay,
                                    **kw)
        except (OSError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                "timm could not load the weights given by "
                f"pretrained_cfg_overlay={pretrained_cfg_overlay!r}: {exc}. "
                f"Pass a state_dict of a timm/torchvision {arch}."
            ) from exc
    elif pretrained:
        local = cached_pretrained_file(arch, pretrained_tag)
        if local is not None:
            net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": local}, **kw)
        elif not download:
            raise _not_cached_error(arch, pretrained_tag)
        else:
            try:
                net = timm.create_model(name, pretrained=True, **kw)
            except OSError as exc:  # no network (huggingface_hub, urllib errors)
                raise _no_pretrained_error(arch, pretrained_tag, exc) from exc
    else:
        net = timm.create_model(arch, pretrained=False, **kw)
    return net


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------
class ResNetEncoder(nn.Module):
    """ResNet-18/50 trunk (timm) returning the last stage's map ``Z``: B×C×H/s×W/s.

    Reference: He et al. 2016 (arXiv:1512.03385); dilation for output stride 16/8 as in
    DeepLabV3 (arXiv:1706.05587). ``C`` = 512 (ResNet-18) or 2048 (ResNet-50). Default
    ``output_stride=32`` (no dilation). See :func:`build_timm_resnet` for the weights options.
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, output_stride: int = 32,
                 pretrained: bool = False, weights: str | os.PathLike | None = None,
                 pretrained_tag: str = DEFAULT_PRETRAINED_TAG, pretrained_cfg_overlay: dict | None = None,
                 download: bool = False):
        super().__init__()
        body: Any = build_timm_resnet(arch, pooled=False, in_channels=in_channels,  # a timm features net
                                      output_stride=output_stride, pretrained=pretrained, weights=weights,
                                      pretrained_tag=pretrained_tag,
                                      pretrained_cfg_overlay=pretrained_cfg_overlay, download=download)
        self.body = body
        self.arch = arch
        self.output_stride = output_stride
        self.out_channels = int(body.feature_info.channels()[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)[-1]


class PooledResNetEncoder(nn.Module):
    """ResNet trunk + global average pooling (+ LibMTL's Office hidden layer): ``Z`` is B×C.

    With ``hidden=512`` (default) this is LibMTL's Office-31/Office-Home encoder: ResNet-18 →
    avg-pool → Linear(512, 512) (weights N(0, 0.005), bias 0.1) → BatchNorm1d → ReLU →
    Dropout(0.5). ``hidden=None`` gives the bare pooled ResNet features (C = 512 / 2048).
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, hidden: int | None = 512,
                 dropout: float = 0.5, pretrained: bool = False, weights: str | os.PathLike | None = None,
                 pretrained_tag: str = DEFAULT_PRETRAINED_TAG, pretrained_cfg_overlay: dict | None = None,
                 download: bool = False):
        super().__init__()
        body: Any = build_timm_resnet(arch, pooled=True, in_channels=in_channels, pretrained=pretrained,
                                      weights=weights, pretrained_tag=pretrained_tag,
                                      pretrained_cfg_overlay=pretrained_cfg_overlay, download=download)
        self.body = body
        self.arch = arch
        feat = int(body.num_features)
        self.hidden: nn.Module
        if hidden is None:
            self.hidden = nn.Identity()
            self.out_channels = feat
        else:
            lin = nn.Linear(feat, hidden)
            nn.init.normal_(lin.weight, 0.0, 0.005)
            nn.init.constant_(lin.bias, 0.1)
            self.hidden = nn.Sequential(lin, nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout))
            self.out_channels = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(self.body(x))


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


class MultiLeNetEncoder(nn.Module):
    """MultiLeNet shared encoder (Sener & Koltun 2018, arXiv:1810.04650, MultiMNIST).

    conv 10@5×5 → max-pool 2 → ReLU → conv 20@5×5 [→ Dropout2d] → max-pool 2 → ReLU → flatten →
    fc 50 → ReLU; ``Z`` is B×50. ``input_size`` (default 36, the MultiMNIST canvas; the paper's
    code resizes to 28, giving the 320-input fc) sets the fc input: 20·6·6 = 720 at 36×36.
    ``dropout`` defaults to 0 (set 0.5 for the channel dropout of the paper's code).
    """

    def __init__(self, in_channels: int = 1, input_size: int | Sequence[int] = 36, features: int = 50,
                 dropout: float = 0.0):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        fh = _conv_out(_conv_out(h, 5) // 2, 5) // 2
        fw = _conv_out(_conv_out(w, 5) // 2, 5) // 2
        if fh < 1 or fw < 1:
            raise ConfigurationError(f"MultiLeNet needs inputs of at least 16×16, got input_size={(h, w)}")
        self.input_size = (h, w)
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(20 * fh * fw, features)
        self.out_channels = features

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ShapeError(
                f"MultiLeNetEncoder was built for {self.input_size} inputs, got {tuple(x.shape[-2:])}; "
                f"create the model with input_size={tuple(x.shape[-2:])}"
            )
        x = torch.relu(torch.max_pool2d(self.conv1(x), 2))
        x = torch.relu(torch.max_pool2d(self.drop(self.conv2(x)), 2))
        return torch.relu(self.fc(x.flatten(1)))


class SmallConvEncoder(nn.Module):
    """Tiny dense CNN (three 3×3 stride-2 conv–BN–ReLU blocks, output stride 8) for CPU runs.

    Not from a paper: the encoder of the ``tiny-dense`` preset for the synthetic dense scenes
    and for tests. Default ``widths=(16, 32, 64)``, so ``Z`` is B×64×H/8×W/8.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for c in widths:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        self.net = nn.Sequential(*layers)
        self.out_channels = int(cin)
        self.output_stride = 2 ** len(widths)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPEncoder(nn.Module):
    """Fully connected encoder for vector (or flattened) inputs: Linear–ReLU blocks, ``Z`` B×hidden[-1].

    Not from a paper: a plain baseline for tabular multi-task data (e.g. scikit-learn's
    ``load_linnerud``/``load_digits``). ``in_features`` is the flattened input size; default
    ``hidden=(64, 64)``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        if len(hidden) == 0:
            raise ConfigurationError("MLPEncoder needs at least one hidden layer (hidden=(64,) ...)")
        dims = [int(in_features), *[int(h) for h in hidden]]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.in_features = int(in_features)
        self.out_channels = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        if math.prod(x.shape[1:]) != self.in_features:
            raise ShapeError(
                f"MLPEncoder expects {self.in_features} input features per sample, got shape "
                f"{tuple(x.shape)}; create it with in_features={math.prod(x.shape[1:])}"
            )
        return self.net(x)
