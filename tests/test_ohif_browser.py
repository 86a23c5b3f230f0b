"""OHIF (the viewer monailabel 0.8.5 bundles, served by the hardened server at ``/ohif/``) as a real client, in a real
headless Chromium, on a real PACS (issue 11).

Orthanc (DICOMweb) holds two real CT studies: 3 uncompressed slices (``../shared/data/dcmqi_ct3slice``) and 20
JPEG 2000 slices (``../shared/data/totalseg/example_ct_dicom``). The hardened MedSAMix server (``python -m
medsamix_server``) runs with ``--studies <Orthanc>/dicom-web``; the browser does what a user does: study list, open
the study in the MONAI Label mode, connect the MONAI Label panel, point prompt there; box prompts (2D and 3D), label
submission and merge training in the project's overlay panel (``server/medsamix_server/static/ohif/overlay.js``).
Everything (Orthanc, the server, chromedriver and Chromium) runs in one private loopback-only network namespace
(``tests/orthanc.py``). The tests share one server and one browser and run in file order (later ones use the labels
earlier ones submitted; each opens the study it needs itself).

Every labelmap is compared voxel for voxel with the server's answer to the same prompt asked directly (NIfTI, the
MONAI Label client's default). Console, HTTP calls and screenshots go to the module's temporary folder; with
``MEDSAMIX_UPDATE_DOCS=1`` the box and result screenshots are also written to ``docs/img/ohif-box.png`` and
``docs/img/ohif-result.png`` (the README's pictures).

Slow (one server, one browser, a 10-trial merge run: a few minutes on 2 CPU cores); needs ``../shared/data``, Orthanc
with its DICOMweb plugin (its GDCM plugin for the training run on the JPEG 2000 study), ``chromium`` and
``chromium-driver``; skips with the reason otherwise.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from browser import Browser
from browser import missing_requirements as browser_missing
from conftest import RUN_TIMEOUT_S, SHARED_DATA
from ohif_page import AXIAL, OhifPage
from orthanc import GDCM_PLUGIN, Sandbox, running_dicomweb_server, running_orthanc, with_fixed_uids
from orthanc import missing_requirements as orthanc_missing

REPO = Path(__file__).resolve().parents[1]
POOL = REPO / "sample-data" / "pool"
DOC_IMAGES = REPO / "docs" / "img"
CT3_DIR = SHARED_DATA / "dcmqi_ct3slice" / "ct-3slice"
CT3_LIVER = SHARED_DATA / "dcmqi_ct3slice" / "liver_seg.nrrd"  # the liver on the series' grid
J2K_DIR = SHARED_DATA / "totalseg" / "example_ct_dicom"  # 20 CT slices, JPEG 2000 lossless
J2K_LABEL = SHARED_DATA / "totalseg" / "example_seg_dicom.nii.gz"  # TotalSegmentator; J reversed (data README)
J2K_LIVER = 5
LIVER_POINT = (260, 250)  # (I, J) on the liver in every slice of the 3-slice series
TAB = "Point Prompts"
TRIALS = 10  # --conf merge_trials: what "Train merge" ({} options) runs (10: the least the search accepts)
LIVER_SEGMENT = 1  # the MONAI Label panel's segment of "liver" (the only label)

pytestmark = [pytest.mark.slow, pytest.mark.data]


# ---------------------------------------------------------------- fixtures
def _j2k_series(out: Path) -> list[Path]:
    """The JPEG 2000 CT series with fixed UIDs (:func:`orthanc.with_fixed_uids`)."""
    return with_fixed_uids(J2K_DIR, out, "medsamix-ohif-totalseg")


def _uids(path: Path) -> dict[str, str]:
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
            "syntax": str(ds.file_meta.TransferSyntaxUID)}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with both CT series, in a private namespace."""
    for d in (CT3_DIR, J2K_DIR):
        if not d.is_dir():
            pytest.skip(f"{d} is absent (../shared/data is only in the development workplace)")
    why = orthanc_missing() or browser_missing()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("ohif-orthanc")
    (work / "j2k").mkdir()
    ct3_files = sorted(CT3_DIR.glob("*.dcm"))
    j2k_files = _j2k_series(work / "j2k")
    with Sandbox() as sandbox, running_orthanc(sandbox, work) as orthanc:
        assert all(u["Status"] == "Success" for u in orthanc.upload(ct3_files + j2k_files))
        yield {"sandbox": sandbox, "orthanc": orthanc, "ct3": dict(_uids(ct3_files[0]), dir=CT3_DIR),
               "j2k": dict(_uids(j2k_files[0]), dir=work / "j2k")}


def _http(pacs, method: str, url: str, **kw):
    import requests

    return pacs["sandbox"].call(lambda: requests.request(method, url, timeout=300, **kw))


def _infer_direct(pacs, url: str, series: str, params: dict, model: str = "medsamix"):
    """The server's answer to ``params`` asked directly (without the result_* fields: NIfTI, the MONAI Label
    client's default)."""
    p = {k: v for k, v in params.items() if not k.startswith("result_")}
    return _http(pacs, "POST", f"{url}/infer/{model}", params={"image": series, "output": "image"},
                 data={"params": json.dumps(p)})


@pytest.fixture(scope="module")
def viewer(pacs, tmp_path_factory):
    """The hardened server on the PACS and one browser, shared by the tests of this module (in file order)."""
    work = tmp_path_factory.mktemp("ohif-viewer")
    conf = {"pool": str(POOL), "labels": "liver", "merge_trials": str(TRIALS)}
    with running_dicomweb_server(pacs["sandbox"], pacs["orthanc"].dicomweb, work, conf, kind="hardened") as url, \
            Browser(work / "browser", pacs["sandbox"]) as b:
        # The first request on a series the server has not fetched yet (MONAI Label's DICOMweb datastore answers
        # it with a temp-folder path, which the server once refused): recorded for
        # test_the_first_prompt_on_a_series_new_to_the_server_is_answered, then asked again if it failed so that
        # the viewer tests below do not depend on it.
        first = {}
        for name in ("ct3", "j2k"):
            r = _infer_direct(pacs, url, pacs[name]["series"], {"roi": [200, 260, 200, 260, 1, 1]}, "sam_tiny")
            first[name] = (r.status_code, r.text[:300] if r.status_code != 200 else "")
            if r.status_code != 200:
                r = _infer_direct(pacs, url, pacs[name]["series"], {"roi": [200, 260, 200, 260, 1, 1]}, "sam_tiny")
                assert r.status_code == 200, r.text[:1000]
        v = {"url": url, "b": b, "page": OhifPage(b, url), "work": work, "first": first}
        try:
            yield v
        finally:
            (work / "console.json").write_text(json.dumps({"console": b.console(), "requests": b.requests(),
                                                           "driver_log": b.driver_log()}, indent=1))


# ---------------------------------------------------------------- helpers
def _mask_of(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text[:1000]
    body = resp.content
    img = nib.Nifti1Image.from_bytes(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
    return np.asarray(img.dataobj)


def _open(viewer, pacs, name: str, connect: bool = True) -> dict:
    """The study ``name`` open in the MONAI Label mode (opened unless it already is), panels connected."""
    page, b = viewer["page"], viewer["b"]
    study = pacs[name]["study"]
    if study not in (b.url or "") or not b.js("return !!document.getElementById('medsamix-panel')"):
        page.open_study(study)
    if connect and not b.js("return document.querySelectorAll('.monaiLabelPanel .tab-label').length > 0"):
        page.connect()
    page.overlay_ready()
    return page.volume_geometry()


def _liver_box(name: str, k: int) -> tuple[int, int, int, int]:
    """(i0, i1, j0, j1): the reference liver's bounding box on slice ``k`` of series ``name``."""
    if name == "ct3":
        import SimpleITK as sitk

        liver = sitk.GetArrayFromImage(sitk.ReadImage(str(CT3_LIVER))).transpose(2, 1, 0) > 0
    else:
        liver = np.asarray(nib.load(str(J2K_LABEL)).dataobj)[:, ::-1, :] == J2K_LIVER
    ii, jj = np.nonzero(liver[:, :, k])
    return int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max())


def _expected(prior: np.ndarray, mask: np.ndarray, k0: int, k1: int, seg: int = LIVER_SEGMENT) -> np.ndarray:
    """The labelmap after the overlay wrote ``mask`` on slices k0..k1: there, voxels that were background or
    ``seg`` become ``seg`` where the mask is set, else background; everything else is kept."""
    out = prior.reshape(mask.shape, order="F").copy()
    for k in range(k0, k1 + 1):
        sl = out[:, :, k]
        upd = (sl == 0) | (sl == seg)
        sl[upd] = np.where(mask[:, :, k][upd] > 0, seg, 0)
    return out.ravel(order="F")


def _inner(region: np.ndarray, k: int, far_from: tuple[float, float]) -> tuple[int, int, int] | None:
    """A voxel of slice ``k`` of ``region`` whose 9x9 neighbourhood is all ``region``, as far as possible from
    ``far_from`` (I, J); None if there is none."""
    m = region[:, :, k].astype(bool)
    inner = m.copy()
    for di in range(-4, 5):
        for dj in range(-4, 5):
            inner &= np.roll(np.roll(m, di, 0), dj, 1)
    cand = np.argwhere(inner)
    if not len(cand):
        return None
    i, j = cand[int(np.argmax(((cand - np.array(far_from)) ** 2).sum(1)))]
    return int(i), int(j), k


def _pixels(png: Path, xy: tuple[float, float], r: int = 3) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))[..., :3]
    x, y = int(round(xy[0])), int(round(xy[1]))
    return img[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3)


def _drawn(page: OhifPage, before: Path, after: Path, region: np.ndarray, k: int, far_from) -> None:
    """The labelmap is drawn: the pixels inside ``region`` (voxels that became labelled) changed on screen."""
    ijk = _inner(region, k, far_from)
    if ijk is None:
        return  # nothing large enough became labelled
    xy = page.page_xy(ijk, AXIAL)
    change = np.abs(_pixels(after, xy) - _pixels(before, xy)).mean()
    assert change > 0.05, f"no overlay drawn at voxel {ijk} / page {xy} (mean change {change:.3f})"


def _doc_image(page: OhifPage, png: Path, dest_name: str) -> Path:
    """Crop the screenshot to the MedSAMix panel and the axial viewport, make it small (palette PNG, < 300 KB),
    save it next to the screenshot and, with MEDSAMIX_UPDATE_DOCS=1, as ``docs/img/<dest_name>``."""
    from PIL import Image

    rect = page.b.js("const u = e => e.getBoundingClientRect().toJSON();"
                     "const vp = window.cornerstone.getRenderingEngines()[0].getViewport(arguments[0]);"
                     "return {panel: u(document.getElementById('medsamix-panel')), vp: u(vp.element)};", AXIAL)
    img = Image.open(png).convert("RGB")
    left = int(max(0, rect["panel"]["left"] - 6))
    top = int(max(0, min(rect["panel"]["top"], rect["vp"]["top"]) - 6))
    right = int(min(img.width, rect["vp"]["right"] + 6))
    bottom = int(min(img.height, max(rect["panel"]["bottom"], rect["vp"]["bottom"]) + 6))
    img = img.crop((left, top, right, bottom))
    if img.width > 720:
        img = img.resize((720, round(img.height * 720 / img.width)), Image.LANCZOS)
    small = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out = png.with_name(dest_name)
    small.save(out, optimize=True)
    assert out.stat().st_size < 300_000, out.stat().st_size
    if os.environ.get("MEDSAMIX_UPDATE_DOCS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        (DOC_IMAGES / dest_name).write_bytes(out.read_bytes())
    return out


def _uncaught(b: Browser) -> list[dict]:
    return [e for e in b.errors() if e["level"] in ("uncaught", "unhandledrejection")]


def _stats(pacs, viewer) -> dict:
    return _http(pacs, "GET", f"{viewer['url']}/datastore/?output=stats").json()


# ---------------------------------------------------------------- the tests
def test_the_study_list_opens_the_study_and_both_panels_connect(pacs, viewer):
    page, b = viewer["page"], viewer["b"]
    assert set(page.study_list(2)) == {pacs["ct3"]["study"], pacs["j2k"]["study"]}
    assert not b.js("return !!document.getElementById('medsamix-panel') && "
                    "document.getElementById('medsamix-panel').style.display !== 'none'")  # no panel on the list
    g = page.open_from_study_list(pacs["ct3"]["study"])
    assert "/ohif/monai-label?StudyInstanceUIDs=" in b.url
    assert g["dimensions"] == [512, 512, 3] and g["direction"] == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert [p[2] for p in g["positions"]] == sorted(p[2] for p in g["positions"])  # slices ascend along the normal
    page.connect()
    assert page.tabs() == ["Active Learning", "Auto-Segmentation", "Point Prompts", "Class Prompts"]
    opts = page.overlay_ready()
    assert opts["version"] == 1
    assert b.js("return !!document.querySelector('script[src=\"/ohif/medsamix/overlay.js?v=1\"]')")
    assert set(opts["models"]) == {"medsamix", "sam_tiny", "medsam_tiny", "medicosam_tiny"}
    assert opts["labels"] == ["liver"]
    assert page.overlay_text()["text"].startswith("connected")
    line = page.overlay_text("medsamix-train-status")
    assert line["text"] == f"idle: no merge run yet (trials {TRIALS})", line
    assert not _uncaught(b), _uncaught(b)


def test_a_point_prompt_in_the_monai_label_panel_displays_the_servers_answer(pacs, viewer):
    """The regression test of issue 11's empty result: the infer answer is the NRRD the plugin asks for, and the
    plugin's labelmap equals the server's mask voxel for voxel (same axis and slice order)."""
    page, b, url = viewer["page"], viewer["b"], viewer["url"]
    _open(viewer, pacs, "ct3")
    page.open_tab(TAB)
    page.choose_label("liver")
    page.show_slice(2)
    ijk = page.click_voxel(*LIVER_POINT)
    page.wait_annotations("ProbeMONAILabel", 1)
    before = b.screenshot("point-placed")
    req = page.run_and_wait(TAB)
    after = b.screenshot("point-result")
    params = json.loads(req.get("form", {}).get("params", "{}"))
    assert req["method"] == "POST" and f"/infer/medsamix?image={pacs['ct3']['series']}&output=image" in req["url"]
    assert req["status"] == 200 and bytes(req["head"][:7]) == b"NRRD000", req  # NRRD, not the old gzip NIfTI
    (fi, fj, fk), = params["foreground"]
    assert abs(fi - ijk[0]) <= 2 and abs(fj - ijk[1]) <= 2 and fk == ijk[2] == 2
    assert params["background"] == []
    assert {k: params[k] for k in ("result_extension", "result_dtype", "result_compress", "restore_label_idx")} == {
        "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
    mask = _mask_of(_infer_direct(pacs, url, pacs["ct3"]["series"], params))
    assert mask.sum() > 50 and mask[:, :, 2].sum() == mask.sum()
    labelmap = page.labelmap()
    # the plugin replaces the whole volume (dimension 3) where it is background or this label: here, the mask
    np.testing.assert_array_equal(labelmap, mask.ravel(order="F").astype(np.uint8))
    _drawn(page, before, after, mask > 0, 2, ijk[:2])
    assert not _uncaught(b), _uncaught(b)


def _box_prompt(pacs, viewer, name: str, k: int, three_d: int | None, shot: str | None = None) -> dict:
    """On study ``name`` (open): a box around the reference liver on slice ``k`` with the overlay, 2D
    (``three_d`` None) or 3D (+- ``three_d`` slices); Run. Checks the request and that the labelmap equals what
    the server answers directly for the same prompt, written on the prompted slices only."""
    page, b, url = viewer["page"], viewer["b"], viewer["url"]
    series = pacs[name]["series"]
    page.show_slice(k)
    prior = page.labelmap() if b.js("return !!window.services.segmentationService.getSegmentation('1')") else None
    i0, i1, j0, j1 = _liver_box(name, k)
    page.set_3d(three_d)
    box = page.draw_box((i0, j0), (i1, j1))
    assert {key: box[key] for key in ("i0", "i1", "j0", "j1", "k")} == {"i0": i0, "i1": i1, "j0": j0, "j1": j1,
                                                                        "k": k}, box
    before = b.screenshot(f"{name}-box-{'3d' if three_d else '2d'}")
    doc = _doc_image(page, before, shot) if shot == "ohif-box.png" else None
    got = page.run_box()
    after = b.screenshot(f"{name}-result-{'3d' if three_d else '2d'}")
    if shot == "ohif-result.png":
        doc = _doc_image(page, after, shot)
    req, last = got["request"], got["last"]
    assert req is not None and req["status"] == 200, (req, last)
    assert f"/infer/medsamix?image={series}&output=image" in req["url"]
    params = json.loads(req["form"]["params"])
    depth = b.js("return window.__medsamixOverlay.box && "
                 "window.cornerstone.cache.getVolume(window.__medsamixOverlay.box.volumeId).dimensions[2]")
    k0, k1 = (max(0, k - three_d), min(depth - 1, k + three_d)) if three_d else (k, k)
    assert params == {"roi": [i0, i1, j0, j1, k0, k1], "mode": "3d" if three_d else "2d", "slice": k,
                      "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}, params
    assert last["range"] == [k0, k1] and last["segment"] == LIVER_SEGMENT, last
    mask = _mask_of(_infer_direct(pacs, url, series, params))
    per_slice = (mask > 0).sum(axis=(0, 1))
    assert per_slice[:k0].sum() == 0 and per_slice[k1 + 1:].sum() == 0  # only the prompted slices
    assert mask.sum() > 200, f"the model found nothing in the box: {per_slice}"
    assert last["voxels"] == int((mask[:, :, k0:k1 + 1] > 0).sum()), last  # (the labelmap has one label only)
    labelmap = page.labelmap()
    if prior is None:
        prior = np.zeros_like(labelmap)
    expected = _expected(prior, mask, k0, k1)
    np.testing.assert_array_equal(labelmap, expected)
    new = (expected.reshape(mask.shape, order="F") > 0) & (prior.reshape(mask.shape, order="F") == 0)
    _drawn(page, before, after, new, k, ((i0 + i1) / 2, j0))
    assert "voxels on slices" in page.overlay_text()["text"] and page.overlay_text()["kind"].endswith("ok")
    assert not _uncaught(b), _uncaught(b)
    return {"mask": mask, "params": params, "per_slice": per_slice, "doc": doc}


def test_a_2d_box_prompt_in_the_overlay_displays_the_servers_answer(pacs, viewer):
    _open(viewer, pacs, "ct3")
    out = _box_prompt(pacs, viewer, "ct3", 2, None, "ohif-box.png")
    assert (out["per_slice"] > 0).tolist() == [False, False, True]


def test_a_3d_box_prompt_in_the_overlay_propagates_over_the_slice_range(pacs, viewer):
    _open(viewer, pacs, "ct3")
    out = _box_prompt(pacs, viewer, "ct3", 1, 1, "ohif-result.png")
    assert out["params"]["roi"][4:] == [0, 2]
    assert (out["per_slice"] > 0).sum() >= 2, out["per_slice"]  # propagated beyond the seed slice


def _seg_frames(seg_bytes: bytes, positions: list[list[float]]) -> tuple[dict, np.ndarray]:
    """A DICOM SEG's segments ({number: label}) and its mask on the series' (I, J, K) grid (K by position)."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(seg_bytes))
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    zs = [p[2] for p in positions]
    out = np.zeros((int(ds.Columns), int(ds.Rows), len(zs)), np.uint8)
    for f, fg in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        z = float(fg.PlanePositionSequence[0].ImagePositionPatient[2])
        k = int(np.argmin([abs(z - q) for q in zs]))
        assert abs(zs[k] - z) < 1e-3
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[:, :, k][f.T > 0] = number
    return segments, out


def test_a_submitted_label_reaches_the_pacs_as_dicom_seg_and_the_study_counts_as_labelled(pacs, viewer):
    page, b = viewer["page"], viewer["b"]
    g = _open(viewer, pacs, "ct3")
    labelmap = page.labelmap()
    if not labelmap.any():  # run alone: segment something first
        _box_prompt(pacs, viewer, "ct3", 1, 1)
        labelmap = page.labelmap()
    assert len(pacs["orthanc"].instances_by_modality("SEG")) == 0
    got = page.submit_label()
    req, last = got["request"], got["last"]
    assert req["method"] == "PUT" and req["status"] == 200, (req, last)
    assert f"/datastore/label?image={pacs['ct3']['series']}&tag=final" in req["url"]
    assert req["form"]["label"] == f"file:label.bin:{512 * 512 * 3}"
    assert json.loads(req["form"]["params"]) == {"label_info": [{"name": "liver", "idx": LIVER_SEGMENT}]}
    line = page.overlay_text()
    assert line["text"].startswith("label submitted (liver)") and line["kind"].endswith("ok"), line
    # the PACS holds a DICOM SEG of the series whose voxels are the viewer's labelmap
    segs = pacs["orthanc"].instances_by_modality("SEG")
    assert len(segs) == 1
    tags = pacs["orthanc"].tags(segs[0])
    assert tags["Modality"] == "SEG" and tags["StudyInstanceUID"] == pacs["ct3"]["study"]
    segments, seg_mask = _seg_frames(pacs["orthanc"].file(segs[0]), g["positions"])
    assert segments == {1: "liver"}
    np.testing.assert_array_equal(seg_mask.ravel(order="F"), labelmap)
    # and the datastore counts the study as labelled (its series lists are cached for 1 s in these tests)
    deadline = time.monotonic() + 30
    while (st := _stats(pacs, viewer))["completed"] != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert st["completed"] == 1 and st["total"] == 2, st
    assert not _uncaught(b), _uncaught(b)


def test_a_failing_training_run_shows_the_reason_in_red(pacs, viewer):
    """Train merge on a datastore too small to search: the run fails and the panel shows the trainer's reason (with
    one labelled study the slab split has too few calibration slices; with none, no labelled studies)."""
    page, b = viewer["page"], viewer["b"]
    _open(viewer, pacs, "ct3", connect=False)
    labelled = _stats(pacs, viewer)["completed"]
    assert labelled < 2
    page.overlay_click("medsamix-train")
    lines = page.train_lines(timeout_s=RUN_TIMEOUT_S)
    assert lines[-1]["status"] == "failed", lines
    info = _http(pacs, "GET", f"{viewer['url']}/info/").json()
    st = info["train_stats"]["merge"]
    assert st["status"] == "failed"
    want = ("calibration slices (at least 3 are needed; slab split of the one labelled study" if labelled == 1
            else "no labelled studies")
    assert want in st["message"], st
    assert lines[-1]["text"] == f"failed: {st['message']}" and lines[-1]["kind"].endswith("error"), lines
    assert lines[-1]["color"] == "rgb(255, 107, 107)"  # red
    # polling stops; Train merge is available again
    b.wait_js("!document.getElementById('medsamix-train').disabled && document.getElementById('medsamix-stop')"
              ".disabled", 30, "the Train button enabled again")
    assert not _uncaught(b), _uncaught(b)


def test_a_jpeg2000_ct_series_opens_completely_through_the_proxy(pacs, viewer):
    """20 JPEG 2000 slices: every frame comes through /proxy/dicom/wado as the PACS stores it (the proxy passes the
    viewer's Accept header, Orthanc does not transcode), the viewer decodes them all, and its volume equals the
    series as GDCM (SimpleITK) decodes it, voxel for voxel."""
    import SimpleITK as sitk

    page, b = viewer["page"], viewer["b"]
    assert pacs["j2k"]["syntax"] == "1.2.840.10008.1.2.4.90"
    g = page.open_study(pacs["j2k"]["study"])
    assert g["dimensions"] == [512, 512, 20]
    frames = b.requests("/frames/")
    assert len(frames) == 20 and all("/proxy/dicom/wado/studies/" in r["url"] for r in frames)
    assert len({r["url"] for r in frames}) == 20
    assert all(r["status"] == 200 and "transfer-syntax=1.2.840.10008.1.2.4.90" in (r["contentType"] or "")
               for r in frames), [(r["status"], r["contentType"]) for r in frames]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(pacs["j2k"]["dir"])))
    ref = sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)
    assert ref.shape == (512, 512, 20)
    for ks in (range(0, 7), range(7, 14), range(14, 20)):
        got = page.image_slices(list(ks))
        for k, arr in got.items():
            np.testing.assert_array_equal(arr.astype(np.int32), ref[:, :, k].astype(np.int32),
                                          err_msg=f"slice {k}")
    b.screenshot("j2k-opened")
    assert not _uncaught(b), _uncaught(b)


def test_training_on_two_labelled_studies_shows_its_progress(pacs, viewer):
    """A 3D box on the JPEG 2000 study, submitted: two labelled studies. Train merge: the panel shows the run's
    trials (epoch / total_epochs) as they finish, then the outcome with the best calibration Dice."""
    if not os.path.exists(GDCM_PLUGIN):
        pytest.skip("Orthanc cannot decode JPEG 2000 for the server's DICOMweb datastore without its GDCM plugin "
                    "(Debian: orthanc-gdcm)")
    page, b = viewer["page"], viewer["b"]
    _open(viewer, pacs, "j2k", connect=False)  # the overlay makes segmentation "1" itself
    out = _box_prompt(pacs, viewer, "j2k", 10, 3)
    assert (out["per_slice"] > 0).sum() >= 3, out["per_slice"]
    got = page.submit_label()
    assert got["request"]["status"] == 200, got
    deadline = time.monotonic() + 30
    while (st := _stats(pacs, viewer))["completed"] != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert st["completed"] == 2, st
    page.overlay_click("medsamix-train")
    lines = page.train_lines(timeout_s=480)
    print("\n".join(f"[{x['status']}] {x['text']}" for x in lines))
    assert lines[-1]["status"] == "done", lines
    running = [x for x in lines if x["status"] == "running"]
    trials = [int(m.group(1)) for x in running if (m := re.search(rf"trial (\d+)/{TRIALS}\b", x["text"]))]
    assert trials, lines  # progress while running: trials done / total
    assert trials == sorted(trials)
    st = _http(pacs, "GET", f"{viewer['url']}/info/").json()["train_stats"]["merge"]
    assert st["status"] == "done" and st["epoch"] == TRIALS and st["total_epochs"] == TRIALS, st
    final = lines[-1]
    assert final["text"].startswith(f"done: trial {TRIALS}/{TRIALS}, best calibration Dice "
                                    f"{st['best_metric']:.3f} - {st['message']}"), (final, st)
    assert final["kind"].endswith("ok")
    b.wait_js("!document.getElementById('medsamix-train').disabled", 30, "the Train button enabled again")
    b.screenshot("trained")
    assert not _uncaught(b), _uncaught(b)


def test_the_first_prompt_on_a_series_new_to_the_server_is_answered(viewer):
    """The viewer's first Run on a study the server has not fetched yet (recorded by the ``viewer`` fixture with the
    same request the overlay sends)."""
    assert viewer["first"]["ct3"][0] == 200 and viewer["first"]["j2k"][0] == 200, viewer["first"]
