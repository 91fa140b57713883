"""The skeleton and timm contract shared by the pyramid backbones (DAT, EAPT).

Both families are a stem, four stages of channels-last ``(B, H, W, C)`` maps and a
classifier head. :class:`PyramidBackbone` holds everything that does not depend on the
attention inside the stages: the constructor's skeleton (stage sizes, stochastic-depth ramp,
``feature_info``, final norm and head), input checks, ``forward_features`` / ``forward_head``,
``forward_intermediates`` (which ``features_only`` uses), classifier reset, gradient
checkpointing, layer-decay groups, loading of checkpoint files, and the inspection API of
deformable blocks (:meth:`~PyramidBackbone.deformable_blocks`,
:meth:`~PyramidBackbone.forward_sampling_points`).
"""
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import adapt_input_conv, build_model_with_cfg, resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from ..checkpoint import load_state_dict_file, tensor_shapes
from ..hub import discard_on_failure, official_weights
from ..layers import SamplingPoints, attention_switches

__all__ = ['PyramidBackbone', 'build_pyramid', 'classifier_outputs', 'official_source', 'per_stage', 'pyramid_cfg']

# the classifier's weight in our layout and in the official DAT one
CLASSIFIER_WEIGHTS = ('head.fc.weight', 'cls_head.weight')


def per_stage(value, num_stages: int, name: str) -> tuple:
    """Broadcast a scalar to every stage or check a per-stage sequence's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f'{name} has {len(value)} entries; expected one per stage ({num_stages})')
        return tuple(value)
    return (value,) * num_stages


class PyramidBackbone(nn.Module):
    """Base of the four-stage backbones.

    A subclass's constructor calls ``super().__init__`` with the arguments below, builds its
    ``stem``, then its stages with :meth:`_build_stages` and the final norm and classifier with
    :meth:`_build_head`. Its stages are modules with a ``grad_checkpointing`` flag and a
    ``blocks`` sequence whose blocks hold their attention as ``attn``. ``checkpoint_filter``
    converts foreign state dicts; the pretrained config's ``first_conv`` names the stem's
    convolution.

    Args:
        img_size: input size the size-dependent tables are built for (other sizes resample them).
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: classifier pooling, ``'avg'`` (the papers') or any timm pool type.
        embed_dims: channels of the stages.
        patch_size: stem stride; every later stage halves the resolution.

    The families also share four regularisation arguments: ``drop_rate`` (dropout before the
    classifier, :meth:`_build_head`), ``proj_drop_rate`` (after projections and in MLPs),
    ``attn_drop_rate`` (on attention weights) and ``drop_path_rate`` (stochastic depth, ramped
    linearly over all blocks, :meth:`_build_stages`).
    """
    checkpoint_filter: Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]
    no_decay_names: Tuple[str, ...] = ()  # parameter names (last component) kept out of weight decay

    def __init__(self, img_size: Union[int, Tuple[int, int]], in_chans: int, num_classes: int, global_pool: str,
                 embed_dims: Sequence[int], patch_size: int):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}')
        # the input, the features and the classifier
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.min_input_size = patch_size * 2 ** (len(embed_dims) - 1)
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_classes = num_classes
        self.global_pool = global_pool

    def _build_stages(self, depths: Sequence[int], drop_path_rate: float,
                      make_stage: Callable[[int, int, int, Tuple[int, int], Sequence[float]], nn.Module]) -> None:
        """``self.stages`` and ``self.feature_info``, built in one loop.

        ``make_stage(i, dim_in, dim, feature_size, drop_path)`` builds stage ``i`` from
        ``dim_in`` to ``dim`` channels for its ``feature_size`` map at ``img_size`` (the size
        its tables are built for), with one stochastic-depth rate per block: a linear ramp
        over all blocks of the network.
        """
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1) (the stochastic-depth rate of the last block), '
                             f'got {drop_path_rate}')
        drop_paths = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        feature_size = [math.ceil(s / self.patch_size) for s in self.img_size]
        self.feature_info = []
        stages = []
        for i, dim in enumerate(self.embed_dims):
            if i > 0:
                feature_size = [math.ceil(s / 2) for s in feature_size]
            stages.append(make_stage(i, self.embed_dims[max(i - 1, 0)], dim, tuple(feature_size), drop_paths[i]))
            self.feature_info.append(dict(num_chs=dim, reduction=self.patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

    def _build_head(self, drop_rate: float) -> None:
        """The final LayerNorm and the pooled linear classifier (dropout ``drop_rate`` before it); then
        every module's initialisation."""
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, self.num_classes, pool_type=self.global_pool, drop_rate=drop_rate, input_fmt='NHWC')
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters() if name.rsplit('.', 1)[-1] in self.no_decay_names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f'expected a 4-D (batch, channels, height, width) image tensor, got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})')
        h, w = x.shape[-2:]
        if h < self.min_input_size or w < self.min_input_size:
            raise ValueError(
                f'input {h}x{w} is smaller than the {self.min_input_size}x{self.min_input_size} minimum of this '
                f'model (patch {self.patch_size} x {len(self.feature_info) - 1} downsamplings)')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning stage outputs (timm's ``forward_intermediates`` contract).

        Args:
            x: ``(B, C, H, W)`` images.
            indices: last ``n`` stages if int, all if None, else the listed stages.
            norm: apply the final norm to the last stage's output.
            stop_early: skip stages after the last requested one.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        extras = self._stage_inputs(x)
        x = self.stem(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x, *extras[i])
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else feat)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop stages (and head/norm) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images -> normalised last-stage map ``(B, H/32, W/32, C)``."""
        self._check_input(x)
        extras = self._stage_inputs(x)
        x = self.stem(x)
        for stage, extra in zip(self.stages, extras):
            x = stage(x, *extra)
        return self.norm(x)

    def _stage_inputs(self, images: torch.Tensor) -> List[tuple]:
        """What each stage takes from the input images besides the map (nothing here; EAPT's MCMD amplitudes)."""
        return [()] * len(self.stages)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def attention_modules(self) -> List[Tuple[int, int, nn.Module]]:
        """``(stage, block, attention)`` for every block of the network."""
        return [(i, j, block.attn) for i, stage in enumerate(self.stages) for j, block in enumerate(stage.blocks)]

    def deformable_blocks(self) -> List[Tuple[int, int, nn.Module]]:
        """``(stage, block, attention)`` for every block whose attention samples its keys at computed
        positions (DAT's deformable attention, EAPT's attention with offsets)."""
        return [(i, j, attn) for i, j, attn in self.attention_modules() if getattr(attn, 'deformable', False)]

    @torch.no_grad()
    def forward_sampling_points(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[SamplingPoints]]:
        """Classify ``x`` and return where every deformable block sampled its keys.

        Returns:
            ``(logits, points)``, one :class:`~deformvit.SamplingPoints` per deformable block
            (:meth:`deformable_blocks`) in network order; each holds ``(B, G, Hk, Wk, 2)``
            points and references over the block's input map.
        """
        records = []
        with attention_switches(self, record_sampling=True):
            logits = self(x)
            for stage, block, attn in self.deformable_blocks():
                points, reference, feature_size, align_corners = attn.recorded_points()
                records.append(SamplingPoints(stage, block, points, reference, feature_size,
                                              self.feature_info[stage]['reduction'], align_corners))
        return logits, records

    def load_pretrained(self, checkpoint_path: str, weights_only: bool = True) -> None:
        """Load a checkpoint file (``.pth`` / ``.safetensors``) through ``checkpoint_filter``.

        Called by ``timm.create_model(name, pretrained=True)`` with the official file from the cache,
        or with ``pretrained_cfg_overlay=dict(file=PATH)`` with yours; the model is built with the
        file's number of classes unless ``num_classes`` is given (:func:`build_pyramid`). The file's
        layout is checked first (:meth:`check_weights_layout`). The classifier is kept when its
        shape matches; a model built with another ``num_classes`` (fine-tuning) or none starts
        from a new one. The stem is adapted when ``in_chans`` differs. A cached download that
        fails here is removed (:func:`deformvit.hub.discard_on_failure`).
        """
        with discard_on_failure(checkpoint_path):
            self._load_weights_file(checkpoint_path, weights_only)

    def check_weights_layout(self, state_dict: Dict[str, torch.Tensor], path: str) -> None:
        """Raise a ValueError naming the model a state dict belongs to when it is another model than this one
        (a family with a way to tell, such as DAT's released variants, overrides this; by default any
        layout passes on to the shape checks of loading)."""

    def _load_weights_file(self, checkpoint_path: str, weights_only: bool) -> None:
        loaded = load_state_dict_file(checkpoint_path, weights_only=weights_only)
        self.check_weights_layout(loaded, os.fspath(checkpoint_path))
        state_dict = type(self).checkpoint_filter(loaded, self)
        first_conv = getattr(self, 'pretrained_cfg', {}).get('first_conv', '') + '.weight'
        if self.in_chans != 3 and first_conv in state_dict:
            state_dict[first_conv] = adapt_input_conv(self.in_chans, state_dict[first_conv])
        own = self.state_dict()
        head_keys = [k for k in ('head.fc.weight', 'head.fc.bias') if k in state_dict]
        if any(k not in own or own[k].shape != state_dict[k].shape for k in head_keys):
            for k in head_keys:
                state_dict.pop(k)
        mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise RuntimeError(
                f'{os.fspath(checkpoint_path)} does not fit this model: shapes differ for '
                + ', '.join(f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in mismatched[:4]))
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith('head.')]
        if missing or unexpected:
            raise RuntimeError(
                f'{os.fspath(checkpoint_path)} does not fit this model: missing {missing[:8]}'
                f'{"..." if len(missing) > 8 else ""}, unexpected {unexpected[:8]}{"..." if len(unexpected) > 8 else ""}')


def build_pyramid(cls: type, variant: str, pretrained: bool, **kwargs) -> PyramidBackbone:
    """``build_model_with_cfg`` for a :class:`PyramidBackbone`, reading weights from a file.

    ``pretrained=True`` loads the model's official weights: the file its pretrained cfg's ``url``
    names, downloaded once into the cache (:func:`deformvit.hub.official_weights`; timm's
    ``cache_dir`` argument chooses another folder), or a file of your own with
    ``pretrained_cfg_overlay=dict(file=PATH)``. Either is read by ``load_pretrained``.
    Without ``num_classes`` the model takes the file's: its classifier's outputs, or 0 (no
    classifier) for a file without one, so that no classifier is silently replaced by a random
    one; with ``num_classes`` (fine-tuning to other classes) a different count starts a new
    classifier, as in timm.
    """
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 1, 1))))))
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if pretrained and not overlay.get('file') and not overlay.get('state_dict'):
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=overlay)
        overlay['file'] = official_weights(variant, kwargs.get('cache_dir'), pretrained_cfg=cfg)
    if overlay.get('file'):
        overlay.setdefault('custom_load', True)  # read by PyramidBackbone.load_pretrained
        if pretrained and 'num_classes' not in kwargs:
            with discard_on_failure(overlay['file']):
                kwargs['num_classes'] = classifier_outputs(tensor_shapes(overlay['file']))
    return build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=cls.checkpoint_filter,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        pretrained_cfg_overlay=overlay,
        **kwargs)


def classifier_outputs(shapes: Dict[str, Tuple[int, ...]]) -> int:
    """The number of classes a checkpoint's classifier predicts (0 without a classifier), from its tensor
    shapes (:func:`~deformvit.checkpoint.tensor_shapes`), in our layout or the official DAT one."""
    for key in CLASSIFIER_WEIGHTS:
        if key in shapes:
            return shapes[key][0]
    return 0


def pyramid_cfg(size: int = 224, **kwargs) -> Dict:
    """timm ``pretrained_cfg`` of an ImageNet-1k pyramid at ``size`` (bicubic; center crop 0.875 at 224, none at
    other sizes, as fine-tuned models are evaluated); ``kwargs`` override."""
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, size, size), 'pool_size': (size // 32, size // 32),
        'crop_pct': 0.875 if size == 224 else 1.0, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head.fc', 'license': 'apache-2.0', **kwargs,
    }


def official_source(share_id: str, top1: float, release: str) -> Dict:
    """The ``pretrained_cfg`` fields of official weights published on the TsinghuaCloud share page ``share_id``
    (a Seafile server, where ``?dl=1`` is the file's direct download): ``url``, ``origin_url`` and a
    ``description`` with the release and its ImageNet-1k top-1 (%), as the release reports it."""
    share_page = f'https://cloud.tsinghua.edu.cn/f/{share_id}/'
    return dict(url=share_page + '?dl=1', origin_url=share_page,
                description=f'{release} ImageNet-1k weights, top-1 {top1:.1f} %')
