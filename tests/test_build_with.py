"""Models made from existing tensors (no copy): ``ArchSpec.build_with``, the merger's module, the served models."""

from __future__ import annotations

import torch

from conftest import TINY, random_state
from medsamix import MergeConfig, Merger, ModelPool
from medsamix.merging.config import uniform_merges
from medsamix.serving.sources import MergedModelSource, PoolLoader


def test_build_with_shares_the_tensors_and_equals_a_loaded_model():
    sd = random_state(TINY, 0)
    shared = TINY.build_with(sd)
    loaded = TINY.build()
    loaded.load_state_dict(sd)
    got = shared.state_dict()
    for k, v in sd.items():
        assert got[k].data_ptr() == v.data_ptr(), k
    assert torch.equal(shared.pixel_mean, loaded.pixel_mean) and torch.equal(shared.pixel_std, loaded.pixel_std)
    assert not shared.training and not any(p.requires_grad for p in shared.parameters())
    image = torch.rand(1, 3, TINY.img_size, TINY.img_size) * 255
    with torch.no_grad():
        assert torch.equal(shared.image_encoder(shared.preprocess(image)), loaded.image_encoder(loaded.preprocess(image)))


def test_merger_module_parameters_are_its_outputs(tiny_pool_files):
    pool = ModelPool.load(("sam", tiny_pool_files["sam"]), {"medsam": tiny_pool_files["medsam"]}, arch=TINY)
    merger = Merger(pool)
    model = merger.apply(MergeConfig.uniform(merger.groups, "pick", {"source": "medsam"}))
    outs = {out.data_ptr() for state in merger._state.values() for _, out in state.tensors}
    assert all(p.data_ptr() in outs for p in model.parameters())
    want = random_state(TINY, 1)
    for k, v in model.state_dict().items():
        if k != "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":  # a buffer: the base's
            assert torch.equal(v, want[k]), k


def test_served_models_hold_no_copy_of_the_weights(tiny_pool_files, tmp_path):
    spec = ",".join(f"{a}={p}" for a, p in tiny_pool_files.items())
    loader = PoolLoader(models=spec)
    uniform = MergedModelSource(loader, tmp_path / "published").get()
    pool = loader.load()
    # the uniform linear merge, as an independent merger computes it
    other = ModelPool.load(*[(a, p) for a, p in tiny_pool_files.items()][:1], list(tiny_pool_files.items())[1:],
                           arch=TINY)
    reference = Merger(other)
    expected = reference.apply(uniform_merges(reference.groups, other.aliases)["linear"]).state_dict()
    for k, v in uniform.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # a pool member's served model is the pool's own tensors
    member = loader.member("medsam")
    for k, v in member.model.state_dict().items():
        assert v.data_ptr() == pool.member("medsam").state_dict[k].data_ptr(), k
