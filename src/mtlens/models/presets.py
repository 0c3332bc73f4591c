"""Built-in model presets (``mtlens.models.create(name, tasks)``).

==================== ============================================ ============= ========================
preset               encoder → Z                                  heads         setting
==================== ============================================ ============= ========================
``resnet18-light``   ResNet-18, stride 32 → B×512×H/32×W/32       LightConvHead Mao et al. (FD paper)
``deeplab-resnet50`` dilated ResNet-50, stride 8 → B×2048×H/8×W/8 ASPPHead      LibMTL/DB-MTL/Rep-MTL
``resnet18-office``  ResNet-18 + avg-pool + hidden 512 → B×512    Linear        LibMTL Office-31/Home
``lenet-multimnist`` MultiLeNet → B×50                            MLP 50→50→10  Sener & Koltun
``tiny-dense``       3-block CNN, stride 8 → B×64×H/8×W/8         LightConvHead CPU tests, synthetic
``mlp``              MLP → B×64                                   Linear        tabular data
``mpnn-qm9``         MPNN (NNConv+GRU+Set2Set) → B×64             Linear        Nash-MTL/LibMTL QM9
==================== ============================================ ============= ========================

Multi-input benchmarks (Office) encode each task's images with the same encoder:
``z_t = model.encode(x_t); model.decode(z_t, tasks=[t])``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from torch import nn

from ..errors import ConfigurationError
from .backbones import (
    DEFAULT_PRETRAINED_TAG,
    MLPEncoder,
    MultiLeNetEncoder,
    PooledResNetEncoder,
    ResNetEncoder,
    SmallConvEncoder,
    load_weights_into,
    read_state_dict,
)
from .heads import ASPPHead, LightConvHead, MLPHead, aspp_rates_for
from .hps import HPSModel
from .registry import register_model


def _finish(encoder: nn.Module, heads: Mapping[str, nn.Module], dense: bool) -> HPSModel:
    model = HPSModel(encoder, heads, dense=dense)
    model.feature_channels = int(getattr(encoder, "out_channels"))  # noqa: B009 - every preset encoder has one
    model.output_stride = getattr(encoder, "output_stride", None)
    return model


def _own_encoder_weights(preset: str, encoder: nn.Module, pretrained: bool, weights: str | os.PathLike | None) -> None:
    """Presets without ImageNet weights: ``weights`` loads an encoder state_dict; bare pretrained errs."""
    if weights is not None:
        load_weights_into(encoder, read_state_dict(weights), source=f"'{weights}'")
    elif pretrained:
        raise ConfigurationError(
            f"no pretrained weights exist for the '{preset}' encoder; pass weights='encoder_state_dict.pt' "
            "(saved with torch.save(model.encoder.state_dict(), path)) or pretrained=False"
        )


@register_model("resnet18-light")
def resnet18_light(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
                   weights: str | os.PathLike | None = None, output_stride: int = 32, head_hidden: int = 256,
                   pretrained_tag: str = DEFAULT_PRETRAINED_TAG, pretrained_cfg_overlay: dict | None = None,
                   download: bool = False
                   ) -> HPSModel:
    """ResNet-18 (output stride 32) + light conv heads: the light-weight setting of Mao et al.

    Reference: "Robust Analysis of Multi-Task Learning Efficiency: New Benchmarks on
    Light-Weighed Backbones ... by Feature Disentanglement" (ResNet-18 on NYUv2, Cityscapes,
    MetaGraspNet). Defaults: ``output_stride=32`` (8/16 dilate the last stages),
    ``head_hidden=256``; ImageNet weights: timm ``resnet18.tv_in1k`` (torchvision's), read from
    the local caches; ``download=True`` lets timm fetch them when they are not cached.
    """
    enc = ResNetEncoder("resnet18", in_channels=in_channels or 3, output_stride=output_stride,
                        pretrained=pretrained, weights=weights, pretrained_tag=pretrained_tag,
                        pretrained_cfg_overlay=pretrained_cfg_overlay, download=download)
    heads = {t: LightConvHead(enc.out_channels, c, hidden=head_hidden) for t, c in tasks.items()}
    return _finish(enc, heads, dense=True)


@register_model("deeplab-resnet50")
def deeplab_resnet50(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
                     weights: str | os.PathLike | None = None,
                     output_stride: int = 8, aspp_rates: Sequence[int] | None = None,
                     aspp_width: int = 256, dropout: float = 0.5,
                     pretrained_tag: str = DEFAULT_PRETRAINED_TAG, pretrained_cfg_overlay: dict | None = None,
                   download: bool = False
                     ) -> HPSModel:
    """Dilated ResNet-50 (output stride 8) + one DeepLabV3 ASPP head per task (NYUv2/Cityscapes).

    The setting of LibMTL, DB-MTL (arXiv:2308.12029) and Rep-MTL (arXiv:2507.21049) on NYUv2 and
    Cityscapes ("DeepLabV3+" in those papers). Defaults: ``output_stride=8``; ASPP rates
    ``aspp_rates_for(output_stride)`` = (12, 24, 36) at stride 8, (6, 12, 18) at 16, (3, 6, 9)
    at 32 (arXiv:1706.05587); ``aspp_width=256``, ``dropout=0.5``; ImageNet weights: timm
    ``resnet50.tv_in1k`` (torchvision's, as LibMTL).
    """
    enc = ResNetEncoder("resnet50", in_channels=in_channels or 3, output_stride=output_stride,
                        pretrained=pretrained, weights=weights, pretrained_tag=pretrained_tag,
                        pretrained_cfg_overlay=pretrained_cfg_overlay, download=download)
    rates = tuple(aspp_rates) if aspp_rates is not None else aspp_rates_for(output_stride)
    heads = {t: ASPPHead(enc.out_channels, c, rates=rates, width=aspp_width, dropout=dropout)
             for t, c in tasks.items()}
    return _finish(enc, heads, dense=True)


@register_model("resnet18-office")
def resnet18_office(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
                    weights: str | os.PathLike | None = None, hidden: int | None = 512, dropout: float = 0.5,
                    pretrained_tag: str = DEFAULT_PRETRAINED_TAG, pretrained_cfg_overlay: dict | None = None,
                   download: bool = False
                    ) -> HPSModel:
    """ResNet-18 + global pooling + hidden layer → Z (B×512), linear heads: LibMTL's Office setting.

    Office-31 / Office-Home (one task per domain, multi-input). Defaults from LibMTL's
    ``examples/office``: ``hidden=512`` (Linear + BatchNorm1d + ReLU + Dropout(``dropout=0.5``);
    ``hidden=None`` uses the pooled features directly) and a ``Linear(512, classes)`` per task.
    """
    enc = PooledResNetEncoder("resnet18", in_channels=in_channels or 3, hidden=hidden, dropout=dropout,
                              pretrained=pretrained, weights=weights, pretrained_tag=pretrained_tag,
                              pretrained_cfg_overlay=pretrained_cfg_overlay, download=download)
    heads = {t: MLPHead(enc.out_channels, c) for t, c in tasks.items()}
    return _finish(enc, heads, dense=False)


@register_model("lenet-multimnist")
def lenet_multimnist(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
                     weights: str | os.PathLike | None = None,
                     input_size: int | Sequence[int] = 36, head_hidden: Sequence[int] = (50,),
                     dropout: float = 0.0) -> HPSModel:
    """MultiLeNet (Sener & Koltun 2018, arXiv:1810.04650): LeNet encoder → Z (B×50), MLP heads.

    Defaults: single-channel ``input_size=36`` (the MultiMNIST canvas), heads fc 50→50→classes
    (``head_hidden=(50,)``, the paper's code; ``()`` for a single fc 50→classes),
    ``dropout=0.0`` (the paper's code uses channel dropout 0.5 after conv2).
    """
    enc = MultiLeNetEncoder(in_channels=in_channels or 1, input_size=input_size, dropout=dropout)
    _own_encoder_weights("lenet-multimnist", enc, pretrained, weights)
    heads = {t: MLPHead(enc.out_channels, c, hidden=head_hidden) for t, c in tasks.items()}
    return _finish(enc, heads, dense=False)


@register_model("tiny-dense")
def tiny_dense(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
               weights: str | os.PathLike | None = None,
               widths: Sequence[int] = (16, 32, 64), head_hidden: int = 32) -> HPSModel:
    """Tiny dense CNN (output stride 8) + light conv heads: for CPU runs, tests and synthetic scenes.

    Not from a paper. Defaults: encoder ``widths=(16, 32, 64)`` (Z is B×64×H/8×W/8),
    ``head_hidden=32``.
    """
    enc = SmallConvEncoder(in_channels=in_channels or 3, widths=widths)
    _own_encoder_weights("tiny-dense", enc, pretrained, weights)
    heads = {t: LightConvHead(enc.out_channels, c, hidden=head_hidden) for t, c in tasks.items()}
    return _finish(enc, heads, dense=True)


@register_model("mlp")
def mlp(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        hidden: Sequence[int] = (64, 64)) -> HPSModel:
    """MLP encoder → Z (B×hidden[-1]) + linear heads, for tabular (vector) inputs.

    Not from a paper. ``in_channels`` is the number of (flattened) input features and is
    required; default ``hidden=(64, 64)``.
    """
    if in_channels is None:
        raise ConfigurationError("the 'mlp' preset needs in_channels = the number of input features")
    enc = MLPEncoder(in_channels, hidden=hidden)
    _own_encoder_weights("mlp", enc, pretrained, weights)
    heads = {t: MLPHead(enc.out_channels, c) for t, c in tasks.items()}
    return _finish(enc, heads, dense=False)


@register_model("mpnn-qm9")
def mpnn_qm9(tasks: dict[str, int], in_channels: int | None = None, pretrained: bool = False,
             weights: str | os.PathLike | None = None,
             dim: int = 64, edge_dim: int = 5, steps: int = 3, edge_hidden: int = 128,
             set2set_steps: int = 3) -> HPSModel:
    """MPNN (NNConv + GRU + Set2Set) → Z (B×dim) + one linear head per target: the QM9 model of
    Nash-MTL (arXiv:2202.01017), FAMO and LibMTL.

    Needs the optional extra ``mtlens[graph]`` (torch_geometric). Inputs are PyG batches
    (:mod:`mtlens.data.qm9`); ``in_channels`` = node features (default 11), ``edge_dim = 5``
    (bond one-hot + distance). Defaults ``dim=64``, ``steps=3``, ``edge_hidden=128``,
    ``set2set_steps=3`` are the papers' (:class:`~mtlens.models.graph.MPNNEncoder`); heads are
    ``Linear(dim, 1)`` as theirs.
    """
    from .graph import MPNNEncoder

    enc = MPNNEncoder(in_channels=in_channels or 11, edge_dim=edge_dim, dim=dim, steps=steps,
                      edge_hidden=edge_hidden, set2set_steps=set2set_steps)
    _own_encoder_weights("mpnn-qm9", enc, pretrained, weights)
    heads = {t: MLPHead(enc.out_channels, c) for t, c in tasks.items()}
    return _finish(enc, heads, dense=False)
