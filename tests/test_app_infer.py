"""The MONAI Label app's inference: prompt mapping, embedding cache, 3D propagation, and the real server end to end.

Unit tests need no server. The end-to-end tests start ``monailabel start_server`` once (module fixture) on a
generated datastore - phantoms, an LPS-oriented NRRD, a NIfTI with permuted/flipped axes, a 2D image - and talk to it
with MONAI Label's own Python client.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app_server import running_server
from conftest import TINY
from medsamix.search.evaluate import Evaluator
from medsamix.models.preprocess import Preprocessor
from medsamix.serving.prompts import PromptError, SlicePrompt, VolumePrompt, parse_prompt
from medsamix.demo.sample_studies import phantom_volume, write_phantoms
from medsamix.serving.segmenter import EmbeddingCache, Segmenter, confine
from medsamix.serving.service import load_served_pool, member_model
from medsamix.data.slices import SliceSample
from medsamix.data.tasks import Task
from medsamix.data.volumes import load_volume

REPO = Path(__file__).resolve().parents[1]
POOL = REPO / "sample-data" / "pool"
SHAPE = (96, 80, 32)


# ---------------------------------------------------------------- prompt mapping (no server)

def test_roi_pairs_in_any_order_give_the_same_xyxy_box():
    a = parse_prompt({"roi": [20, 50, 10, 40, 7, 7]}, SHAPE)
    b = parse_prompt({"roi": [50, 20, 40, 10, 7, 7]}, SHAPE)
    for p in (a, b):
        assert p.mode == "2d" and len(p.seeds) == 1 and p.seeds[0].index == 7
        # x = column = J (10..40), y = row = I (20..50)
        np.testing.assert_array_equal(p.seeds[0].box, [10, 20, 40, 50])


def test_xyxy_box_covers_exactly_the_roi_voxels_of_the_slice():
    vol = np.zeros(SHAPE, np.float32)
    vol[20:51, 10:41, 7] = 1  # the roi's voxels (inclusive ranges)
    p = parse_prompt({"roi": [50, 20, 10, 40, 7, 7]}, SHAPE)
    x0, y0, x1, y1 = p.seeds[0].box.astype(int)
    sl = vol[:, :, p.seeds[0].index]  # the array fed to the model: rows = I, columns = J
    assert sl[y0:y1 + 1, x0:x1 + 1].all() and sl.sum() == (y1 - y0 + 1) * (x1 - x0 + 1)


def test_points_map_ijk_to_xy_and_group_by_slice():
    p = parse_prompt({"foreground": [[30, 12, 5], [31, 13, 9]], "background": [[2, 3, 5]], "slice": 5}, SHAPE)
    assert p.mode == "2d" and [s.index for s in p.seeds] == [5]
    np.testing.assert_array_equal(p.seeds[0].points, [[12, 30], [3, 2]])
    np.testing.assert_array_equal(p.seeds[0].labels, [1, 0])
    assert p.ignored_points == 1  # the point on slice 9
    q = parse_prompt({"foreground": [[30, 12, 5], [31, 13, 9]]}, SHAPE)  # no slice: every slice with points
    assert [s.index for s in q.seeds] == [5, 9]
    o = parse_prompt({"pos_points": [[30, 12, 5]], "neg_points": [[2, 3, 5]]}, SHAPE)  # OHIF-AI names
    np.testing.assert_array_equal(o.seeds[0].points, p.seeds[0].points)
    np.testing.assert_array_equal(o.seeds[0].labels, p.seeds[0].labels)


def test_3d_box_seeds_the_middle_or_given_slice_and_pos_boxes_match_roi():
    p = parse_prompt({"roi": [20, 50, 10, 40, 12, 4]}, SHAPE)
    assert p.mode == "3d" and p.propagate == (4, 12) and p.seeds[0].index == 8
    assert parse_prompt({"roi": [20, 50, 10, 40, 4, 12], "slice": 5}, SHAPE).seeds[0].index == 5
    assert parse_prompt({"roi": [20, 50, 10, 40, 4, 12], "mode": "2d"}, SHAPE).mode == "2d"
    o = parse_prompt({"pos_boxes": [[[50, 40, 12], [20, 10, 4]]]}, SHAPE)
    assert o.propagate == p.propagate and np.array_equal(o.seeds[0].box, p.seeds[0].box)


def test_roi_sticking_out_is_clipped_and_flagged():
    p = parse_prompt({"roi": [-3, 50, 10, 90, 7, 7]}, SHAPE)
    assert p.clipped and np.array_equal(p.seeds[0].box, [10, 0, 79, 50])


@pytest.mark.parametrize("request_, reason", [
    ({"roi": [100, 120, 10, 40, 7, 7]}, "outside the volume"),
    ({"roi": [20, 50, 10, 40, 40, 45]}, "outside the volume"),
    ({"roi": [20, 20, 10, 40, 7, 7]}, "empty"),
    ({"roi": [1, 2, 3]}, r"expected \[i_a"),
    ({"roi": [1, 2, 3, 4, "a", 6]}, "expected a number"),
    ({"foreground": [[96, 2, 3]]}, "outside the volume"),
    ({"background": [[1, 2, -1]], "foreground": [[1, 2, 3]]}, "outside the volume"),
    ({"foreground": [[1, 2]]}, r"\[i, j, k\]"),
    ({"background": [[1, 2, 3]]}, "no prompt"),
    ({}, "no prompt"),
    ({"foreground": [[1, 2, 3]], "slice": 4}, "no foreground point on slice 4"),
    ({"foreground": [[1, 2, 3]], "slice": 40}, "outside the volume"),
    ({"foreground": [[1, 2, 3]], "mode": "3d"}, "needs a box"),
    ({"roi": [20, 50, 10, 40, 7, 7], "pos_boxes": [[[1, 2, 3], [4, 5, 6]]]}, "not both"),
    ({"pos_boxes": [[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]]}, "exactly one box"),
    ({"roi": [20, 50, 10, 40, 7, 7], "mode": "4d"}, "mode must be"),
    ({"roi": [20, 50, 10, 40, 7, 7], "neg_boxes": [[[1, 2, 3], [4, 5, 6]]]}, "not supported"),
    ({"pos_points": [[1, 2, 3, 4]]}, r"pos_points\[0\]"),
])
def test_bad_prompts_are_refused_with_the_reason(request_, reason):
    with pytest.raises(PromptError, match=reason):
        parse_prompt(request_, SHAPE)


def test_2d_image_is_refused():
    with pytest.raises(PromptError, match="3D image"):
        parse_prompt({"roi": [1, 5, 1, 5, 0, 0]}, (64, 64))


def test_all_zero_roi_means_no_roi():
    p = parse_prompt({"roi": [0, 0, 0, 0, 0, 0], "foreground": [[3, 4, 5]]}, SHAPE)
    assert p.seeds[0].box is None and p.seeds[0].index == 5


# ---------------------------------------------------------------- segmenter (no server)

def test_second_prompt_on_the_same_slice_needs_no_encoder_pass(tiny_segmenter_parts):
    model, prep = tiny_segmenter_parts
    vol = np.random.default_rng(0).uniform(0, 255, (40, 48, 6)).astype(np.float32)
    seg = Segmenter(model, prep, "v1")
    calls = {"n": 0}
    hook = model.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        first = seg.segment("img", vol, parse_prompt({"roi": [5, 30, 5, 40, 2, 2]}, vol.shape))
        again = seg.segment("img", vol, parse_prompt({"roi": [8, 20, 6, 30, 2, 2], "foreground": [[12, 14, 2]]},
                                                      vol.shape))
        assert calls["n"] == 1 and seg.encoder_passes == 1
        assert not first.latency.cache_hit and first.latency.encoder_ms > 0
        assert again.latency.cache_hit and again.latency.encoder_ms == 0 and again.latency.decoder_ms > 0
        seg.segment("other", vol, parse_prompt({"roi": [5, 30, 5, 40, 2, 2]}, vol.shape))  # another image
        seg.segment("img", vol, parse_prompt({"roi": [5, 30, 5, 40, 3, 3]}, vol.shape))  # another slice
        assert calls["n"] == 3
        seg.set_model(model, prep, "v2")  # new weights: old embeddings are not reused
        seg.segment("img", vol, parse_prompt({"roi": [5, 30, 5, 40, 2, 2]}, vol.shape))
        assert calls["n"] == 4 and all(k[2] == "v2" for k in seg.cache.keys())
    finally:
        hook.remove()


def test_embedding_cache_is_bounded_in_bytes():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for k in range(5):
        cache.put(("img", k, "v"), torch.zeros(100))  # 400 bytes each
    assert len(cache) == 3 and cache.get(("img", 0, "v")) is None and cache.get(("img", 4, "v")) is not None


def test_segmenter_box_result_equals_evaluator(tiny_segmenter_parts):
    """The segmenter's 2D box path and the library's evaluator (independent code) agree on the same slice."""
    model, prep = tiny_segmenter_parts
    image, label = phantom_volume(np.random.default_rng(1), (60, 50, 8))
    vol = (image / image.max() * 255).astype(np.float32)
    p = parse_prompt({"roi": [10, 40, 5, 30, 4, 4]}, vol.shape)
    got = Segmenter(model, prep, "v").segment("x", vol, p).mask[:, :, 4].astype(bool)
    sample = SliceSample("x", Task("t", 1), 2, 4, vol[:, :, 4], label[:, :, 4] > 0, np.array([5, 10, 30, 40],
                                                                                             np.float32))
    want = confine(Evaluator([sample]).predict(model, prep)[0], p.roi_box)
    np.testing.assert_array_equal(got, want)


class _ScriptedSegmenter(Segmenter):
    """Returns prepared masks per slice, to test the propagation logic alone."""

    def __init__(self, masks: dict[int, np.ndarray]) -> None:
        super().__init__(TINY.build(), Preprocessor("sam", TINY.img_size), "scripted")
        self.masks = masks
        self.boxes: dict[int, np.ndarray | None] = {}

    def predict_slice(self, image_key, volume, prompt: SlicePrompt, lat=None, ahead=()):
        self.boxes[prompt.index] = prompt.box
        return self.masks[prompt.index].copy()


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_propagation_follows_the_previous_mask_and_stops_on_iou_drop():
    hw = (40, 40)
    masks = {k: _disk(hw, 20, 20, 8) for k in range(10)}
    masks[7] = _disk(hw, 20, 20, 2)  # a collapse: IoU with slice 6 is tiny
    masks[2] = np.zeros(hw, bool)  # nothing found
    seg = _ScriptedSegmenter(masks)
    vol = np.zeros((*hw, 10), np.float32)
    box = np.array([5, 5, 35, 35], np.float32)
    prompt = VolumePrompt((*hw, 10), [SlicePrompt(4, box, np.zeros((0, 2), np.float32), np.zeros(0, np.int64))],
                          (0, 9), box, {})
    out = seg.segment("img", vol, prompt, iou_threshold=0.4, margin=2)
    assert sorted(out.slices) == [3, 4, 5, 6]
    assert "IoU" in out.stop_reasons["up"] and "slice 7" in out.stop_reasons["up"]
    assert "empty prediction on slice 2" in out.stop_reasons["down"]
    assert out.mask[:, :, [0, 1, 2, 7, 8, 9]].sum() == 0
    # the next slice's box is the previous mask's tight box plus the margin, clipped to the user's box
    np.testing.assert_array_equal(seg.boxes[5], [10, 10, 30, 30])


# ---------------------------------------------------------------- end to end with the real server

LPS_AFFINE = np.array([[0.0, -0.8, 0.0, 40.0], [-1.2, 0.0, 0.0, 30.0], [0.0, 0.0, 2.5, -20.0], [0, 0, 0, 1]])


def _write_itk_lps_nrrd(path: Path, image: np.ndarray) -> None:
    """An NRRD (LPS space, as ITK writes it) with a permuted and flipped direction matrix."""
    import itk

    img = itk.image_from_array(np.ascontiguousarray(image.transpose(2, 1, 0)))  # ITK arrays are (K, J, I)
    img.SetSpacing([0.8, 1.2, 2.5])
    img.SetOrigin([-10.0, 25.0, -20.0])
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    img.SetDirection(itk.matrix_from_array(direction))
    itk.imwrite(img, str(path))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    write_phantoms(root, count=2, seed=3)  # phantom_000 (RAS), phantom_001 (LPS-style affine)
    image = nib.load(str(root / "phantom_000.nii.gz")).get_fdata().astype(np.float32)
    label = nib.load(str(root / "labels" / "final" / "phantom_000.nii.gz")).get_fdata().astype(np.int16)
    # the same voxel array with a permuted, flipped affine, and as an LPS NRRD written by ITK
    nib.save(nib.Nifti1Image(image, LPS_AFFINE), str(root / "twin_oblique.nii.gz"))
    nib.save(nib.Nifti1Image(label, LPS_AFFINE), str(root / "labels" / "final" / "twin_oblique.nii.gz"))
    _write_itk_lps_nrrd(root / "twin_lps.nrrd", image)
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.float32), np.eye(4)), str(root / "flat.nii.gz"))
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "photo.png")
    return root


@pytest.fixture(scope="module", params=["hardened", pytest.param("monailabel", marks=pytest.mark.slow)])
def server(studies, tmp_path_factory, request):
    """The project's hardened server (what serve.sh runs) and MONAI Label's own start_server (the unhardened path,
    in the slow set): every end-to-end test runs against both."""
    model_dir = tmp_path_factory.mktemp("model")
    with running_server(studies, {"pool": str(POOL), "model_dir": str(model_dir)}, kind=request.param) as url:
        yield url, model_dir


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server[0], tmpdir=str(tmp_path_factory.mktemp("client")))


def _infer(client, model: str, image: str, params: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    path, out = client.infer(model, image, params)
    img = nib.load(path)
    mask, affine = np.asarray(img.dataobj), img.affine
    Path(path).unlink()
    return mask, affine, out


def _error(exc: Exception) -> tuple[int, str]:
    """HTTP status and ``detail`` of a MONAILabelClientException ("Status: <code>; Response: <json>")."""
    text = str(getattr(exc, "msg", exc))
    m = re.search(r"Status: (\d+); Response: (.*)$", text, re.S)
    assert m, text
    return int(m.group(1)), str(json.loads(m.group(2))["detail"])


def test_info_lists_the_merged_and_pool_models_as_deepgrow(client):
    info = client.info()
    models = info["models"]
    assert set(models) == {"medsamix", "sam_tiny", "medsam_tiny", "medicosam_tiny"}
    assert all(m["type"] == "deepgrow" and m["dimension"] == 3 for m in models.values())
    assert "uniform linear merge" in models["medsamix"]["description"]
    assert info["labels"] == ["ellipsoid", "blob"]
    assert "merge" in info["trainers"]


def test_box_prompt_equals_the_direct_library_call(client, studies):
    roi = [60, 30, 10, 70, 15, 15]  # unsorted I pair on purpose
    mask, affine, out = _infer(client, "sam_tiny", "phantom_000", {"roi": roi, "label": "ellipsoid"})
    assert out["mode"] == "2d" and out["slices"] == [15] and out["label_names"] == {"ellipsoid": 1}
    vol = load_volume(studies / "phantom_000.nii.gz")
    np.testing.assert_allclose(affine, vol.affine, atol=1e-5)
    assert mask.shape == vol.shape and mask[:, :, [k for k in range(vol.shape[2]) if k != 15]].sum() == 0
    served = member_model(load_served_pool(POOL), "sam_tiny")
    box = np.array([10, 30, 70, 60], np.float32)  # x = J 10..70, y = I 30..60
    label = np.zeros(vol.shape[:2], bool)
    sample = SliceSample("phantom_000", Task("t", 1), 2, 15, vol.image255[:, :, 15], label, box)
    want = confine(Evaluator([sample]).predict(served.model, served.prep)[0], box)
    assert want.sum() > 50
    np.testing.assert_array_equal(mask[:, :, 15].astype(bool), want)


def test_repeated_prompt_on_the_same_slice_is_a_cache_hit(client):
    _, _, first = _infer(client, "medicosam_tiny", "phantom_000", {"roi": [30, 60, 10, 70, 20, 20]})
    _, _, again = _infer(client, "medicosam_tiny", "phantom_000", {"roi": [32, 58, 12, 66, 20, 20]})
    assert not first["latencies"]["cache_hit"] and first["latencies"]["encoder_ms"] > 0
    assert again["latencies"]["cache_hit"] and again["latencies"]["encoder_ms"] == 0
    assert again["latencies"]["decoder_ms"] > 0 and again["latencies"]["total_ms"] >= again["latencies"]["decoder_ms"]


def test_points_and_pos_boxes(client, studies):
    gt = np.asarray(nib.load(str(studies / "labels" / "final" / "phantom_000.nii.gz")).dataobj)
    k = int(np.argmax((gt == 1).sum(axis=(0, 1))))
    i, j = (int(np.median(a)) for a in np.nonzero(gt[:, :, k] == 1))
    mask, _, out = _infer(client, "sam_tiny", "phantom_000", {"foreground": [[i, j, k]], "background": [[2, 2, k]]})
    assert out["mode"] == "2d" and out["slices"] == [k] and mask[:, :, k].sum() > 0
    assert mask.sum() == mask[:, :, k].sum()
    by_roi, _, _ = _infer(client, "sam_tiny", "phantom_000", {"roi": [30, 60, 10, 70, 12, 18]})
    by_box, _, out = _infer(client, "sam_tiny", "phantom_000", {"pos_boxes": [[[60, 70, 18], [30, 10, 12]]]})
    assert out["mode"] == "3d"
    np.testing.assert_array_equal(by_roi, by_box)


def test_3d_box_propagates_within_the_roi(client, studies):
    gt = np.asarray(nib.load(str(studies / "labels" / "final" / "phantom_000.nii.gz")).dataobj) == 1
    ii, jj, kk = np.nonzero(gt)
    k_mid = (int(kk.min()) + int(kk.max())) // 2
    k_lo, k_hi = k_mid - 3, k_mid + 3  # part of the structure: 7 slices keep the test fast
    roi = [int(ii.max()) + 2, int(ii.min()) - 2, int(jj.min()) - 2, int(jj.max()) + 2, k_hi, k_lo]
    mask, _, out = _infer(client, "medsamix", "phantom_000", {"roi": roi})
    assert out["mode"] == "3d" and set(out["stop_reasons"]) == {"up", "down"}
    ks = out["slices"]
    assert ks == list(range(min(ks), max(ks) + 1)) and len(ks) > 1  # contiguous around the seed
    outside = np.ones_like(mask, bool)
    outside[ii.min() - 2:ii.max() + 3, jj.min() - 2:jj.max() + 3, k_lo:k_hi + 1] = False
    assert mask.sum() > 0 and mask[outside].sum() == 0
    assert out["latencies"]["cache_misses"] + out["latencies"]["cache_hits"] >= len(ks)


@pytest.mark.parametrize("image", ["twin_oblique", "twin_lps"])
def test_result_lands_on_the_requested_voxels_whatever_the_orientation(client, studies, image):
    import itk

    roi = [30, 60, 10, 70, 14, 16]
    ref, _, _ = _infer(client, "sam_tiny", "phantom_000", {"roi": roi})
    path, out = client.infer("sam_tiny", image, {"roi": roi})
    try:
        lab = itk.imread(path)
        src = itk.imread(str(studies / (image + (".nrrd" if image.endswith("lps") else ".nii.gz"))))
        # the label has the image's geometry as ITK (and so 3D Slicer) reads both
        np.testing.assert_allclose(np.asarray(lab.GetOrigin()), np.asarray(src.GetOrigin()), atol=1e-4)
        np.testing.assert_allclose(np.asarray(lab.GetSpacing()), np.asarray(src.GetSpacing()), atol=1e-5)
        np.testing.assert_allclose(itk.array_from_matrix(lab.GetDirection()),
                                   itk.array_from_matrix(src.GetDirection()), atol=1e-5)
        mask = itk.array_from_image(lab).transpose(2, 1, 0)  # ITK (K, J, I) -> IJK
    finally:
        Path(path).unlink()
    # the same voxel array in another orientation gives the same voxels, all inside the roi
    assert mask.sum() > 0
    np.testing.assert_array_equal(mask, ref)
    inside = np.zeros_like(mask, bool)
    inside[30:61, 10:71, 14:17] = True
    assert mask[~inside].sum() == 0


def test_saving_a_result_as_label(client, studies):
    path, _ = client.infer("sam_tiny", "phantom_001", {"roi": [30, 60, 10, 70, 15, 15]})
    try:
        client.save_label("phantom_001", path, tag="final")
    finally:
        Path(path).unlink()
    saved = nib.load(str(studies / "labels" / "final" / "phantom_001.nii.gz"))
    img = nib.load(str(studies / "phantom_001.nii.gz"))
    np.testing.assert_allclose(saved.affine, img.affine, atol=1e-5)
    assert np.asarray(saved.dataobj)[:, :, 15].sum() > 0


def test_a_session_image_uploaded_by_the_client_is_segmented(client, studies):
    """3D Slicer sends a local volume as a session (PUT /session/) and infers with its id."""
    session = client.create_session(str(studies / "twin_lps.nrrd"))
    ref, _, _ = _infer(client, "sam_tiny", "phantom_000", {"roi": [30, 60, 10, 70, 15, 15]})
    path, out = client.infer("sam_tiny", "", {"roi": [30, 60, 10, 70, 15, 15]}, session_id=session["session_id"])
    mask = np.asarray(nib.load(path).dataobj)
    Path(path).unlink()
    assert out["slices"] == [15]
    np.testing.assert_array_equal(mask, ref)


@pytest.mark.parametrize("model, image, params, status, reason", [
    ("nope", "phantom_000", {"roi": [30, 60, 10, 70, 15, 15]}, 404, "unknown model 'nope'"),
    ("sam_tiny", "no_such_image", {"roi": [30, 60, 10, 70, 15, 15]}, 404, "not in the datastore"),
    ("sam_tiny", "/etc/hostname", {"roi": [30, 60, 10, 70, 15, 15]}, 400, ("file path", "no path separators")),
    ("sam_tiny", "phantom_000", {"roi": [130, 160, 10, 70, 15, 15]}, 400, "outside the volume"),
    ("sam_tiny", "phantom_000", {"roi": [30, 30, 10, 70, 15, 15]}, 400, "empty"),
    ("sam_tiny", "phantom_000", {"foreground": [[10, 10, 99]]}, 400, "outside the volume"),
    ("sam_tiny", "phantom_000", {}, 400, "no prompt"),
    ("sam_tiny", "phantom_000", {"roi": [30, 60, 10, 70, 15, 15], "iou_threshold": 3}, 400, "iou_threshold"),
    ("sam_tiny", "flat", {"roi": [3, 30, 3, 30, 0, 0]}, 400, "expected a 3D image"),
    ("sam_tiny", "photo", {"roi": [3, 30, 3, 30, 0, 0]}, 400, "2D images (PNG, JPEG, TIFF) are not supported"),
])
def test_bad_requests_get_4xx_with_the_reason_and_the_server_keeps_running(client, model, image, params, status,
                                                                           reason):
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as e:
        client.infer(model, image, params)
    got_status, detail = _error(e.value)
    reasons = reason if isinstance(reason, tuple) else (reason,)
    assert got_status == status and any(r in detail for r in reasons), detail
    assert "medsamix" in client.info()["models"]


def test_publishing_a_merge_is_served_without_restart(client, server):
    """Hot reload: a newly published merged model (here: medicosam_tiny's weights) is used on the next request."""
    from medsamix.models.architecture import TINY256
    from medsamix.merging.config import MergeConfig
    from medsamix.merging.groups import group_parameters
    from medsamix.models.architecture import reference_param_names
    from medsamix.runs.publish import publish
    from medsamix.merging.recipe import ModelRef, Recipe

    _, model_dir = server
    pool = load_served_pool(POOL)
    groups = group_parameters(reference_param_names(TINY256), 2, False)
    merge = MergeConfig.uniform(groups, "pick", {"source": "medicosam_tiny"}, 2, False)
    refs = {m.alias: ModelRef(m.alias, m.sha256) for m in pool.members}
    recipe = Recipe(TINY256, refs["sam_tiny"], [refs["medsam_tiny"], refs["medicosam_tiny"]], merge,
                    {"style": "sam"}, {"test_dice": 0.5})
    roi = [30, 60, 10, 70, 15, 15]
    before, _, out0 = _infer(client, "medsamix", "phantom_000", {"roi": roi})
    assert out0["model_version"].startswith("uniform-linear")
    pub = publish(model_dir / "merged", recipe, member_model(pool, "medicosam_tiny").model.state_dict())
    after, _, out1 = _infer(client, "medsamix", "phantom_000", {"roi": roi})
    assert out1["model_version"] == pub.version and pub.version in client.info()["models"]["medsamix"]["description"]
    assert not out1["latencies"]["cache_hit"]  # new weights: the slice is embedded again
    ref, _, _ = _infer(client, "medicosam_tiny", "phantom_000", {"roi": roi})
    np.testing.assert_array_equal(after, ref)
    (model_dir / "merged" / "current.json").write_text("{broken")
    still, _, out2 = _infer(client, "medsamix", "phantom_000", {"roi": roi})
    assert "unusable" in out2.get("warning", "") and out2["model_version"] == pub.version
    np.testing.assert_array_equal(still, ref)
    shutil.rmtree(model_dir / "merged")


def test_server_on_checkpoint_files_given_as_models(tiny_pool_files, studies):
    """``--conf models alias=path,...`` (first = base) instead of a pool folder, with per-model preprocessing."""
    from monailabel.client import MONAILabelClient

    spec = ",".join(f"{a}={p}" for a, p in tiny_pool_files.items())
    with running_server(studies, {"models": spec, "preprocessing": "medsam=medsam"}, kind="hardened") as url:
        c = MONAILabelClient(url)
        models = c.info()["models"]
        assert set(models) == {"medsamix", "sam", "medsam", "medicosam"}
        assert "medsam preprocessing" in models["medsam"]["description"]
        path, out = c.infer("medsam", "phantom_000", {"roi": [30, 60, 10, 70, 15, 15]})
        Path(path).unlink()
        assert out["model_version"].startswith("medsam@") and out["slices"] == [15]


@pytest.mark.parametrize("kwargs, reason", [
    ({"models": "sam=a.pth"}, "alias=path,alias=path"),
    ({"models": "sam=a.pth,sam=b.pth"}, "duplicate aliases"),
    ({"models": "sam=a.pth,medsam"}, "expected alias=path"),
    ({"models": "sam=/nonexistent/a.pth,medsam=/nonexistent/b.pth"}, "not found"),
    ({"pool_dir": "/nonexistent"}, "no pool manifest"),
])
def test_bad_pool_settings_are_refused_with_the_reason(kwargs, reason):
    from medsamix.errors import MedSAMixError
    from medsamix.serving.service import PoolLoader

    with pytest.raises(MedSAMixError, match=reason):
        PoolLoader(**kwargs)


def test_bad_styles_are_refused(tiny_pool_files):
    from medsamix.errors import PoolError
    from medsamix.serving.service import PoolLoader

    spec = ",".join(f"{a}={p}" for a, p in tiny_pool_files.items())
    with pytest.raises(PoolError, match="must be one of"):
        PoolLoader(models=spec, preprocessing="medsam=ct")
    with pytest.raises(PoolError, match="expected alias=style"):
        PoolLoader(models=spec, preprocessing="nobody=sam")


def test_corrupt_checkpoint_is_found_when_the_pool_loads(tiny_pool_files, tmp_path):
    from medsamix.errors import CheckpointError
    from medsamix.serving.service import PoolLoader

    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    loader = PoolLoader(models=f"sam={tiny_pool_files['sam']},bad={bad}")  # described without reading weights
    assert loader.aliases == ["sam", "bad"] and loader.base == "sam"
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        loader.load()


@pytest.mark.slow
def test_corrupt_checkpoint_stops_the_server_with_the_reason(tiny_pool_files, studies, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="not a readable PyTorch checkpoint"):
        with running_server(studies, {"models": f"sam={tiny_pool_files['sam']},bad={bad}"}, timeout_s=60,
                            kind="hardened"):
            pass


def test_before_publishing_the_merged_model_is_the_uniform_linear_merge(tiny_pool_files, tmp_path):
    from medsamix.serving.service import MergedModelSource, PoolLoader

    spec = ",".join(f"{a}={p}" for a, p in tiny_pool_files.items())
    loader = PoolLoader(models=spec, preprocessing="medsam=medsam")
    source = MergedModelSource(loader, tmp_path / "merged")
    served = source.get()
    assert served.version.startswith("uniform-linear@") and "uniform linear merge" in served.description
    assert served.prep.style == "sam"  # the base model's preprocessing
    sds = [torch.load(p, weights_only=True) for p in tiny_pool_files.values()]
    merged = served.model.state_dict()
    params = {n for n, _ in served.model.named_parameters()}
    for name in params:
        torch.testing.assert_close(merged[name], sum(sd[name] for sd in sds) / 3, rtol=1e-5, atol=1e-6)
    assert source.get() is served  # nothing published: no rebuild per request
