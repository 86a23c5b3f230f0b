"""What defines a search (:class:`SearchSettings`), its initial design and its stages' sizes.

An output directory only continues a search with equal settings (:func:`settings_key`). The initial design
(:func:`initial_configs`) is read from the merge-method registry: each method's uniform baselines, further design
points and single-model points.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from medsamix.errors import MedSAMixError
from medsamix.merging.config import MergeConfig, uniform_merges
from medsamix.merging.merger import Merger
from medsamix.merging.methods import REGISTRY
from medsamix.models.preprocess import CT_WINDOWS, DEFAULT_CT_WINDOW, STYLES, check_style, check_window


class SearchError(MedSAMixError):
    """A search cannot start (bad settings, incompatible output directory)."""


ROBUST_TOLERANCE = 0.01
"""Default :attr:`SearchSettings.robust_tolerance`: a robust search gives up at most this much mean clean
calibration Dice for corrupted Dice (the issue's bound on clean Dice)."""

ROBUST_SE = 1.0
"""Default :attr:`SearchSettings.robust_se`: a robust search leaves its cleanest configuration for a more robust
one only when the corrupted-Dice gain is at least one standard error (the one-standard-error rule)."""

COARSE_TOP = 3
"""How many of the coarse stage's best configurations (full budget, distinct) seed the per-group stage."""


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What defines a search; an output directory only continues a search with equal settings.

    Attributes:
        tasks: Task names; one for MedSAMix-S, several for MedSAMix-M.
        trials: Number of configurations to evaluate in total (initial design included).
        granularity: ViT blocks per encoder group.
        separate: Split encoder groups into attn / mlp / norm.
        methods: Merge methods searched over (default: every registered one, by name).
        seed: SMAC's seed.
        preprocessing: Preprocessing style of the merged model ("sam" / "medsam"); ``None``: searched (the
            hyper-parameter ``prep:style`` over :data:`~medsamix.models.preprocess.STYLES`).
        own_styles: ``(alias, style)`` of each pool model: its own preprocessing, as it is served alone. With a
            searched style each single model enters the initial design with it; the no-regression guard scores
            each single model with it (:func:`medsamix.runs.promotion.single_model_scores`). A model not listed: the
            fixed style, else "sam".
        naive: Reproduce the reference loop for comparison: every trial reloads the checkpoints from disk, builds
            a new merger and re-encodes every calibration slice (no embedding reuse).
        min_budget: Multi-fidelity (single task only): the fewest calibration slices a trial is scored on;
            SMAC's Hyperband raises promising configurations up to all slices. ``None`` = every trial on all
            slices.
        eta: Hyperband's factor between budgets (and the share of configurations promoted, 1/eta). With
            ``min_budget`` <= slices / eta**3 Hyperband has four rungs.
        coarse_share: Share of the trials spent first in a coarse stage (0 = none; see :func:`coarse_trials` for
            the exact number): SMAC over a tied space with one method and hyper-parameters per model component
            (image encoder, prompt encoder, mask decoder), where one move changes a whole component (a task vector
            extrapolated everywhere, the encoder of one model with the decoder of another), which the per-group
            space reaches only through many coordinated moves. The initial design runs there; the per-group stage
            that follows starts from the coarse stage's best configurations (:data:`COARSE_TOP`), so SMAC's local
            search refines them group by group.
        ct_windows: CT windows searched (the hyper-parameter ``prep:window``; :func:`ct_windows_for` gives every
            window of :data:`~medsamix.models.preprocess.CT_WINDOWS` for CT calibration data); ``()``: not searched,
            the default window.
        rounds: The objective: 0 = Dice of box prompts; k > 0 = the interactive protocol, the box then k
            correction clicks (:mod:`medsamix.search.interactive`), a slice's Dice averaged over the k + 1 rounds.
        guard_se: Selection of a single-task search (:mod:`medsamix.search.selection`): the configuration with the
            best calibration Dice is kept over the best single pool model (as served alone) only when its mean
            per-slice gain over that model is at least this many standard errors of the paired gain; otherwise
            the single model is selected. 1.0 is the one-standard-error rule; 0 (the default) selects the plain best
            calibration Dice. The default is 0 because the rule, measured on the shared sets, lost more than it
            gained (``results/search_quality.md``: it changed 2 of 15 TotalSegmentator selections, +0.001 and
            -0.157 test Dice). Multi-task searches (MedSAMix-M) select the Pareto member with the best mean.
        robust_tolerance: Selection of a robust search (MedSAMix-M ``--robust``: every task and its corrupted twin
            as objectives; :mod:`medsamix.search.selection`): the configuration with the best mean corrupted
            calibration Dice among those whose mean clean calibration Dice is within this much of the best mean
            clean calibration Dice of the search. The issue's trade-off: clean Dice kept within 0.01, corrupted
            Dice as high as it goes.
        robust_se: The same selection guarded against the winner's curse: the configuration with the best mean
            clean calibration Dice is left for the one above only when that one's corrupted calibration Dice gain
            over it (per task, paired on the same slices) is at least this many standard errors of the gain
            (:func:`~medsamix.search.selection.robust_selection`); 0: the plain rule above.
    """

    tasks: tuple[str, ...]
    trials: int = 120
    granularity: int = 2
    separate: bool = False
    methods: tuple[str, ...] = dataclasses.field(default_factory=lambda: tuple(sorted(REGISTRY)))
    seed: int = 0
    preprocessing: str | None = None
    own_styles: tuple[tuple[str, str], ...] = ()
    naive: bool = False
    min_budget: int | None = None
    eta: int = 3
    coarse_share: float = 1 / 3
    rounds: int = 0
    ct_windows: tuple[str, ...] = ()
    guard_se: float = 0.0
    robust_tolerance: float = ROBUST_TOLERANCE
    robust_se: float = ROBUST_SE

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise SearchError(f"rounds must be >= 0, got {self.rounds}")
        if not self.guard_se >= 0:
            raise SearchError(f"guard_se must be >= 0, got {self.guard_se}")
        if not self.robust_se >= 0:
            raise SearchError(f"robust_se must be >= 0, got {self.robust_se}")
        if not 0 <= self.robust_tolerance <= 1:
            raise SearchError(f"robust_tolerance must lie in [0, 1], got {self.robust_tolerance}")
        for w in self.ct_windows:
            check_window(w, "ct_windows", SearchError)
        for s in (self.preprocessing, *(st for _, st in self.own_styles)):
            if s is not None:
                check_style(s, "preprocessing styles", SearchError)

    @property
    def multi(self) -> bool:
        return len(self.tasks) > 1

    @property
    def searched_styles(self) -> tuple[str, ...]:
        """The styles the search chooses among: every style when ``preprocessing`` is ``None``, else none."""
        return STYLES if self.preprocessing is None else ()

    def own_style(self, alias: str) -> str:
        """The style ``alias`` is served with on its own: ``own_styles``, else the fixed style, else "sam"."""
        return dict(self.own_styles).get(alias) or self.preprocessing or STYLES[0]

    def design_style(self, alias: str) -> str:
        """The style of single model ``alias`` in the initial design (the base model's: of the uniform merges too):
        the fixed style, else its own."""
        return self.preprocessing or self.own_style(alias)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.rounds:  # box objective: the settings (and run keys) of searches before the interactive one
            del d["rounds"]
        if not self.ct_windows:  # likewise searches without a CT window
            del d["ct_windows"]
        if not self.guard_se:  # the selection rule changes no trial: searches from before it resume
            del d["guard_se"]
        if self.robust_tolerance == ROBUST_TOLERANCE:  # likewise
            del d["robust_tolerance"]
        if self.robust_se == ROBUST_SE:  # likewise
            del d["robust_se"]
        return d


def initial_configs(merger: Merger, settings: SearchSettings) -> list[MergeConfig]:
    """The initial design, read from the method registry (:class:`~medsamix.merging.methods.MergeMethod`) for
    the methods of ``settings``: the uniform merges and each method's further ``design`` points (with the base
    model's style), then every single pool model once, as the ``single`` point of the first method that expresses
    it, then each method's ``beyond`` points, with the model's style (:meth:`SearchSettings.design_style`: its own
    unless the settings fix one), as merge configurations.

    A single model is a one-hot linear merge (weight 1 on it, 0 on the others; bit-identical to the model). As a
    point of the continuous weight space it has continuous neighbours, so SMAC's local search around a strong single
    model proposes small moves away from it rather than only jumps to other methods (as ``pick`` would). It enters
    once: another method's bit-identical point (one-hot task arithmetic at scale 1) would only score the same model
    again. Each fine-tuned model then enters extrapolated along its own task vector (one-hot task arithmetic at
    scale :data:`~medsamix.merging.methods.EXTRAPOLATION`): its neighbours include the model itself (scale 1),
    moves further past it, which linear weights cannot express, and the addition of a little of another model's
    task vector."""
    g, sep, groups, aliases = settings.granularity, settings.separate, merger.groups, merger.aliases
    base_style = settings.design_style(aliases[0])
    methods = [m for m in REGISTRY.values() if m.name in settings.methods]
    configs = [c for c in uniform_merges(groups, aliases, g, sep, base_style).values()
               if next(iter(c.groups.values())).method in settings.methods]
    configs += [MergeConfig.uniform(groups, m.name, p, g, sep, base_style) for m in methods for p in m.design]
    window = _design_window(settings)
    return ([c.with_ct_window(window) for c in configs] + [c for _, c in _single_points(merger, settings)]
            + [c for _, c in _single_points(merger, settings, beyond=True)])


def single_configs(merger: Merger, settings: SearchSettings) -> dict[str, list[MergeConfig]]:
    """Alias -> the initial-design point that is pool model ``alias`` itself (the ``single`` point of the first
    method expressing it, bit-identical to the model, with :meth:`SearchSettings.design_style`; an empty list for a
    model no searched method expresses)."""
    out: dict[str, list[MergeConfig]] = {a: [] for a in merger.aliases}
    for alias, config in _single_points(merger, settings):
        out[alias].append(config)
    return out


def _single_points(merger: Merger, settings: SearchSettings, beyond: bool = False) -> list[tuple[str, MergeConfig]]:
    """``(alias, config)`` of the initial design's single-model points, one per model (the first method's that
    expresses it), or with ``beyond`` every point past a single model; in design order (method, then alias)."""
    g, sep, groups, aliases = settings.granularity, settings.separate, merger.groups, merger.aliases
    window = _design_window(settings)
    out: list[tuple[str, MergeConfig]] = []
    for m in REGISTRY.values():
        point = m.beyond if beyond else m.single
        if m.name not in settings.methods or point is None:
            continue
        for a in aliases:
            p = point(a, aliases)
            if p is not None and (beyond or all(a != b for b, _ in out)):
                out.append((a, MergeConfig.uniform(groups, m.name, p, g, sep, settings.design_style(a))
                            .with_ct_window(window)))
    return out


def _design_window(settings: SearchSettings) -> str | None:
    """The CT window of the initial design: the default when the window is searched (as SMAC returns it)."""
    return DEFAULT_CT_WINDOW if settings.ct_windows else None


def ct_windows_for(samples: Sequence[Any]) -> tuple[str, ...]:
    """The CT windows a search over ``samples`` (slice samples) chooses among: every window of
    :data:`~medsamix.models.preprocess.CT_WINDOWS` when some slice carries HU values (CT), else none."""
    return tuple(CT_WINDOWS) if any(getattr(s, "hu", None) is not None for s in samples) else ()


def coarse_trials(trials: int, share: float, n_initial: int) -> int:
    """Trials of the coarse stage: ``round(share * trials)``, at least the initial design (``n_initial``, which
    runs there) and leaving at least :data:`COARSE_TOP` to the per-group stage; 0 (no coarse stage) when ``share``
    is 0 or the trials are too few for both."""
    if share <= 0:
        return 0
    n = min(max(n_initial, round(share * trials)), trials - COARSE_TOP)
    return n if n >= n_initial else 0


def settings_key(settings: SearchSettings, context: dict[str, Any]) -> str:
    """Hash of the settings and further facts (pool checksums, calibration ids ...): equal keys may resume."""
    payload = json.dumps({"settings": settings.to_dict(), "context": context}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def budget_problem(min_budget: int | None, n_tasks: int, n_slices: int,
                   where: str = "the calibration set", robust: bool = False) -> str | None:
    """Why ``min_budget`` (multi-fidelity) cannot be used with ``n_tasks`` tasks (objectives), the corrupted-Dice
    objective (``robust``) and ``n_slices`` calibration slices (``where`` names them in the message), or ``None``
    when it can (or is ``None``, off).

    The one statement of the rule, called by the run plan, the CLI and the search itself: multi-fidelity needs one
    objective, and at least one slice fewer than all.
    """
    if min_budget is None:
        return None
    if n_tasks > 1:
        return (f"min_budget (multi-fidelity) works with one task only (single-task searches); {n_tasks} tasks "
                "were asked for")
    if robust:
        return ("min_budget (multi-fidelity) works with one objective only; robust adds the corrupted Dice as a "
                "second one")
    if not 1 <= min_budget < n_slices:
        return f"min_budget must lie in [1, {n_slices}): {where} has {n_slices} calibration slices, got {min_budget}"
    return None
