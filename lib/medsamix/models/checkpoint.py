"""Loading SAM-family checkpoints in the layouts they are published or trained in.

Recognised layouts (checked in this order):

* ``{"model_state": {...}}`` - torch_em / micro_sam training checkpoints (MedicoSAM), keys usually prefixed ``sam.``;
* ``{"model": {...}}`` - MedSAM and other training-loop checkpoints;
* ``{"state_dict": {...}}`` - Lightning-style checkpoints;
* a plain state dict (official SAM ``sam_vit_b_01ec64.pth``, MedSAM ``medsam_vit_b.pth``).

Inside it, key prefixes ``module.``, ``sam.``, ``model.`` (and combinations such as ``module.sam.``) are removed.
Keys outside SAM's three sub-modules, or inside them but unknown to the architecture (for example RobustSAM's extra
decoder modules), are reported as ``ignored`` and dropped. Missing keys and shape mismatches are errors that name
each parameter. Files are read with ``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from medsamix.models.architecture import VIT_B, ArchSpec, infer_arch, reference_state
from medsamix.atomic import atomic_write
from medsamix.errors import CheckpointError

SAM_SUBMODULES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_PREFIXES = ("module.", "sam.", "model.", "_orig_mod.")
_CONTAINER_KEYS = ("model_state", "model", "state_dict")


@dataclasses.dataclass
class LoadReport:
    """What the loader found in a checkpoint file.

    Attributes:
        path: The file.
        layout: Which container held the weights ("plain", "model", "model_state", "state_dict").
        prefix: The key prefix that was removed ("" if none).
        ignored: Keys that were dropped because the architecture has no such parameter.
        arch: The architecture inferred from the parameter shapes.
    """

    path: Path
    layout: str
    prefix: str
    ignored: list[str]
    arch: ArchSpec

    def summary(self) -> str:
        s = f"{self.path.name}: layout={self.layout}"
        if self.prefix:
            s += f" prefix={self.prefix!r}"
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (" ..." if len(self.ignored) > 5 else "")
            s += f"; ignored {len(self.ignored)} non-SAM keys ({shown})"
        return s


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(m in str(e) for m in ("Unsupported global", "was not an allowed global", "is blocked")):
            reason = "it contains pickled Python objects besides tensors (refused: weights_only loading)"
        elif isinstance(e, EOFError) or "failed finding central directory" in str(e) or "truncat" in str(e).lower():
            reason = f"it is truncated or corrupt ({text})"
        else:
            reason = f"it is not a readable PyTorch checkpoint ({text})"
        raise CheckpointError(f"{path}: cannot load: {reason}") from e


def _unwrap(obj: object, path: Path) -> tuple[str, Mapping[str, object]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a SAM checkpoint: it holds a {type(obj).__name__}, not a state dict")
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            return key, inner
    return "plain", obj


def _strip_prefix(sd: Mapping[str, object]) -> tuple[str, dict[str, object], list[str]]:
    """Find the chain of known prefixes that puts the most keys under SAM's sub-modules.

    Returns ``(prefix, stripped, others)``: the prefix, the entries that carried it (prefix removed) and the keys
    that did not (reported as ignored).
    """
    candidates = {""}
    for k in sd:
        p, rest = "", k
        while pre := next((x for x in _PREFIXES if rest.startswith(x)), None):
            p, rest = p + pre, rest[len(pre):]
            candidates.add(p)

    def hits(p: str) -> int:
        return sum(1 for k in sd if k.startswith(p) and k[len(p):].startswith(SAM_SUBMODULES))

    prefix = max(sorted(candidates, key=len), key=hits)
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    others = [k for k in sd if not k.startswith(prefix)]
    return prefix, stripped, others


def load_sam_checkpoint(
    path: str | os.PathLike[str],
    arch: ArchSpec | None = VIT_B,
) -> tuple[dict[str, Tensor], LoadReport]:
    """Load a SAM-architecture checkpoint as a plain, float32 state dict.

    Args:
        path: The checkpoint file, in any layout listed in the module docstring.
        arch: The architecture the pool expects. ``None`` accepts any plain SAM architecture (inferred from shapes).

    Returns:
        ``(state_dict, report)``: keys exactly those of ``arch.build().state_dict()`` (no prefix), tensors float32
        and contiguous, plus a :class:`LoadReport`.

    Raises:
        CheckpointError: missing/unreadable/corrupt file, not a SAM checkpoint, another architecture (ViT-L/H,
            adapter models), missing parameters or shape mismatches; the message names the file and the keys.
    """
    path = Path(path)
    layout, raw = _unwrap(_read(path), path)
    prefix, sd, others = _strip_prefix(raw)
    sam_keys = [k for k in sd if k.startswith(SAM_SUBMODULES)]
    if not sam_keys:
        sample = ", ".join(list(raw)[:3])
        raise CheckpointError(
            f"{path}: not a SAM checkpoint: no keys under image_encoder./prompt_encoder./mask_decoder. "
            f"(first keys: {sample})"
        )
    non_tensor = [k for k in sam_keys if not isinstance(sd[k], Tensor)]
    if non_tensor:
        raise CheckpointError(f"{path}: entries are not tensors: {non_tensor[:5]}")
    try:
        found = infer_arch({k: sd[k] for k in sam_keys})  # type: ignore[misc]
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if arch is not None and found.shape_key() != arch.shape_key():
        raise CheckpointError(
            f"{path}: architecture mismatch: the file is {found.describe()}, the pool expects {arch.describe()}"
        )
    arch = arch or found
    ref = reference_state(arch)
    missing = [k for k in ref if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} parameters: {', '.join(missing[:8])}")
    bad_shape = [
        f"{k} (file {tuple(sd[k].shape)}, expected {tuple(ref[k].shape)})"  # type: ignore[union-attr]
        for k in ref
        if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)  # type: ignore[union-attr]
    ]
    if bad_shape:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(bad_shape[:8])}")
    ignored = sorted(others + [prefix + k for k in sd if k not in ref])
    out: dict[str, Tensor] = {}
    for k in ref:
        t = sd[k]
        assert isinstance(t, Tensor)
        if not torch.is_floating_point(t):
            raise CheckpointError(f"{path}: parameter {k} has dtype {t.dtype}, expected floating point")
        # always a copy: the file is memory-mapped (torch.load(mmap=True)), and a tensor kept from it would keep the
        # whole file's pages resident (file-backed RSS) for as long as any of its tensors lives
        out[k] = t.to(torch.float32).contiguous().clone()
        if not torch.isfinite(out[k]).all():
            raise CheckpointError(f"{path}: parameter {k} contains NaN or infinite values")
    return out, LoadReport(path=path, layout=layout, prefix=prefix, ignored=ignored, arch=arch)


def save_sam_checkpoint(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write a plain segment_anything state dict atomically (temporary file in the same folder, then rename).

    The result loads with ``sam_model_registry[name](checkpoint=path)`` for official architectures. Tensors are
    cloned so that views into larger buffers do not drag their whole storage into the file.
    """
    atomic_write(path, lambda tmp: torch.save({k: v.detach().clone().contiguous() for k, v in state_dict.items()},
                                              tmp))
