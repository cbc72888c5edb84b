"""The embedding model: timm backbone -> (neck's pre-pool layers) -> pooling -> neck, ``(B, 3, H, W) -> (B, D)``.

The backbone is created with ``num_classes=0, global_pool=''`` so it returns its last feature map;
pooling and neck are ours (see :mod:`arcfold.models.pooling`, :mod:`arcfold.models.necks`).
The margin head is separate (:mod:`arcfold.models.heads`) and only exists while training.

Checkpoints (``models/<experiment>/fold<K>.pt``, and ``full.pt`` for the full-data fit: :data:`FULL_FIT`) hold
the embedding model's weights and the resolved config as plain data, so :func:`load_embedding_model` rebuilds the
model from the file alone, and loads it with ``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from arcfold.config import ExperimentConfig, ModelConfig, config_from_dict, config_to_dict
from arcfold.errors import CorruptFileError
from arcfold.io import load_torch, unsafe_pickle_error
from arcfold.models.necks import build_neck
from arcfold.models.pooling import build_pool

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "EmbeddingModel",
    "build_model",
    "embedding_checkpoint",
    "load_embedding_model",
]

CHECKPOINT_FORMAT = "arcfold.embedding/1"


_OPTIONAL_TIMM_KEYS = ("output_stride", "drop_path_rate")  # ModelConfig keys passed to timm only when set


def _timm_model(cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    """``timm.create_model(cfg.backbone, **kwargs)``; a model that does not take one of :data:`_OPTIONAL_TIMM_KEYS`
    is a one-line error naming the config key (timm's own is a TypeError about a constructor argument)."""
    try:
        return timm.create_model(cfg.backbone, **kwargs)
    except TypeError as e:
        key = next((k for k in _OPTIONAL_TIMM_KEYS if k in kwargs and f"'{k}'" in str(e)), None)
        if key is None:
            raise
        raise ValueError(
            f"model.{key}={kwargs[key]}: timm's {cfg.backbone!r} does not take {key!r}; leave model.{key} at its "
            "default for this backbone"
        ) from None


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm backbone without classifier or pooling; weights from timm, a local file, or random."""
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": ""}
    # output_stride (the last stages dilated instead of strided, same weights), drop_path_rate: only when set (null
    # and 0 are the backbone's own behaviour), since not every timm model takes them
    kwargs |= {key: getattr(cfg, key) for key in _OPTIONAL_TIMM_KEYS if getattr(cfg, key)}
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_path: no such file: {path}")
        if cfg.backbone.startswith(("hf-hub:", "hf_hub:")):
            raise ValueError("model.pretrained_path cannot be combined with an hf-hub: backbone name")
        # A local file, loaded by timm itself (it drops the classifier weights and adapts input
        # channels). url/hf_hub_id are blanked so no code path can reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        overlay = {"file": str(path), "source": "", "url": None, "hf_hub_id": None}
        try:
            # timm reads .safetensors with safetensors and anything else with torch.load(weights_only=True)
            return _timm_model(cfg, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except (SafetensorError, OSError, EOFError) as e:  # not a safetensors file, a truncated .pth, ...
            raise CorruptFileError(
                f"cannot read model.pretrained_path={path}: truncated, corrupt or not a weights file "
                f"({type(e).__name__}: {e}); copy it again, or give a timm/torchvision state dict or .safetensors file"
            ) from None
        except (RuntimeError, pickle.UnpicklingError) as e:
            unsafe = unsafe_pickle_error(f"model.pretrained_path={path}", e)
            if unsafe is not None:
                raise unsafe from None
            # key/shape mismatch from load_state_dict
            raise RuntimeError(f"model.pretrained_path={path} does not fit backbone {cfg.backbone!r}: {e}") from e
    return _timm_model(cfg, pretrained=cfg.pretrained, **kwargs)


class EmbeddingModel(nn.Module):
    """``forward_features`` -> (B, C, h, w) feature map; ``forward`` -> (B, D) embedding (not normalised)."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else create_backbone(cfg)
        parts = build_neck(cfg.neck, self.backbone.num_features, cfg.embedding_size, cfg.drop_rate)
        self.pre_pool = parts.pre_pool  # on the feature map (e.g. BatchNorm2d); Identity for most necks
        self.pool = build_pool(cfg.pool, cfg.gem_p, cfg.gem_trainable)
        # linear necks: model.drop_rate is a dropout on the pooled vector (dp necks place their own)
        linear = cfg.neck.startswith("linear")
        self.dropout = nn.Dropout(cfg.drop_rate) if linear and cfg.drop_rate > 0 else nn.Identity()
        self.neck = parts.post_pool
        self.embedding_size = parts.embedding_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.pre_pool(self.forward_features(x)))  # (B, C)
        return self.neck(self.dropout(pooled))  # (B, D)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 embeddings for retrieval: (B, D)."""
        return F.normalize(self(x).float(), dim=1)


def build_model(cfg: ModelConfig) -> EmbeddingModel:
    return EmbeddingModel(cfg)


def embedding_checkpoint(model: EmbeddingModel, cfg: ExperimentConfig, **extra: Any) -> dict[str, Any]:
    """The dict saved as ``models/<experiment>/fold<K>.pt``: plain data + tensors only."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "config": config_to_dict(cfg), "state_dict": state, **extra}


def load_embedding_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[EmbeddingModel, ExperimentConfig, dict[str, Any]]:
    """Rebuild an embedding model from its checkpoint alone; returns (model in eval mode, config, checkpoint)."""
    # weights_only: tensors and plain data only; a pickle that would run code is refused before it runs
    ckpt = load_torch(path, hint="Retrain the fold (train.force=true) or copy the checkpoint again.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{path} is not an arcfold embedding checkpoint (format {CHECKPOINT_FORMAT})")
    cfg = config_from_dict(ckpt["config"], source=str(path))
    # the weights come from the checkpoint: never load (or download) pretrained ones first
    cfg.model.pretrained, cfg.model.pretrained_path = False, None
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), cfg, ckpt
