"""Embedding extraction: images -> L2-normalised float32 embeddings ``(N, D)``, batched, in eval mode."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from arcfold.models.embedding import EmbeddingModel

__all__ = ["extract_embeddings"]


@torch.no_grad()
def extract_embeddings(
    model: EmbeddingModel,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    device = torch.device(device)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for images, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                chunks.append(model.embed(images).cpu())  # (B, D) fp32, unit norm
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, model.embedding_size), np.float32)
