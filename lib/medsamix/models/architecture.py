"""SAM architecture descriptions: the official ViT-B/L/H presets and small variants of the same design.

An :class:`ArchSpec` holds every hyper-parameter that changes parameter shapes or the forward pass of a
``segment_anything.modeling.Sam``. It can build the model from segment_anything's own modules and can be inferred
back from a state dict, so a checkpoint's architecture is checked by shape rather than trusted from its file name.

Two facts of SAM's design are fixed by this module, as in ``segment_anything.build_sam``:
the mask decoder's attention uses 8 heads, and it predicts 3 multimask outputs plus one single mask.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Any

import torch
from torch import Tensor

from medsamix.errors import CheckpointError

DECODER_HEADS = 8
NUM_MULTIMASK_OUTPUTS = 3
PIXEL_MEAN = (123.675, 116.28, 103.53)
"""``Sam.pixel_mean`` (a non-persistent buffer: not in state dicts), as ``segment_anything.build_sam``."""
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Shape-defining hyper-parameters of a SAM model.

    Attributes:
        name: Short name ("vit_b", "vit_l", "vit_h" or a free name for small variants).
        img_size: Side of the square network input in pixels (1024 for official SAM).
        patch_size: Side of one ViT patch in pixels; the image embedding is ``img_size // patch_size`` square.
        encoder_embed_dim: ViT width.
        encoder_depth: Number of ViT blocks.
        encoder_num_heads: Attention heads per ViT block.
        encoder_global_attn_indexes: Blocks with global (not windowed) attention.
        window_size: Side of the attention window of the other blocks, in patches.
        mlp_ratio: Hidden width of the ViT MLP relative to ``encoder_embed_dim``.
        prompt_embed_dim: Channels of the image embedding, the prompt tokens and the decoder transformer.
        mask_in_chans: Hidden channels of the prompt encoder's mask down-scaling.
        decoder_mlp_dim: Hidden width of the decoder's two-way transformer MLP.
        iou_head_hidden_dim: Hidden width of the IoU prediction head.
        iou_head_depth: Layers of the IoU prediction head.
    """

    name: str
    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    iou_head_depth: int = 3

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid, ``img_size // patch_size`` (64 for official SAM)."""
        return self.img_size // self.patch_size

    def shape_key(self) -> tuple[Any, ...]:
        """Every field but the name: two specs with equal keys build interchangeable models."""
        return dataclasses.astuple(dataclasses.replace(self, name=""))

    def describe(self) -> str:
        """One-line human description, used in error messages."""
        return (
            f"{self.name} (img_size {self.img_size}, width {self.encoder_embed_dim}, "
            f"{self.encoder_depth} blocks, {self.encoder_num_heads} heads)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArchSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        kw = dict(d)
        if "encoder_global_attn_indexes" in kw:
            kw["encoder_global_attn_indexes"] = tuple(int(i) for i in kw["encoder_global_attn_indexes"])
        return cls(**kw)

    def build(self, chunked_attention: bool | None = None) -> torch.nn.Module:
        """Build a randomly initialised ``segment_anything.modeling.Sam`` of this architecture (eval mode).

        Args:
            chunked_attention: Give the image encoder's blocks :class:`~medsamix.models.attention.ChunkedAttention`
                (same parameters and results, bounded score memory); default: on unless turned off by
                ``MEDSAMIX_CHUNKED_ATTENTION=0`` or :func:`~medsamix.models.attention.set_chunked_attention`.
        """
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        from medsamix.models.attention import chunked_attention_enabled, use_chunked_attention

        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=self.encoder_depth,
                embed_dim=self.encoder_embed_dim,
                img_size=self.img_size,
                mlp_ratio=self.mlp_ratio,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=self.encoder_num_heads,
                patch_size=self.patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=self.encoder_global_attn_indexes,
                window_size=self.window_size,
                out_chans=self.prompt_embed_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=self.prompt_embed_dim,
                image_embedding_size=(self.embedding_size, self.embedding_size),
                input_image_size=(self.img_size, self.img_size),
                mask_in_chans=self.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=NUM_MULTIMASK_OUTPUTS,
                transformer=TwoWayTransformer(
                    depth=2,
                    embedding_dim=self.prompt_embed_dim,
                    mlp_dim=self.decoder_mlp_dim,
                    num_heads=DECODER_HEADS,
                ),
                transformer_dim=self.prompt_embed_dim,
                iou_head_depth=self.iou_head_depth,
                iou_head_hidden_dim=self.iou_head_hidden_dim,
            ),
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
        if chunked_attention_enabled() if chunked_attention is None else chunked_attention:
            use_chunked_attention(sam.image_encoder)
        return sam.eval()

    def build_with(self, state: Mapping[str, Tensor], chunked_attention: bool | None = None) -> torch.nn.Module:
        """A ``Sam`` of this architecture whose parameters and persistent buffers *are* the tensors of ``state``
        (shared, not copied: no random initialisation, no second copy of the weights), in eval mode.

        ``state`` holds every key of the model's state dict, with the model's shapes; the parameters do not require
        gradients. The non-persistent ``pixel_mean`` / ``pixel_std`` are made on the device of ``state``'s tensors.
        """
        with torch.device("meta"):
            model = self.build(chunked_attention)
        model.load_state_dict(state, strict=True, assign=True)
        device = next(iter(state.values())).device
        for name, value in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
            model.register_buffer(name, torch.tensor(value, device=device).view(-1, 1, 1), persistent=False)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"build_with: no values for {left}")
        return model.requires_grad_(False).eval()


VIT_B = ArchSpec(name="vit_b")
VIT_L = ArchSpec(
    name="vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
    encoder_global_attn_indexes=(5, 11, 17, 23),
)
VIT_H = ArchSpec(
    name="vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
    encoder_global_attn_indexes=(7, 15, 23, 31),
)
PRESETS: dict[str, ArchSpec] = {s.name: s for s in (VIT_B, VIT_L, VIT_H)}

# The embedded demonstration pool's architecture: SAM's design at 256 px with a 16x16 token grid, 8 blocks of
# width 128 and a 128-channel prompt/decoder path (about 2.7 M parameters; ~0.05 s per slice on 2 CPU cores).
TINY256 = ArchSpec(
    name="tiny256", img_size=256, patch_size=16, encoder_embed_dim=128, encoder_depth=8, encoder_num_heads=4,
    encoder_global_attn_indexes=(1, 3, 5, 7), window_size=8, prompt_embed_dim=128, mask_in_chans=16,
    decoder_mlp_dim=512, iou_head_hidden_dim=128,
)


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing parameter {key!r}")
    return tuple(sd[key].shape)


def infer_arch(sd: Mapping[str, Tensor]) -> ArchSpec:
    """Infer the architecture of a SAM state dict (keys without any prefix) from its parameter shapes.

    The result is named after the official preset it equals, else "custom". Models that are not plain SAM (for
    example SAM-Med2D's adapter ViT, recognised by its ``Adapter`` parameters) raise :class:`CheckpointError`.
    """
    adapter = sorted(k for k in sd if ".Adapter" in k or "adapter" in k.split(".")[-2:-1])
    if adapter:
        raise CheckpointError(
            f"this is an adapter ViT (e.g. SAM-Med2D), not plain SAM: it has adapter parameters such as {adapter[0]!r}"
        )
    embed_dim = _shape(sd, "image_encoder.patch_embed.proj.weight")[0]
    patch_size = _shape(sd, "image_encoder.patch_embed.proj.weight")[-1]
    grid = _shape(sd, "image_encoder.pos_embed")[1]
    block = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := block.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError("no image encoder blocks (image_encoder.blocks.N.*) found")
    head_dims: set[int] = set()
    global_idx: list[int] = []
    windows: set[int] = set()
    for i in range(depth):
        rel_len, head_dim = _shape(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h")
        head_dims.add(head_dim)
        size = (rel_len + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            windows.add(size)
    if len(head_dims) != 1 or len(windows) > 1:
        raise CheckpointError("inconsistent attention shapes across image encoder blocks")
    mlp_hidden = _shape(sd, "image_encoder.blocks.0.mlp.lin1.weight")[0]
    prompt_dim = _shape(sd, "image_encoder.neck.0.weight")[0]
    iou_depth = 0
    while f"mask_decoder.iou_prediction_head.layers.{iou_depth}.weight" in sd:
        iou_depth += 1
    spec = ArchSpec(
        name="custom",
        img_size=grid * patch_size,
        patch_size=patch_size,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dims.pop(),
        encoder_global_attn_indexes=tuple(global_idx),
        window_size=windows.pop() if windows else 0,
        mlp_ratio=mlp_hidden / embed_dim,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=_shape(sd, "prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_mlp_dim=_shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        iou_head_hidden_dim=_shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        iou_head_depth=iou_depth,
    )
    for preset in (*PRESETS.values(), TINY256):
        if preset.shape_key() == spec.shape_key():
            return preset
    return spec


def resolve_arch(arch: str | ArchSpec | Mapping[str, Any]) -> ArchSpec:
    """Turn a preset name, a spec dict (as stored in a recipe) or a spec into an :class:`ArchSpec`."""
    if isinstance(arch, ArchSpec):
        return arch
    if isinstance(arch, str):
        named = {**PRESETS, TINY256.name: TINY256}
        if arch not in named:
            raise ValueError(f"unknown architecture {arch!r}; presets: {sorted(named)}")
        return named[arch]
    return ArchSpec.from_dict(arch)


@lru_cache(maxsize=8)
def _meta_model(arch: ArchSpec) -> torch.nn.Module:
    with torch.device("meta"):
        return arch.build()


def reference_state(arch: ArchSpec) -> dict[str, Tensor]:
    """Persistent parameters and buffers of a model of ``arch``, as shape-only tensors on the meta device."""
    return dict(_meta_model(arch).state_dict())


def reference_param_names(arch: ArchSpec) -> list[str]:
    """Names of the learnable parameters of a model of ``arch``, in module order."""
    return [n for n, _ in _meta_model(arch).named_parameters()]
