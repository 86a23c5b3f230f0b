"""Tests of the checkpoint loader (``load_sam_checkpoint``), architecture inference and ``save_sam_checkpoint``."""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY, random_state

from medsamix.models.architecture import PRESETS, VIT_B, VIT_H, VIT_L, infer_arch, reference_state
from medsamix.models.checkpoint import LoadReport, load_sam_checkpoint, save_sam_checkpoint
from medsamix.errors import CheckpointError


class CustomObject:
    """A user class: pickling it into a checkpoint needs code execution to load, which weights_only refuses."""

    def __init__(self) -> None:
        self.value = 1


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_state(TINY, 0)


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v.to(torch.float32)), k


def _err(path: Path, reason: str) -> str:
    """``match`` pattern: the message names the file and then the reason."""
    return re.escape(str(path)) + r".*" + reason


# --------------------------------------------------------------------------------------------------------- layouts


LAYOUTS = {
    "plain": (lambda sd: dict(sd), "plain", ""),
    "medsam_training": (lambda sd: {"model": dict(sd), "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},
                        "model", ""),
    "medicosam_torch_em": (lambda sd: {"model_state": {"sam." + k: v for k, v in sd.items()}, "optimizer_state": {}},
                           "model_state", "sam."),
    "data_parallel": (lambda sd: {"module." + k: v for k, v in sd.items()}, "plain", "module."),
    "data_parallel_sam": (lambda sd: {"module.sam." + k: v for k, v in sd.items()}, "plain", "module.sam."),
    "lightning": (lambda sd: {"state_dict": dict(sd), "epoch": 1}, "state_dict", ""),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_loads_to_the_plain_state_dict(tmp_path, tiny_sd, name):
    wrap, layout, prefix = LAYOUTS[name]
    path = _save(wrap(tiny_sd), tmp_path / f"{name}.pth")
    sd, report = load_sam_checkpoint(path, arch=TINY)
    assert isinstance(report, LoadReport)
    assert report.layout == layout
    assert report.prefix == prefix
    assert report.ignored == []
    assert report.path == path
    assert report.arch == TINY
    _assert_same_tensors(sd, tiny_sd)
    assert all(t.is_contiguous() for t in sd.values())


def test_loaded_keys_are_exactly_the_model_keys(tmp_path, tiny_sd):
    path = _save({"module." + k: v for k, v in tiny_sd.items()}, tmp_path / "dp.pth")
    sd, _ = load_sam_checkpoint(path, arch=TINY)
    model = TINY.build()
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)


def test_loaded_tensors_do_not_alias_each_other_or_the_file(tmp_path, tiny_sd):
    path = _save(tiny_sd, tmp_path / "plain.pth")
    sd, _ = load_sam_checkpoint(path, arch=TINY)
    k = "mask_decoder.iou_token.weight"
    sd[k].add_(1.0)
    again, _ = load_sam_checkpoint(path, arch=TINY)
    assert torch.equal(again[k], tiny_sd[k])


def test_arch_none_infers_the_architecture(tmp_path, tiny_sd):
    path = _save({"model": tiny_sd}, tmp_path / "m.pth")
    sd, report = load_sam_checkpoint(path, arch=None)
    assert report.arch.shape_key() == TINY.shape_key()
    assert report.arch.name == "custom"
    _assert_same_tensors(sd, tiny_sd)


def test_fp16_checkpoint_is_converted_to_float32(tmp_path, tiny_sd):
    half = {k: v.half() for k, v in tiny_sd.items()}
    path = _save({"model": half}, tmp_path / "fp16.pth")
    sd, report = load_sam_checkpoint(path, arch=TINY)
    assert report.layout == "model"
    assert all(t.dtype == torch.float32 for t in sd.values())
    for k, v in half.items():
        assert torch.equal(sd[k], v.float()), k
    # the conversion is value-preserving for fp16 inputs but really did round the originals
    k = "mask_decoder.iou_token.weight"
    assert not torch.equal(sd[k], tiny_sd[k])
    torch.testing.assert_close(sd[k], tiny_sd[k], atol=1e-2, rtol=1e-2)


def test_bf16_checkpoint_is_converted_to_float32(tmp_path, tiny_sd):
    path = _save({k: v.bfloat16() for k, v in tiny_sd.items()}, tmp_path / "bf16.pth")
    sd, _ = load_sam_checkpoint(path, arch=TINY)
    assert {t.dtype for t in sd.values()} == {torch.float32}


def test_extra_non_sam_keys_are_ignored(tmp_path, tiny_sd):
    extra = {
        "mask_decoder.robust_mlp.weight": torch.randn(4, 4),
        "mask_decoder.custom_robust_token.weight": torch.randn(1, 32),
        "extra_head.weight": torch.randn(3),
    }
    path = _save({**tiny_sd, **extra}, tmp_path / "robust.pth")
    sd, report = load_sam_checkpoint(path, arch=TINY)
    assert report.ignored == sorted(extra)
    assert not set(extra) & set(sd)
    _assert_same_tensors(sd, tiny_sd)
    assert "ignored 3 non-SAM keys" in report.summary()


def test_extra_keys_outside_the_prefix_are_ignored(tmp_path, tiny_sd):
    raw = {"sam." + k: v for k, v in tiny_sd.items()}
    raw["decoder_head.weight"] = torch.randn(2)
    raw["sam.mask_decoder.robust_mlp.weight"] = torch.randn(2)
    path = _save({"model_state": raw}, tmp_path / "ms.pth")
    sd, report = load_sam_checkpoint(path, arch=TINY)
    assert report.prefix == "sam."
    assert report.ignored == ["decoder_head.weight", "sam.mask_decoder.robust_mlp.weight"]
    _assert_same_tensors(sd, tiny_sd)


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=_err(path, "no such file")):
        load_sam_checkpoint(path, arch=TINY)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=_err(tmp_path, "not a regular file")):
        load_sam_checkpoint(tmp_path, arch=TINY)


def test_truncated_file(tmp_path, tiny_sd):
    good = _save(tiny_sd, tmp_path / "good.pth")
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=_err(bad, "truncated or corrupt")):
        load_sam_checkpoint(bad, arch=TINY)


def _random_bytes_file(tmp_path: Path) -> Path:
    path = tmp_path / "random.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def test_random_bytes(tmp_path):
    path = _random_bytes_file(tmp_path)
    with pytest.raises(CheckpointError, match=_err(path, "cannot load")):
        load_sam_checkpoint(path, arch=TINY)


def test_random_bytes_are_not_reported_as_pickled_objects(tmp_path):
    path = _random_bytes_file(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path, arch=TINY)
    msg = str(info.value)
    assert "pickled Python objects" not in msg
    assert "not a readable PyTorch checkpoint" in msg or "truncated or corrupt" in msg


def test_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, this is not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match=_err(path, "not a readable PyTorch checkpoint")):
        load_sam_checkpoint(path, arch=TINY)


@pytest.mark.parametrize(
    "obj, kind",
    [([1, 2, 3], "list"), (torch.zeros(3), "Tensor")],
    ids=["list", "tensor"],
)
def test_file_holding_no_dict(tmp_path, obj, kind):
    path = _save(obj, tmp_path / f"{kind}.pth")
    with pytest.raises(CheckpointError, match=_err(path, f"not a SAM checkpoint: it holds a {kind}")):
        load_sam_checkpoint(path, arch=TINY)


def test_dict_without_sam_keys(tmp_path):
    path = _save({"encoder.weight": torch.zeros(2), "head.bias": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=_err(path, "not a SAM checkpoint: no keys under image_encoder")):
        load_sam_checkpoint(path, arch=TINY)


def test_missing_parameter_is_named(tmp_path, tiny_sd):
    key = "mask_decoder.output_upscaling.0.weight"
    sd = {k: v for k, v in tiny_sd.items() if k != key}
    path = _save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=_err(path, "missing 1 parameters: " + re.escape(key))):
        load_sam_checkpoint(path, arch=TINY)


def test_missing_parameter_needed_for_inference_is_named(tmp_path, tiny_sd):
    key = "image_encoder.patch_embed.proj.weight"
    sd = {k: v for k, v in tiny_sd.items() if k != key}
    path = _save(sd, tmp_path / "missing_patch.pth")
    with pytest.raises(CheckpointError, match=_err(path, "missing parameter " + re.escape(repr(key)))):
        load_sam_checkpoint(path, arch=TINY)


def test_missing_block_norm_is_not_silently_truncated(tmp_path, tiny_sd):
    key = "image_encoder.blocks.3.norm1.weight"
    sd = {k: v for k, v in tiny_sd.items() if k != key}
    path = _save(sd, tmp_path / "missing_norm.pth")
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_sam_checkpoint(path, arch=None)


def test_shape_mismatch_names_key_and_shapes(tmp_path, tiny_sd):
    key = "mask_decoder.iou_token.weight"
    sd = dict(tiny_sd)
    sd[key] = torch.zeros(2, 32)
    path = _save(sd, tmp_path / "shape.pth")
    pattern = _err(path, "shape mismatch: " + re.escape(f"{key} (file (2, 32), expected (1, 32))"))
    with pytest.raises(CheckpointError, match=pattern):
        load_sam_checkpoint(path, arch=TINY)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_parameter(tmp_path, tiny_sd, value):
    key = "image_encoder.blocks.2.mlp.lin1.weight"
    sd = dict(tiny_sd)
    sd[key] = sd[key].clone()
    sd[key][3, 5] = value
    path = _save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=_err(path, re.escape(key) + " contains NaN or infinite values")):
        load_sam_checkpoint(path, arch=TINY)


@pytest.mark.parametrize(
    "extra",
    [argparse.Namespace(lr=1), CustomObject()],
    ids=["argparse_namespace", "custom_class"],
)
def test_pickled_python_objects_are_refused(tmp_path, tiny_sd, extra):
    path = _save({"model": tiny_sd, "args": extra}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=_err(path, "pickled Python objects.*weights_only")):
        load_sam_checkpoint(path, arch=TINY)


def test_pickled_object_is_never_constructed(tmp_path, tiny_sd, monkeypatch):
    calls = []
    monkeypatch.setattr(CustomObject, "__setstate__", lambda self, state: calls.append(state), raising=False)
    path = _save({"model": tiny_sd, "x": CustomObject()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError):
        load_sam_checkpoint(path, arch=TINY)
    assert calls == []


def test_architecture_mismatch(tmp_path, tiny_sd):
    path = _save(tiny_sd, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=_err(path, "architecture mismatch.*expects vit_b")):
        load_sam_checkpoint(path, arch=VIT_B)
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        load_sam_checkpoint(path)  # default arch is vit_b


def test_architecture_mismatch_with_small_variant(tmp_path, tiny_sd):
    other = dataclasses.replace(TINY, name="tiny2", encoder_depth=2, encoder_global_attn_indexes=(1,))
    path = _save(random_state(other, 5), tmp_path / "tiny2.pth")
    with pytest.raises(CheckpointError, match=_err(path, "architecture mismatch.*2 blocks.*expects tiny")):
        load_sam_checkpoint(path, arch=TINY)


def test_adapter_model_is_refused(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["image_encoder.blocks.0.Adapter.channel.0.weight"] = torch.randn(8, 32)
    sd["image_encoder.blocks.0.Adapter.spatial.0.weight"] = torch.randn(8, 32, 3, 3)
    path = _save({"model": sd}, tmp_path / "sam_med2d.pth")
    with pytest.raises(CheckpointError, match=_err(path, "adapter.*Adapter\\.channel")):
        load_sam_checkpoint(path, arch=TINY)
    with pytest.raises(CheckpointError, match="adapter"):
        load_sam_checkpoint(path, arch=None)


# ------------------------------------------------------------------------------------------------ infer_arch


@pytest.mark.parametrize("preset", [VIT_B, VIT_L, VIT_H], ids=lambda s: s.name)
def test_infer_arch_recognises_presets(preset):
    found = infer_arch(reference_state(preset))
    assert found is PRESETS[preset.name]
    assert found.name == preset.name


def test_infer_arch_tiny():
    found = infer_arch(random_state(TINY, 1))
    assert found.shape_key() == TINY.shape_key()
    assert found.name == "custom"


def test_infer_arch_distinguishes_l_from_h():
    assert infer_arch(reference_state(VIT_L)).shape_key() != infer_arch(reference_state(VIT_H)).shape_key()


def test_vit_l_file_is_architecture_mismatch(tmp_path, monkeypatch):
    """A ViT-L checkpoint is refused by a vit_b pool (shapes only: the loader is fed meta tensors)."""
    import medsamix.models.checkpoint as ck

    path = tmp_path / "sam_vit_l.pth"
    path.write_bytes(b"placeholder")
    monkeypatch.setattr(ck, "_read", lambda p: reference_state(VIT_L))
    with pytest.raises(CheckpointError, match=_err(path, "architecture mismatch: the file is vit_l.*expects vit_b")):
        load_sam_checkpoint(path, arch=VIT_B)


# ------------------------------------------------------------------------------------------------------- saving


def test_save_roundtrip_and_no_temp_file(tmp_path, tiny_sd):
    out = tmp_path / "sub" / "merged.pth"
    save_sam_checkpoint(tiny_sd, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.pth"]
    sd, report = load_sam_checkpoint(out, arch=TINY)
    assert report.layout == "plain" and report.prefix == ""
    _assert_same_tensors(sd, tiny_sd)


def test_save_replaces_existing_file(tmp_path, tiny_sd):
    out = tmp_path / "merged.pth"
    out.write_bytes(b"old contents")
    other = random_state(TINY, 7)
    save_sam_checkpoint(other, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.pth"]
    sd, _ = load_sam_checkpoint(out, arch=TINY)
    _assert_same_tensors(sd, other)


def test_failed_save_keeps_existing_file_and_leaves_no_temp(tmp_path, tiny_sd, monkeypatch):
    out = tmp_path / "merged.pth"
    out.write_bytes(b"old contents")
    written = []

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        written.append(Path(f))
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_sam_checkpoint(tiny_sd, out)
    assert written and written[0] != out and written[0].parent == tmp_path
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.pth"]


def test_save_does_not_store_the_whole_storage_of_views(tmp_path):
    big = torch.zeros(1_000_000)
    out = tmp_path / "view.pth"
    save_sam_checkpoint({"w": big[:10]}, out)
    assert out.stat().st_size < 100_000
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.zeros(10))


# --------------------------------------------------------------------------------------------- real ViT-B (slow)


@pytest.mark.slow
def test_real_vit_b_checkpoints(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    model = sam_model_registry["vit_b"]()
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layouts = {
        "medicosam.pth": ({"model_state": {"sam." + k: v for k, v in expected.items()}, "optimizer_state": {}},
                          "model_state", "sam."),
        "medsam.pth": ({"model": expected, "epoch": 10}, "model", ""),
    }
    for name, (obj, layout, prefix) in layouts.items():
        path = _save(obj, tmp_path / name)
        sd, report = load_sam_checkpoint(path)
        assert (report.layout, report.prefix, report.ignored) == (layout, prefix, [])
        assert report.arch is VIT_B
        _assert_same_tensors(sd, expected)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        result = model.load_state_dict(sd, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k]), k
        path.unlink()
