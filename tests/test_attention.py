"""Chunked image-encoder attention: same parameters, same embeddings as segment_anything's Attention."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from conftest import TINY, random_state
from medsamix.models.architecture import VIT_B, ArchSpec
from medsamix.models.attention import ChunkedAttention, set_chunked_attention, use_chunked_attention


def pair(arch: ArchSpec, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A stock and a chunked model of ``arch`` with the same random weights (relative positions non-zero)."""
    torch.manual_seed(seed)
    stock = arch.build(chunked_attention=False)
    sd = stock.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.1 * torch.randn(v.shape, generator=g) if "rel_pos" in k else v for k, v in sd.items()}
    stock.load_state_dict(sd)
    chunked = arch.build(chunked_attention=True)
    chunked.load_state_dict(sd)
    return stock, chunked


def set_chunk_bytes(model: torch.nn.Module, nbytes: int) -> None:
    for block in model.image_encoder.blocks:
        block.attn.max_chunk_bytes = nbytes


def test_build_swaps_every_block_and_keeps_the_state_dict_layout():
    stock, chunked = pair(TINY)
    assert all(type(b.attn) is Attention for b in stock.image_encoder.blocks)
    assert all(type(b.attn) is ChunkedAttention for b in chunked.image_encoder.blocks)
    assert list(stock.state_dict()) == list(chunked.state_dict())
    assert [n for n, _ in stock.named_parameters()] == [n for n, _ in chunked.named_parameters()]
    set_chunked_attention(False)
    try:
        assert type(TINY.build().image_encoder.blocks[0].attn) is Attention
    finally:
        set_chunked_attention(True)
    assert type(TINY.build().image_encoder.blocks[0].attn) is ChunkedAttention
    # swapping shares the parameters, and a second swap changes nothing
    attn = stock.image_encoder.blocks[1].attn
    assert use_chunked_attention(stock.image_encoder) == TINY.encoder_depth
    assert stock.image_encoder.blocks[1].attn.qkv is attn.qkv
    assert stock.image_encoder.blocks[1].attn.rel_pos_h is attn.rel_pos_h
    assert use_chunked_attention(stock.image_encoder) == 0


@pytest.mark.parametrize("chunk_bytes", [1, 8 * 8 * 8 * 4 * 3, 8 * 8 * 8 * 8 * 4 * 3, 2**30])
def test_embeddings_equal_stock_for_every_chunking(chunk_bytes):
    """TINY: 8 x 8 tokens, 2 heads; chunks of one grid row, three rows, three heads, everything."""
    stock, chunked = pair(TINY)
    set_chunk_bytes(chunked, chunk_bytes)
    x = torch.randn(2, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = stock.image_encoder(x), chunked.image_encoder(x)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)


def test_chunk_sizes():
    attn = ChunkedAttention.from_attention(TINY.build(chunked_attention=False).image_encoder.blocks[1].attn)
    row = 8 * 8 * 8 * 4  # one query row of an 8 x 8 grid against 64 keys, float32
    for nbytes, expected in [(1, (1, 1)), (3 * row, (3, 1)), (8 * row, (8, 1)), (8 * row * 3, (8, 3)),
                             (2**30, (8, 4))]:
        attn.max_chunk_bytes = nbytes
        assert attn._chunk(4, 8, 8, 4) == expected, nbytes


def test_gradients_equal_stock():
    stock, chunked = pair(TINY, seed=2)
    set_chunk_bytes(chunked, 8 * 8 * 8 * 4 * 2)
    x = torch.randn(1, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(3))
    for model in (stock, chunked):
        model.train()
        model.image_encoder(x).square().sum().backward()
    for (name, p), (_, q) in zip(stock.named_parameters(), chunked.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-5), name


def test_loads_a_stock_state_dict():
    chunked = TINY.build()
    chunked.load_state_dict(random_state(TINY, 4))
    assert torch.equal(chunked.image_encoder.blocks[1].attn.rel_pos_h,
                       random_state(TINY, 4)["image_encoder.blocks.1.attn.rel_pos_h"])


@pytest.mark.slow
def test_vit_b_embedding_equals_stock():
    """One 1024 px ViT-B forward with random weights (~16 s per pass on 2 CPU cores, x2)."""
    stock, chunked = pair(VIT_B)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = chunked.image_encoder(x)
        ref = stock.image_encoder(x)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)


def test_gpu_batch_size_counts_chunked_scores_once():
    """Batches on CUDA are sized by ``slice_activation_bytes``: stock ViT-B attention holds 12 x 4096 x 4096 scores
    per slice (2 slices under 4 GiB); chunked attention holds a fixed few chunks per pass, so more slices fit."""
    from medsamix.models.encoding import batch_size_for, fixed_activation_bytes, slice_activation_bytes

    stock, chunked = VIT_B.build(chunked_attention=False), VIT_B.build(chunked_attention=True)
    cap = 4 * 2**30
    assert fixed_activation_bytes(stock.image_encoder) == 0
    assert fixed_activation_bytes(chunked.image_encoder) == 3 * ChunkedAttention.max_chunk_bytes
    assert slice_activation_bytes(stock.image_encoder) > 12 * 4096 * 4096 * 4  # the scores alone
    per = slice_activation_bytes(chunked.image_encoder)
    assert 8 * 4096 * 768 * 4 < per < slice_activation_bytes(stock.image_encoder) // 5
    assert batch_size_for(stock.image_encoder, "cuda", cap) == 2
    assert batch_size_for(chunked.image_encoder, "cuda", cap) == (cap - 3 * 64 * 2**20) // per > 10
    assert batch_size_for(chunked.image_encoder, "cuda", 2**20) == 1  # under the fixed chunks: still one slice
    assert batch_size_for(chunked.image_encoder, "cpu", cap) == 1
