"""``medsamix-download-checkpoints``: a download lands whole or not at all (the atomic write of :mod:`medsamix.atomic`);
a file whose MD5 does not match the published prefix is refused and leaves nothing behind. Served from a local
``file://`` URL: no network."""

from __future__ import annotations

import hashlib

import torch

from medsamix.cli import download_checkpoints as dl
from medsamix.models.architecture import TINY256


def test_download_is_verified_and_atomic(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src.pth"
    torch.save(TINY256.build().state_dict(), src)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    out = tmp_path / "out"
    monkeypatch.setattr(dl, "SOURCES", {"good": {"file": "good.pth", "url": src.as_uri(), "md5_prefix": md5[:6]},
                                        "bad": {"file": "bad.pth", "url": src.as_uri(), "md5_prefix": "zzzzzz"},
                                        "gone": {"file": "gone.pth", "url": (tmp_path / "nope").as_uri(),
                                                 "md5_prefix": md5[:6]}})
    assert dl.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bad: download failed: MD5 does not start with zzzzzz" in err and "gone: download failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["good.pth"]  # no partial or corrupt file, no temp file
    assert (out / "good.pth").read_bytes() == src.read_bytes()
