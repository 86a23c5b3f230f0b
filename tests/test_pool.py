"""Tests of ``ModelPool.load``: member order, provenance and the errors of badly assembled pools."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest
import torch
from conftest import TINY, random_state

from medsamix.models.checkpoint import LoadReport
from medsamix.errors import CheckpointError, PoolError
from medsamix.models.pool import ModelPool, PoolMember


def _load(files, **kw):
    base = ("sam", files["sam"])
    models = {a: p for a, p in files.items() if a != "sam"}
    return ModelPool.load(base, models, **kw)


def test_members_order_and_aliases(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=TINY)
    assert pool.arch == TINY
    assert pool.aliases == ["sam", "medsam", "medicosam"]
    assert pool.base.alias == "sam"
    assert [m.alias for m in pool.models] == ["medsam", "medicosam"]
    assert pool.members[0] is pool.base
    assert pool.members[1:] == pool.models
    assert all(isinstance(m, PoolMember) for m in pool.members)


def test_models_as_pairs_keep_their_order(tiny_pool_files):
    f = tiny_pool_files
    pool = ModelPool.load(("sam", f["sam"]), [("medicosam", f["medicosam"]), ("medsam", f["medsam"])], arch=TINY)
    assert pool.aliases == ["sam", "medicosam", "medsam"]
    assert [m.path for m in pool.members] == [f["sam"], f["medicosam"], f["medsam"]]


def test_member_state_dicts_are_the_files(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=TINY)
    for seed, m in enumerate(pool.members):  # the fixture saved random_state(TINY, 0..2) in this order
        expected = random_state(TINY, seed)
        assert list(m.state_dict) == list(expected)
        for k, v in expected.items():
            assert m.state_dict[k].dtype == torch.float32
            assert torch.equal(m.state_dict[k], v), (m.alias, k)
    k = "mask_decoder.iou_token.weight"
    assert not torch.equal(pool.base.state_dict[k], pool.models[0].state_dict[k])


def test_sha256_and_report(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=TINY)
    for m in pool.members:
        path = tiny_pool_files[m.alias]
        assert m.path == path
        assert m.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert isinstance(m.report, LoadReport)
        assert m.report.path == path
        assert (m.report.layout, m.report.prefix, m.report.ignored) == ("plain", "", [])
        assert m.report.arch == TINY
    assert pool.checksums == {a: hashlib.sha256(p.read_bytes()).hexdigest() for a, p in tiny_pool_files.items()}
    assert len(set(pool.checksums.values())) == 3


def test_given_checksums_are_used(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=TINY, checksums={"medsam": "ab" * 32})
    assert pool.checksums["medsam"] == "ab" * 32
    assert pool.checksums["sam"] == hashlib.sha256(tiny_pool_files["sam"].read_bytes()).hexdigest()


def test_members_in_other_layouts(tiny_pool_files, tmp_path):
    sd = random_state(TINY, 1)
    path = tmp_path / "medicosam_torch_em.pt"
    torch.save({"model_state": {"sam." + k: v for k, v in sd.items()}, "optimizer_state": {}}, path)
    pool = ModelPool.load(("sam", tiny_pool_files["sam"]), {"medico": path}, arch=TINY)
    assert pool.models[0].report.layout == "model_state"
    assert pool.models[0].report.prefix == "sam."
    assert all(torch.equal(pool.models[0].state_dict[k], v) for k, v in sd.items())


def test_arch_by_preset_name_is_resolved(tiny_pool_files):
    with pytest.raises(CheckpointError, match=re.escape(str(tiny_pool_files["sam"])) + ".*architecture mismatch"):
        _load(tiny_pool_files, arch="vit_b")


def test_arch_none_infers_from_base(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=None)
    assert pool.arch.shape_key() == TINY.shape_key()
    assert all(m.report.arch.shape_key() == TINY.shape_key() for m in pool.members)


# ---------------------------------------------------------------------------------------------------------- errors


def test_no_fine_tuned_models(tiny_pool_files):
    with pytest.raises(PoolError, match="at least one fine-tuned model"):
        ModelPool.load(("sam", tiny_pool_files["sam"]), {}, arch=TINY)
    with pytest.raises(PoolError, match="at least one fine-tuned model"):
        ModelPool.load(("sam", tiny_pool_files["sam"]), [], arch=TINY)


def test_duplicate_alias_among_models(tiny_pool_files):
    f = tiny_pool_files
    with pytest.raises(PoolError, match="alias 'medsam' is used twice"):
        ModelPool.load(("sam", f["sam"]), [("medsam", f["medsam"]), ("medsam", f["medicosam"])], arch=TINY)


def test_model_alias_equal_to_base_alias(tiny_pool_files):
    f = tiny_pool_files
    with pytest.raises(PoolError, match="alias 'sam' is used twice"):
        ModelPool.load(("sam", f["sam"]), {"sam": f["medsam"]}, arch=TINY)


@pytest.mark.parametrize("alias", ["models/sam.pth", "../sam", "sam.pth", "1sam", "", "a" * 33, "med sam"])
def test_bad_alias(tiny_pool_files, alias):
    f = tiny_pool_files
    with pytest.raises(PoolError, match=r"alias " + re.escape(repr(alias))):
        ModelPool.load(("sam", f["sam"]), {alias: f["medsam"]}, arch=TINY)


def test_bad_base_alias(tiny_pool_files):
    f = tiny_pool_files
    with pytest.raises(PoolError, match=r"alias 'models/sam\.pth'"):
        ModelPool.load(("models/sam.pth", f["sam"]), {"medsam": f["medsam"]}, arch=TINY)


def test_good_alias_edge_cases(tiny_pool_files):
    f = tiny_pool_files
    pool = ModelPool.load(("SAM_base-1", f["sam"]), {"m" * 32: f["medsam"]}, arch=TINY)
    assert pool.aliases == ["SAM_base-1", "m" * 32]


@pytest.fixture
def other_arch_file(tmp_path):
    other = dataclasses.replace(TINY, name="tiny2", encoder_depth=2, encoder_global_attn_indexes=(1,))
    path = tmp_path / "other_arch.pth"
    torch.save(random_state(other, 3), path)
    return path


def test_model_of_another_architecture(tiny_pool_files, other_arch_file):
    f = tiny_pool_files
    with pytest.raises(CheckpointError, match=re.escape(str(other_arch_file)) + ".*architecture mismatch"):
        ModelPool.load(("sam", f["sam"]), {"medsam": f["medsam"], "other": other_arch_file}, arch=TINY)


def test_arch_none_takes_the_base_architecture(tiny_pool_files, other_arch_file):
    """With arch=None the base fixes the architecture: a later model of another one is still refused."""
    f = tiny_pool_files
    with pytest.raises(CheckpointError, match=re.escape(str(other_arch_file)) + ".*architecture mismatch"):
        ModelPool.load(("sam", f["sam"]), {"other": other_arch_file}, arch=None)
    pool = ModelPool.load(("other_base", other_arch_file), {"other_ft": other_arch_file}, arch=None)
    assert pool.arch.encoder_depth == 2
    assert pool.arch.encoder_global_attn_indexes == (1,)


def test_missing_model_file(tiny_pool_files, tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match=re.escape(str(missing)) + ": no such file"):
        ModelPool.load(("sam", tiny_pool_files["sam"]), {"absent": missing}, arch=TINY)


def test_direct_construction_checks_keys(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=TINY)
    m = pool.models[0]
    sd = dict(m.state_dict)
    del sd["mask_decoder.iou_token.weight"]
    broken = dataclasses.replace(m, state_dict=sd)
    with pytest.raises(PoolError, match="keys differ from the base.*mask_decoder.iou_token.weight"):
        ModelPool(arch=TINY, base=pool.base, models=[broken])


def test_each_member_carries_its_preprocessing_style(tiny_pool_files):
    pool = _load(tiny_pool_files, arch=TINY, styles={"medsam": "medsam"})
    assert pool.styles == {"sam": "sam", "medsam": "medsam", "medicosam": "sam"}
    assert pool.member("medsam").style == "medsam"
    assert pool.member("medsam").preprocessor(TINY.img_size).style == "medsam"
    with pytest.raises(PoolError, match="no pool member 'nobody'"):
        pool.member("nobody")
    with pytest.raises(PoolError, match=r"not pool members"):
        _load(tiny_pool_files, arch=TINY, styles={"nobody": "sam"})
    with pytest.raises(PoolError, match="must be one of"):
        _load(tiny_pool_files, arch=TINY, styles={"medsam": "ct"})


def test_one_description_from_a_spec_or_a_manifest(tiny_pool_files, tmp_path):
    """``alias=path,...`` with ``alias=style,...`` and a folder's ``pool.yaml`` give the same description, and the
    loaded pool's members carry its styles."""
    import shutil

    import yaml

    from medsamix.models.pool import PoolManifest

    spec = ",".join(f"{a}={p}" for a, p in tiny_pool_files.items())
    from_spec = PoolManifest.from_spec(spec, "medsam=medsam")
    folder = tmp_path / "pool"
    folder.mkdir()
    members = []
    for alias, path in tiny_pool_files.items():
        shutil.copy(path, folder / f"{alias}.pth")
        style = {"style": "medsam"} if alias == "medsam" else None
        members.append({"alias": alias, "file": f"{alias}.pth", **({"preprocessing": style} if style else {})})
    (folder / "pool.yaml").write_text(yaml.safe_dump({"architecture": "vit_b", "base": members[0],
                                                     "models": members[1:]}))
    from_yaml = PoolManifest.load(folder)
    for manifest in (from_spec, from_yaml):
        assert manifest.aliases == ["sam", "medsam", "medicosam"] and manifest.base == "sam"
        assert manifest.styles == {"sam": "sam", "medsam": "medsam", "medicosam": "sam"}
        assert manifest.preprocessing["medsam"] == {"style": "medsam"}
    assert from_spec.load_pool().styles == from_spec.styles  # the tiny files: architecture inferred
    (folder / "pool.yaml").write_text(yaml.safe_dump({"architecture": "vit_b", "base": members[0], "models": [
        {**members[1], "preprocessing": {"style": "ct"}}]}))
    with pytest.raises(PoolError, match=r"pool.yaml: preprocessing style of 'medsam': must be one of"):
        PoolManifest.load(folder)
