"""Batched image encoding of slice stacks with a memory cap, and optional bf16 autocast on CUDA.

The SAM image encoder (``segment_anything.modeling.ImageEncoderViT``) maps ``(N, 3, S, S)`` model inputs to
``(N, C, S/16, S/16)`` embeddings. Several slices in one forward pass pay off on a GPU; on a CPU the cost is linear
in N anyway, so :func:`batch_size_for` returns 1 there unless asked otherwise.

The activation memory of one slice is estimated from the encoder's shape (tokens, width, heads, windowed and global
attention blocks): with stock attention the largest single allocation is a global-attention score matrix
``heads x T x T`` (T = tokens), held next to a few ``T x width`` activations; with our chunked attention
(:mod:`medsamix.models.attention`) the scores take a fixed few chunks per pass whatever the batch. The estimate is
deliberately generous (x2) so a batch stays under the cap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from medsamix.models.attention import ChunkedAttention

DEFAULT_ENCODE_MEMORY_BYTES = 4 * 2**30


def default_device(requested: str | None = None) -> str:
    """Where models run: ``requested`` ("cpu", "cuda", "cuda:1" ...) when given, else "cuda" when a GPU is
    visible, else "cpu" (the default of the app, its train task and the scripts)."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def slice_activation_bytes(encoder: nn.Module, bytes_per_value: int = 4) -> int:
    """Estimated peak activation bytes that each slice of a batch adds in ``encoder`` (an ``ImageEncoderViT``).

    Stock attention holds a block's whole ``heads x T x T`` score matrix per slice (T tokens; windowed-only encoders
    ``heads x T x w^2``). :class:`~medsamix.models.attention.ChunkedAttention` computes scores in chunks whose size
    does not grow with the batch (counted once by :func:`fixed_activation_bytes`); per slice it keeps the
    decomposed relative-position terms, ``2 x heads x T x side``. A few ``T x width`` activations are added either
    way, and the whole is doubled to stay generous."""
    img = int(getattr(encoder, "img_size", 1024))
    patch = encoder.patch_embed.proj.kernel_size[0] if hasattr(encoder, "patch_embed") else 16
    side = img // int(patch)
    tokens = side * side
    blocks = list(getattr(encoder, "blocks", []))
    width = int(encoder.patch_embed.proj.out_channels) if hasattr(encoder, "patch_embed") else 768
    heads = max((int(b.attn.num_heads) for b in blocks), default=12)
    windows = [int(b.window_size) for b in blocks]
    if blocks and all(isinstance(b.attn, ChunkedAttention) for b in blocks):
        scores = 2 * heads * tokens * side
    elif not windows or 0 in windows:  # a global-attention block: heads x T x T scores
        scores = heads * tokens * tokens
    else:  # windowed only: heads x (T / w^2 windows) x w^2 x w^2
        scores = heads * tokens * max(windows) ** 2
    return 2 * bytes_per_value * (scores + 8 * tokens * width)


def fixed_activation_bytes(encoder: nn.Module) -> int:
    """Activation bytes of one encoder pass that do not grow with its batch: the score chunks of chunked attention
    (one chunk's scores, their softmax and a temporary, ``3 x max_chunk_bytes``); 0 for stock attention."""
    chunks = [b.attn.max_chunk_bytes for b in getattr(encoder, "blocks", []) if isinstance(b.attn, ChunkedAttention)]
    return 3 * max(chunks, default=0)


def batch_size_for(encoder: nn.Module, device: torch.device | str, memory_bytes: int = DEFAULT_ENCODE_MEMORY_BYTES,
                   cpu_batch: int = 1) -> int:
    """Slices per encoder pass under ``memory_bytes`` of activations (at least 1); ``cpu_batch`` on a CPU."""
    if torch.device(device).type != "cuda":
        return max(1, cpu_batch)
    free = memory_bytes - fixed_activation_bytes(encoder)
    return max(1, int(free // max(1, slice_activation_bytes(encoder))))


@contextlib.contextmanager
def autocast(device: torch.device | str, bf16: bool) -> Iterator[None]:
    """bf16 autocast on CUDA when ``bf16`` is set; a no-op otherwise (fp32)."""
    dev = torch.device(device)
    if bf16 and dev.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@torch.no_grad()
def encode_batches(encoder: nn.Module, inputs: Tensor, batch_size: int, device: torch.device | str,
                   bf16: bool = False) -> Tensor:
    """Run ``encoder`` over model inputs ``(N, 3, S, S)`` in batches of ``batch_size``.

    Returns:
        ``(N, C, h, w)`` float32 embeddings on ``device`` (bf16 results are cast back to float32, so the mask decoder
        and the cache always see float32).
    """
    out = []
    for i in range(0, int(inputs.shape[0]), max(1, batch_size)):
        with autocast(device, bf16):
            out.append(encoder(inputs[i:i + batch_size].to(device)).float())
    return torch.cat(out)


__all__ = ["DEFAULT_ENCODE_MEMORY_BYTES", "autocast", "batch_size_for", "encode_batches", "fixed_activation_bytes",
           "slice_activation_bytes"]
