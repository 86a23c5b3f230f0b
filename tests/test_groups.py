"""Layer grouping: every parameter in exactly one group, on ViT-B and a small variant."""

from __future__ import annotations

import itertools

import pytest

from conftest import TINY
from medsamix.models.architecture import VIT_B, reference_param_names, reference_state
from medsamix.merging.groups import block_ranges, group_parameters


@pytest.mark.parametrize("arch", [VIT_B, TINY], ids=["vit_b", "tiny"])
@pytest.mark.parametrize("granularity,separate", list(itertools.product([1, 2, 3, 4], [False, True])))
def test_every_parameter_in_exactly_one_group(arch, granularity, separate):
    names = reference_param_names(arch)
    groups = group_parameters(names, granularity, separate)
    assigned = [p for g in groups for p in g.params]
    assert sorted(assigned) == sorted(names)
    assert len(assigned) == len(set(assigned))
    assert len({g.name for g in groups}) == len(groups)
    for g in groups:
        assert "/" not in g.name and g.params


def test_buffers_are_in_no_group():
    names = set(reference_param_names(VIT_B))
    buffers = set(reference_state(VIT_B)) - names
    assert buffers == {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"}
    grouped = {p for g in group_parameters(names, 1) for p in g.params}
    assert not buffers & grouped


def test_vit_b_group_counts_and_names():
    names = reference_param_names(VIT_B)
    # patch_embed, pos_embed, 12/g block groups, neck, 4 prompt-encoder groups, 6 mask-decoder groups
    assert [len(group_parameters(names, g)) for g in (1, 2, 3, 4)] == [25, 19, 17, 16]
    groups = {g.name: g for g in group_parameters(names, 2)}
    assert "enc.blocks.4-5" in groups
    assert set(groups["enc.blocks.4-5"].params) == {n for n in names if n.startswith(("image_encoder.blocks.4.",
                                                                                     "image_encoder.blocks.5."))}
    assert groups["enc.pos_embed"].params == ("image_encoder.pos_embed",)
    assert set(groups["dec.final_attn"].params) == {
        n for n in names if n.startswith(("mask_decoder.transformer.final_attn_token_to_image.",
                                          "mask_decoder.transformer.norm_final_attn."))}
    assert set(groups["dec.output_tokens"].params) == {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"}
    assert [g.component for g in groups.values()].count("prompt_encoder") == 4
    assert [g.component for g in groups.values()].count("mask_decoder") == 6


def test_separate_mode_splits_attention_mlp_norm():
    names = reference_param_names(VIT_B)
    groups = {g.name: g for g in group_parameters(names, 3, separate=True)}
    assert len(groups) == 2 + 4 * 3 + 1 + 4 + 6
    attn = groups["enc.blocks.0-2.attn"].params
    assert "image_encoder.blocks.1.attn.rel_pos_h" in attn and "image_encoder.blocks.2.attn.qkv.weight" in attn
    assert all(".mlp." in p for p in groups["enc.blocks.0-2.mlp"].params)
    assert all(".norm1." in p or ".norm2." in p for p in groups["enc.blocks.0-2.norm"].params)


def test_short_last_block_group():
    assert block_ranges(4, 3) == [(0, 2), (3, 3)]
    assert [g.name for g in group_parameters(reference_param_names(TINY), 3) if g.name.startswith("enc.blocks")] == [
        "enc.blocks.0-2", "enc.blocks.3-3"]


def test_rejects_bad_granularity_and_foreign_parameters():
    names = reference_param_names(TINY)
    with pytest.raises(ValueError, match="granularity"):
        group_parameters(names, 5)
    with pytest.raises(ValueError, match="robust_mlp"):
        group_parameters(names + ["mask_decoder.robust_mlp.weight"], 1)
