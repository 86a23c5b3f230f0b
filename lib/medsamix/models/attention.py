"""A memory-lean forward for SAM's image-encoder attention: scores computed in bounded chunks.

``segment_anything.modeling.image_encoder.Attention`` materialises the whole ``(B x heads, T, T)`` score matrix
(``T = H x W`` tokens), its sum with the decomposed relative-position terms and its softmax. In a global-attention
block of ViT-B at 1024 px (``T = 4096``, 12 heads) each of these is 805 MB in float32, about 2.4 GB at the peak of one
slice's encoder pass. :class:`ChunkedAttention` is that module with the same parameters and the same arithmetic,
computed for a block of ``(batch x head)`` rows and query rows at a time so that one chunk's scores take at most
``max_chunk_bytes``; the results are written into one ``(B x heads, T, head_dim)`` output. Windowed blocks (ViT-B:
``25 x 12 x 196 x 196`` scores, 46 MB) fit in one chunk and run exactly as the stock module.

:func:`use_chunked_attention` swaps it into the blocks of an encoder we built (our model instances only; no function
of segment_anything is modified). :meth:`medsamix.models.architecture.ArchSpec.build` does so unless
``MEDSAMIX_CHUNKED_ATTENTION=0`` (or :func:`set_chunked_attention`), so the search, the server and the scripts all
get it. Embeddings equal the stock module's within float32 rounding (``tests/test_attention.py``).
"""

from __future__ import annotations

import os

import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor, nn

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk's score matrix (ViT-B at 1024 px: one head's 4096 x 4096 float32 scores)."""

_enabled = os.environ.get("MEDSAMIX_CHUNKED_ATTENTION", "1").lower() not in ("0", "false", "no", "off")


def set_chunked_attention(enabled: bool) -> None:
    """Turn the chunked attention of newly built models on or off for this process."""
    global _enabled
    _enabled = enabled


def chunked_attention_enabled() -> bool:
    return _enabled


class ChunkedAttention(Attention):
    """``segment_anything``'s multi-head attention with decomposed relative positions, computed in chunks.

    Build it from a stock module with :meth:`from_attention` (the parameters are shared, not copied).

    Attributes:
        max_chunk_bytes: Upper bound of one chunk's score matrix ``(rows, queries, T)`` in bytes (at least one
            query row of the token grid, ``W`` queries, is computed at a time).
    """

    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @classmethod
    def from_attention(cls, attn: Attention, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "ChunkedAttention":
        """A chunked module holding ``attn``'s own ``qkv``, ``proj`` and relative-position parameters."""
        dim = attn.qkv.in_features
        size = None
        if attn.use_rel_pos:
            size = ((attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2)
        with torch.device("meta"):  # the fresh parameters are replaced below: allocate nothing
            new = cls(dim, attn.num_heads, attn.qkv.bias is not None, attn.use_rel_pos, input_size=size)
        new.scale = attn.scale
        new.qkv, new.proj = attn.qkv, attn.proj
        if attn.use_rel_pos:
            new.rel_pos_h, new.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        new.max_chunk_bytes = max_chunk_bytes
        return new.train(attn.training)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, dim)`` tokens -> ``(B, H, W, dim)``, as ``Attention.forward``."""
        b, h, w, _ = x.shape
        tokens = h * w
        qkv = self.qkv(x).reshape(b, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, tokens, -1).unbind(0)  # (B x heads, T, head_dim) each
        rel_h = rel_w = None
        if self.use_rel_pos:  # decomposed relative positions, as add_decomposed_rel_pos: (BH, H, W, H), (BH, H, W, W)
            r_q = q.reshape(q.shape[0], h, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        rows, heads = self._chunk(q.shape[0], h, w, x.element_size())
        out = torch.cat([
            torch.cat([self._scores(q, k, v, rel_h, rel_w, (i, i + heads), (r, min(h, r + rows)), (h, w))
                       for r in range(0, h, rows)], dim=1)
            for i in range(0, q.shape[0], heads)])
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)

    def _chunk(self, bh: int, h: int, w: int, itemsize: int) -> tuple[int, int]:
        """(query rows of the token grid, batch x head rows) per chunk."""
        per_row = w * h * w * itemsize  # one query row of the grid against every key
        fit = max(1, self.max_chunk_bytes // per_row)
        if fit >= h:
            return h, max(1, min(bh, fit // h))
        return int(fit), 1

    def _scores(self, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor | None, rel_w: Tensor | None,
                heads: tuple[int, int], rows: tuple[int, int], hw: tuple[int, int]) -> Tensor:
        """Attention output of ``(batch x head)`` rows ``heads`` for the queries of grid rows ``rows``."""
        (i0, i1), (r0, r1), (h, w) = heads, rows, hw
        qc = q[i0:i1, r0 * w: r1 * w]
        attn = (qc * self.scale) @ k[i0:i1].transpose(-2, -1)  # (n, (r1 - r0) W, T)
        if rel_h is not None and rel_w is not None:
            attn = attn.view(attn.shape[0], r1 - r0, w, h, w)
            attn.add_(rel_h[i0:i1, r0:r1, :, :, None]).add_(rel_w[i0:i1, r0:r1, :, None, :])
            attn = attn.view(attn.shape[0], (r1 - r0) * w, h * w)
        return attn.softmax(dim=-1) @ v[i0:i1]


def use_chunked_attention(encoder: nn.Module, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Replace the ``attn`` module of every block of ``encoder`` (an ``ImageEncoderViT``) by a
    :class:`ChunkedAttention` sharing its parameters; returns how many were replaced."""
    count = 0
    for block in getattr(encoder, "blocks", []):
        if isinstance(block.attn, Attention) and not isinstance(block.attn, ChunkedAttention):
            block.attn = ChunkedAttention.from_attention(block.attn, max_chunk_bytes)
            count += 1
    return count
