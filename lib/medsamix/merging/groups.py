"""Layer groups: the units that each get their own merge method and hyper-parameters.

Grouping of a SAM model (names are stable, path-free identifiers used in recipes and search spaces):

=====================================  ======================================================================
group                                  parameters
=====================================  ======================================================================
``enc.patch_embed``                    ``image_encoder.patch_embed.*``
``enc.pos_embed``                      ``image_encoder.pos_embed``
``enc.blocks.<a>-<b>``                 ``image_encoder.blocks.<i>.*`` for a <= i <= b, in runs of g blocks
``enc.blocks.<a>-<b>.{attn,mlp,norm}`` the same split into attention / MLP / LayerNorms ("separate" mode)
``enc.neck``                           ``image_encoder.neck.*``
``prompt.point_embeddings``            ``prompt_encoder.point_embeddings.*``
``prompt.not_a_point_embed``           ``prompt_encoder.not_a_point_embed.*``
``prompt.mask_downscaling``            ``prompt_encoder.mask_downscaling.*``
``prompt.no_mask_embed``               ``prompt_encoder.no_mask_embed.*``
``dec.transformer_layers``             ``mask_decoder.transformer.layers.*`` (the two-way attention blocks)
``dec.final_attn``                     ``mask_decoder.transformer.{final_attn_token_to_image,norm_final_attn}.*``
``dec.output_tokens``                  ``mask_decoder.{iou_token,mask_tokens}.*``
``dec.output_upscaling``               ``mask_decoder.output_upscaling.*``
``dec.hypernetworks``                  ``mask_decoder.output_hypernetworks_mlps.*``
``dec.iou_head``                       ``mask_decoder.iou_prediction_head.*``
=====================================  ======================================================================

Every parameter belongs to exactly one group; buffers (``pixel_mean``, ``pixel_std`` and the prompt encoder's
random Fourier matrix) belong to none and are always taken from the base model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from medsamix.errors import MedSAMixError, check_choice

GRANULARITIES = (1, 2, 3, 4)

_FIXED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("enc.patch_embed", ("image_encoder.patch_embed.",)),
    ("enc.pos_embed", ("image_encoder.pos_embed",)),
    ("enc.neck", ("image_encoder.neck.",)),
    ("prompt.point_embeddings", ("prompt_encoder.point_embeddings.",)),
    ("prompt.not_a_point_embed", ("prompt_encoder.not_a_point_embed.",)),
    ("prompt.mask_downscaling", ("prompt_encoder.mask_downscaling.",)),
    ("prompt.no_mask_embed", ("prompt_encoder.no_mask_embed.",)),
    ("dec.transformer_layers", ("mask_decoder.transformer.layers.",)),
    ("dec.final_attn", ("mask_decoder.transformer.final_attn_token_to_image.", "mask_decoder.transformer.norm_final_attn.")),
    ("dec.output_tokens", ("mask_decoder.iou_token.", "mask_decoder.mask_tokens.")),
    ("dec.output_upscaling", ("mask_decoder.output_upscaling.",)),
    ("dec.hypernetworks", ("mask_decoder.output_hypernetworks_mlps.",)),
    ("dec.iou_head", ("mask_decoder.iou_prediction_head.",)),
)
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.(\w+)\.")
_PART = {"attn": "attn", "mlp": "mlp", "norm1": "norm", "norm2": "norm"}


@dataclasses.dataclass(frozen=True)
class Group:
    """A named set of parameters merged with one method.

    Attributes:
        name: Stable identifier, e.g. ``enc.blocks.0-1`` or ``dec.iou_head``.
        params: Parameter names (state-dict keys without prefix), in state-dict order.
        component: "image_encoder", "prompt_encoder" or "mask_decoder".
    """

    name: str
    params: tuple[str, ...]
    component: str


def check_granularity(value: object, what: str = "granularity",
                      error: type[MedSAMixError] = MedSAMixError) -> int:
    """``value`` if it is one of :data:`GRANULARITIES` (ViT blocks per encoder group); otherwise ``error`` naming
    ``what`` and the allowed values."""
    return int(check_choice(value, GRANULARITIES, what, error))


def block_ranges(depth: int, granularity: int) -> list[tuple[int, int]]:
    """Inclusive block index ranges ``[(0, g-1), (g, 2g-1), ...]``; the last run may be shorter."""
    check_granularity(granularity)
    return [(a, min(a + granularity, depth) - 1) for a in range(0, depth, granularity)]


def group_parameters(param_names: Iterable[str], granularity: int = 1, separate: bool = False) -> list[Group]:
    """Partition SAM parameter names into merge groups.

    Args:
        param_names: Names of the model's parameters (``model.named_parameters()``, no buffers).
        granularity: Number of consecutive ViT blocks per encoder group, 1 to 4.
        separate: Split each encoder block group into ``attn``, ``mlp`` and ``norm`` groups.

    Returns:
        Groups in model order (encoder, prompt encoder, decoder). Empty groups are omitted.

    Raises:
        ValueError: a parameter fits no group (not a SAM parameter).
    """
    names = list(param_names)
    depth = 1 + max((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), default=-1)
    ranges = block_ranges(depth, granularity)
    block_of = {i: r for r in ranges for i in range(r[0], r[1] + 1)}
    members: dict[str, list[str]] = {}
    unassigned: list[str] = []
    for n in names:
        if m := _BLOCK.match(n):
            a, b = block_of[int(m.group(1))]
            key = f"enc.blocks.{a}-{b}"
            if separate:
                part = _PART.get(m.group(2))
                if part is None:
                    unassigned.append(n)
                    continue
                key += f".{part}"
            members.setdefault(key, []).append(n)
            continue
        for gname, prefixes in _FIXED:
            if any(n == p or n.startswith(p) for p in prefixes):
                members.setdefault(gname, []).append(n)
                break
        else:
            unassigned.append(n)
    if unassigned:
        raise ValueError(f"parameters outside every merge group: {unassigned[:8]}")
    order = [g for g, _ in _FIXED[:2]]
    for a, b in ranges:
        base = f"enc.blocks.{a}-{b}"
        order += [f"{base}.{p}" for p in ("attn", "mlp", "norm")] if separate else [base]
    order += [g for g, _ in _FIXED[2:]]
    return [
        Group(name=g, params=tuple(members[g]), component=_component(g)) for g in order if g in members
    ]


def _component(group_name: str) -> str:
    return {"enc": "image_encoder", "prompt": "prompt_encoder", "dec": "mask_decoder"}[group_name.split(".")[0]]


def encoder_groups(groups: Sequence[Group]) -> list[Group]:
    """The groups whose parameters change the image embedding (all image-encoder groups)."""
    return [g for g in groups if g.component == "image_encoder"]
