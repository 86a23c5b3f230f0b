"""Materialising merge configurations into one resident SAM model, in place.

The :class:`Merger` lays every parameter out once, flattened, as base ``(n,)`` and models ``(K, n)`` (task vectors
``models - base`` are computed per tensor during a merge, never stored), and owns a single ``Sam`` module whose parameters are views of flat ``(n,)`` output tensors. Applying a configuration writes each merged tensor
straight into the module's parameter storage: no checkpoint is re-read, nothing is written to disk, no new module
is built and no full-size temporary is allocated. Groups whose setting did not change since the last application
are skipped, so a configuration that only touches the mask decoder costs only the decoder.

Memory: ``(K + 2) x`` the model size (sources and the merged model) plus at most ``memo_bytes`` of per-element
memos (DARE's random fields, TIES' sorted magnitudes: ``K x`` the tensor each, kept while the cap has room;
:class:`~medsamix.merging.memo.MemoCache`), a few numbers per tensor for TIES and SLERP (always kept), and one
parameter tensor's temporaries during a merge. The pool's state dicts become views into the stacks (no copy). The
default cap is 0: a DARE merge then draws its fields again from their seeded generators and TIES selects its
thresholds with one pass over each tensor, which costs time (``scripts/bench_merge.py`` prints both) but no memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from medsamix.merging.config import MergeConfig
from medsamix.errors import ConfigError
from medsamix.merging.groups import Group, encoder_groups, group_parameters
from medsamix.merging.memo import MemoCache
from medsamix.merging.methods import REGISTRY, Sources, get_method
from medsamix.models.pool import ModelPool

log = logging.getLogger(__name__)


class MergeError(RuntimeError):
    """A configuration produced non-finite weights."""


@dataclasses.dataclass
class _GroupState:
    group: Group
    tensors: list[tuple[Sources, Tensor]]  # per parameter: its sources and the (n,) storage of the module's parameter
    applied: str | None = None  # canonical form of the setting now in the parameters


class Merger:
    """Keeps a pool resident and materialises configurations into one ``Sam`` module.

    Args:
        pool: The model pool. Its state dicts are re-pointed into the merger's stacks (on a CPU: no copy stays).
        granularity: ViT blocks per encoder group (1-4).
        separate: Split encoder groups into attn / mlp / norm.
        device: Where buffers and the model live.
        memo_bytes: Cap in bytes of the memoised per-element quantities (DARE's fields, TIES' sorted magnitudes;
            ``None``: no cap, up to 2 K x the model size once both were used on every group; 0: none kept).
    """

    def __init__(self, pool: ModelPool, granularity: int = 1, separate: bool = False,
                 device: str | torch.device = "cpu", memo_bytes: int | None = 0) -> None:
        self.pool = pool
        self.aliases = pool.aliases
        self.granularity = granularity
        self.separate = separate
        self.device = torch.device(device)
        self.memo = MemoCache(memo_bytes)
        with torch.device("meta"):  # names and shapes only: the model is made from the output tensors below
            named = dict(pool.arch.build().named_parameters())
        self.groups: list[Group] = group_parameters(named, granularity, separate)
        self._state: dict[str, _GroupState] = {}
        state: dict[str, Tensor] = {}
        with torch.no_grad():
            for g in self.groups:
                tensors = []
                for n in g.params:
                    shape = named[n].shape
                    base = pool.base.state_dict[n].reshape(-1).to(self.device, copy=True)
                    models = torch.stack([m.state_dict[n].reshape(-1) for m in pool.models]).to(self.device)
                    if self.device.type == "cpu":  # the pool's copies become views of the merger's tensors
                        pool.base.state_dict[n] = base.view(shape)
                        for i, m in enumerate(pool.models):
                            m.state_dict[n] = models[i].view(shape)
                    out = base.clone()
                    state[n] = out.view(shape)
                    tensors.append((Sources(base=base, models=models, key=n, cache=self.memo), out))
                self._state[g.name] = _GroupState(g, tensors)
        for name, value in pool.base.state_dict.items():  # persistent buffers (the prompt encoder's Fourier matrix)
            if name not in state:
                state[name] = value.to(self.device)
        # the module's parameters are views of the (n,) outputs: a merge writes straight into them
        self.model: nn.Module = pool.arch.build_with(state)

    @property
    def encoder_group_names(self) -> list[str]:
        return [g.name for g in encoder_groups(self.groups)]

    def encoder_fingerprint(self, config: MergeConfig) -> str:
        """Fingerprint of the image-encoder part of a configuration (equal => equal image embeddings)."""
        return config.fingerprint(self.encoder_group_names)

    def apply(self, config: MergeConfig, check_finite: bool = False) -> nn.Module:
        """Write the merged weights of ``config`` into :attr:`model` and return it.

        The whole configuration is validated before anything is written. Unchanged groups are skipped.

        Raises:
            ConfigError: the configuration does not fit this merger's grouping or pool.
            MergeError: ``check_finite`` and some merged weight is NaN or infinite.
        """
        if config.granularity != self.granularity or config.separate != self.separate:
            raise ConfigError(
                f"configuration has granularity={config.granularity} separate={config.separate}, the merger "
                f"was built for granularity={self.granularity} separate={self.separate}"
            )
        resolved = config.validate(self.groups, self.aliases)
        with torch.no_grad():
            for name, (method_name, params) in resolved.items():
                state = self._state[name]
                key = config.groups[name].canonical()
                if state.applied == key:
                    continue
                state.applied = None
                fn = get_method(method_name).fn
                for src, out in state.tensors:
                    fn(src, params, out)
                if check_finite and not all(bool(torch.isfinite(out).all()) for _, out in state.tensors):
                    raise MergeError(f"group {name}: {method_name} {dict(config.groups[name].params)} "
                                     "produced non-finite weights")
                state.applied = key
        return self.model

    def prepare(self, methods: Iterable[str] | None = None, seed: int = 0) -> None:
        """Compute the memoised per-method quantities for every group now rather than on first use (those the
        memo's cap has room for; with a cap of 0 only the small ones, e.g. SLERP's coefficients).

        Args:
            methods: Method names (default: every registered method with a ``warmup``; the others are skipped).
            seed: Replaces the ``seed`` of a warm-up (DARE's drop mask is memoised per seed).
        """
        names = list(REGISTRY) if methods is None else list(methods)
        with torch.no_grad():
            for name in names:
                method = get_method(name)
                if method.warmup is None:
                    continue
                probe = dict(method.warmup)
                if "seed" in probe:
                    probe["seed"] = seed
                for state in self._state.values():
                    for src, _ in state.tensors:
                        method.fn(src, probe, None)

    def state_dict(self) -> dict[str, Tensor]:
        """The merged model's state dict (the live parameters: clone before keeping)."""
        return dict(self.model.state_dict())

    def group_settings(self, names: Sequence[str] | None = None) -> dict[str, str | None]:
        """Canonical setting currently materialised in each group (``None`` = not yet applied)."""
        return {n: self._state[n].applied for n in (names or self._state)}
