"""The adaptive sampler's policy: AIMD on an integer sampling rate, a rate cap, and
the downstream's capacity learned from back-pressure. Pure: no trio, no clock read.

Representation
--------------
The policy's output is the *sampling rate* ``N`` — keep 1 event in ``N`` — an
integer in ``[min_sample_rate, max_sample_rate]`` (default ``[1, 1000]``), because
the kernel's sampling gate takes integers; the keep fraction is ``1/N``. ``N``
counts relative to the events the kernel saw: an event that reaches user space
with weight ``w`` (the kernel gate kept it 1 in ``w``) is already reduced ``w``-fold.

Fractional rates. Where a cap or the learned capacity sets ``N`` (``cap``,
``learned`` below), whole numbers cost up to a step: at ``r = 10·C``, 1 in 11 sends
``0.91·C`` and 1 in 12 ``0.83·C``. So the policy also keeps
:attr:`SamplingPolicy.exact_rate` ``x``: the largest of the rules' unrounded values of
the last adjustment — ``aimd`` (whole; where it is above both limits), ``r /
(h'·C)`` for the cap ``C``, ``r / (h'·C_L)`` for the learned capacity — clamped into
``[N - 1, N]`` (and ``≥ 1``); so ``x = N`` wherever AIMD or ``min_sample_rate`` sets
``N``, and where a limit sets it, ``x`` sends at most ``h'`` of that limit. (A value
below ``N - 1``, where the cap's hysteresis holds ``N`` a step high, is clamped to
``N - 1``, not to ``N``: 1 in ``N`` would send as little as ``0.83·C``.) The sampler samples at ``x``: a
kernel gate takes :attr:`SamplingPolicy.gate_rate` ``= ⌊x⌋`` and user space the
rest, ``⌊x⌋ / x`` of what arrives. ``N`` alone still drives every rule, report and
guarantee below; ``x ≤ N`` only ever sends more, up to ``h'·C_L``.

Inputs and timing
-----------------
The shell calls :meth:`SamplingPolicy.observe` with what it sees, as often as it
likes; every count is summed over the adjustment period:

* ``fill`` — of the channel downstream (0..1), and ``lag_s`` — now minus read time;
* ``weighted_events`` — the weighted events that arrived. Each stands for its
  weight's worth of kernel events, so kernel-sampled-out events are counted; with
  ``weighted_span_s``, the time those events were gathered over (a batch read at
  ``t`` holds what came since the read before, at ``t'``: it spans ``t - t'``);
* ``lost_upstream`` — the weight of events lost before they could arrive, for want
  of room (ring-buffer records drained or lost on reserve). They were offered too:
  the input rate ``r = (weighted_events + lost_upstream) / elapsed`` is what would
  arrive if the pipeline kept up. In a period without losses and with a span it is
  ``weighted_events / weighted_span_s``: whole batches over exactly the time they
  gathered, where over the period one that catches 8 batches rather than 7 of a
  source read 14 times a second would read 14 % more. A source that blocks under back-pressure instead
  loses nothing and is undercounted while blocked; the rules below allow for that.
* ``sent_events`` — events sent downstream; ``consumed_events``/``consumed_batches``
  — events and batches the consumer took off the channel. Counted, not weighted: a
  consumer's cost is per event it handles, whatever the event stands for.
* ``full_waits`` — times the sender found the channel full and waited for room
  (``pipeline.EdgeStatistics.full_waits``). A channel of a few small batches is full
  for moments only, its mean fill low, yet each such moment held the sender, and a
  source that blocks behind it, back.

``r`` is *complete* in a period in which the source reported losses, or in which
nothing held it back (not pressured, no full wait). In any other period the rules act
on ``max(r, r of the last complete period)``: a blocked source is undercounted while
it is held back, not before.

and :meth:`SamplingPolicy.tick` with the current time. A tick at or after
:attr:`SamplingPolicy.due_at` (``adjust_period_s`` after the previous adjustment) runs one
adjustment on the period's *mean* fill and *mean* lag (no samples counts as an
idle, unpressured period), its input rate and its flows; earlier ticks do nothing.

One adjustment
--------------
A period is *pressured* when fill ≥ ``high_fill`` or lag ≥ ``high_lag_s``
(``high_lag_s = 0`` ignores lag), *relieved* when fill ≤ ``low_fill`` and lag ≤
``low_lag_s``, and otherwise holds. With ``h = 1 - cap_hysteresis``:
``N = clamp(max(aimd, cap, learned), min_sample_rate, max_sample_rate)``.

* ``learned`` — the consumer's capacity ``C_L``, measured. A period is
  *downstream-bound* when fill ≥ ``high_fill``, or fill > ``low_fill`` and the backlog
  grew by more than a batch, or a probe (below) met a full channel: the consumer was
  the bottleneck, so what it took is what it can take. The last (up to
  :data:`CAPACITY_WINDOW_PERIODS`) consecutive bound periods in which it took
  something *measure* ``C_L`` = consumed events / time (the events it finished between
  two of its takes over the time between them, when the shell reports those: a
  period's count is off by up to a batch), once they hold
  :data:`MIN_CAPACITY_BATCHES` batches; a measurement sets ``learned ← ⌈r /
  (h'·C_L)⌉`` with ``h' = 1 - cap_hysteresis/2``: the rate that fits with half the
  hysteresis as headroom, so a backlog drains and the consumer is kept busy:
  ``D ≥ h'·C_L·r / (r + h'·C_L)``, ``0.87·C_L`` at ``r = 10·C_L`` and ``0.9·C_L``
  from ``r = 18·C_L`` (the top of the band left it up to 19 % idle). Otherwise
  ``learned`` stays in ``[⌈r / C_L⌉, ⌈r / (h'·C_L)⌉]`` and, when it must move, moves
  to ``⌈r / (h'·C_L)⌉``: it rises only once ``N`` would send more than ``C_L``, and
  falls as soon as the exact rate ``r / (h'·C_L)`` would leave ``(N - 1, N]``, so that
  rate is sent exactly while ``C_L`` grows (no whole ``N`` pins it, sending less, then
  lets it jump by a step).
  *Probing*: after a measurement, ``capacity_hold_periods`` relieved periods pass
  (the *hold*), then each relieved period in which the backlog is at most a batch and
  the channel was never full grows ``C_L`` by ``capacity_growth``, but not past
  ``max_events_per_sec`` if a cap is set (there ``learned`` sends ``h'`` of the cap, as
  the cap's own rule does: beyond it the cap limits what is sent, and probing would only
  overrun a consumer no faster than the cap). Sending more than the consumer takes
  fills the channel: the first period in which the sender waited for room while ``C_L``
  stands above its last measurement is bound, and measures it again. (The mean fill
  would take a period or more to cross a watermark, holding the source back meanwhile.)
  The first measurement of a bound episode (bound periods in a row: a probe's) within
  :data:`CAPACITY_TOLERANCE` of the last doubles the next hold (up to
  :data:`MAX_HOLD_FACTOR` times); later ones of the same episode leave it as it is, and
  one that differs resets it. ``C_L`` is forgotten
  after ``capacity_hold_periods`` relieved periods in a row in which ``learned`` did
  not hold ``N`` up (e.g. at ``N = min_sample_rate``).
* ``aimd`` — pressured: ``aimd ← max(N + 1, ⌈N / decrease_factor⌉)``, except that it
  only keeps up with ``N`` when the channel, full, holds fewer batches than at the last
  adjustment (``N`` relieves it already), or when the period measured ``C_L``, ``r``
  is complete — the source reported losses, or the period before was complete (then
  ``r`` is taken as at least that period's) — and the lag is below ``high_lag_s``:
  ``learned`` makes the jump. So it doubles for a stalled consumer, lag alone, a source
  held back by the pressure, and a backlog upstream (``learned`` sends what the
  consumer takes, so events already queued before the sampler would never catch up). Before any
  period was complete (a source blocked from the start) a channel holding fewer batches
  is no relief either: what arrives says nothing of what is offered, and ``N`` doubles.
  Relieved: the keep fraction rises additively, ``aimd ← ⌊1 / (1/aimd +
  increase_step)⌋``, once per whole period elapsed. Otherwise it holds. Then, in an
  unpressured period with ``C_L`` known in which the backlog did not grow by more than
  a batch, ``aimd ← min(aimd, learned)``: ``r`` is complete, or taken from the last
  complete period, and ``learned`` fits the consumer, so what the doubling overshot while
  a blocked source hid ``r`` goes at once, not relief by relief once the backlog has
  drained.
* ``cap`` — with ``C = max_events_per_sec > 0``: ``cap ← clamp(cap, ⌈r / C⌉,
  ⌈r / (h·C)⌉)``. It rises at once to meet the cap and falls only as far as leaves
  ``cap_hysteresis`` headroom, so an input rate near a boundary does not make ``N`` flap.

Guarantees (``tests/property/test_sampler_policy.py`` checks each)
------------------------------------------------------------------
Numbers at defaults: period 0.5 s, ``decrease_factor`` 0.5, ``increase_step`` 0.05,
``cap_hysteresis`` 0.1, ``capacity_growth`` 0.02, ``capacity_hold_periods`` 20.

* **Bounds.** ``min_sample_rate ≤ N ≤ max_sample_rate`` after any inputs.
* **Falls under pressure.** A pressured period never lowers ``N``, and raises it by at
  least 1 (until the upper bound) unless the channel drains or the period measured the
  capacity. With a stalled consumer, or from lag alone, ``N`` doubles each period and
  reaches the bound from any ``N`` within ``⌈log(max_sample_rate) / log(1 /
  decrease_factor)⌉`` periods (10). A period that measures ``C_L`` with a complete
  ``r`` sets ``N ≥ ⌈r / (h'·C_L)⌉`` at once.
* **Recovers.** Once fill and lag are at or below the low watermarks and ``r ≤ h·C``
  for ``C = min(max_events_per_sec, C_L)`` (those set; or neither), ``N`` is back to
  ``min_sample_rate`` within ``⌈0.5 / increase_step⌉ + 1`` periods (11: 5.5 s) from
  any ``N``: each relief period raises the keep fraction by at least
  ``increase_step``, ``N`` is 1 once it passes 1/2, and ``C_L`` only grows meanwhile.
* **Converges to the cap.** With no pressure, no capacity learned (and
  ``min_sample_rate = 1``), at most 2 periods after a step change to a steady input
  rate ``r`` (the first *whole* period after the step measures ``r`` exactly), the
  expected delivered rate ``D = r / N`` satisfies ``D ≤ C`` and ``D ≥ h·C·r / (r + h·C)``:
  integer ``N`` and the hysteresis cost at most that much. That is ``D ≥ 0.81·C`` for
  ``r ≥ 10·C``, and ``N = 1`` for ``r ≤ 0.9·C``. When ``r > C · max_sample_rate`` the
  bound wins (``N = max_sample_rate``). Pressure can only make ``D`` lower.
* **Converges to a learned capacity.** Offer ``r`` with ``10·C ≤ r ≤ 800·C`` to a
  consumer of capacity ``C`` behind a channel of up to two periods' worth (in batches
  of at most a ninth of a period's worth), from ``N = 1`` or any ``N`` pressure left,
  with a source that reports its losses or one that blocks: within 20 periods (10 s)
  ``N`` settles in ``[⌈r/C⌉, ⌈r/(h·C)⌉]`` — ``N`` at most 22 % above ``r/C``; at whole
  ``N`` the delivered ``D ∈ [0.81·C, C]``, at the exact rate ``D ∈ [0.9·C, C]``
  (``h'·C`` when ``C`` is measured exactly) — and does not move for
  ``capacity_hold_periods`` (10 s).
  (While a blocking source hides ``r`` the doubling may overshoot the band up to
  twice; ``min(aimd, learned)`` brings ``N`` back in the first unpressured period.)
  After that it only moves to probe: a probe sends at most ``1.1·C``
  (``N ≥ ⌊r / (1.1·C)⌋``), ends in the period its channel first fills (the channel
  never holds the source back two periods in a row), returns to the band, and makes at most
  ``⌈log(1.1/h) / log(1 + capacity_growth)⌉ + 2`` changes (13); probes back off to
  one per ``MAX_HOLD_FACTOR · capacity_hold_periods`` relieved periods (80 s). No
  limit cycle.
* **Finds more capacity.** When the consumer becomes ``k`` times faster, ``N`` is
  down to ``⌈r / (h·k·C)⌉`` within ``MAX_HOLD_FACTOR · capacity_hold_periods +
  ⌈log k / log(1 + capacity_growth)⌉ + 3`` periods (``k = 2``: 199 periods, 100 s,
  at most; 59 periods after a measurement that reset the hold).
* **Hard cap.** With ``C = max_events_per_sec > 0`` the stage passes what ``N`` keeps
  through a :class:`RateCapBucket` of ``C`` tokens a second and a burst of ``B =
  max(1, C·adjust_period_s)``, full at the start: over any interval ``Δt``, from the
  first event on, at most ``B + C·Δt + 1`` events are delivered (at ``C = 1/s``: 2 in
  the first period). Each event passes it with a known probability ``q`` and the kept
  ones' weights are divided by ``q``, so weighted totals stay unbiased. ``N`` keeps the
  mean under ``C`` once set, so the bucket stays full and trims nothing but bursts.
* **Reports once.** :meth:`~SamplingPolicy.tick` returns a :class:`RateChange`
  exactly when ``N`` changes, else ``None``; the shell logs each change once.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "CAPACITY_TOLERANCE",
    "CAPACITY_WINDOW_PERIODS",
    "MAX_HOLD_FACTOR",
    "MIN_CAPACITY_BATCHES",
    "ChangeReason",
    "DownstreamCapacity",
    "RateCapBucket",
    "RateChange",
    "SamplingParams",
    "SamplingPolicy",
]

MIN_CAPACITY_BATCHES = 8
"""Batches the consumer must have taken in the measuring window for its rate to count as
a capacity measurement: a window catches whole batches, so with fewer the error (up to
one batch) would be more than an eighth."""

CAPACITY_WINDOW_PERIODS = 2
"""The most recent downstream-bound periods a measurement spans (1 s at defaults): enough
batches for a slow consumer, recent enough to follow a drop."""

MAX_HOLD_FACTOR = 8
"""Each bound episode (a probe's) whose first capacity measurement agrees with the last
doubles the hold, up to this many times ``capacity_hold_periods``; one that differs
resets it."""

CAPACITY_TOLERANCE = 0.2
"""Measurements within this fraction of the last one agree. A consumer's rate varies about
this much with the load on the CPU it shares with the pipeline."""


Rate = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The policy's knobs: the one definition of each, with its default and bounds.

    The sampler stage's config *is* this struct (plus a seed), so a TOML table
    decodes straight into it; decoding checks each field's bounds with its key
    path, and ``__post_init__`` checks the relations between fields (also when
    built directly, which skips the per-field bounds)."""

    min_sample_rate: Rate = 1
    """Always keep at most 1 event in this many (1 = sample only under pressure); N starts here."""
    max_sample_rate: Rate = 1000
    """Never keep fewer than 1 event in this many, however bad the pressure."""
    adjust_period_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    """How often the rate is reconsidered."""
    high_fill: Fraction = 0.75
    """Mean fill of the downstream channel at or above which the keep fraction falls."""
    low_fill: Fraction = 0.25
    """Mean fill at or below which (with low lag) the keep fraction recovers."""
    high_lag_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Mean lag (now - read time) at or above which the keep fraction falls; 0 ignores lag."""
    low_lag_s: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    decrease_factor: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    """Keep-fraction multiplier per pressured period (0.5: halve)."""
    increase_step: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    """Keep fraction added per period of relief (0.05: N=1000 back to 1 within 11 periods)."""
    max_events_per_sec: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Cap on the delivered (post-sampling) event rate; 0 = no cap. Unset: the sampler
    stage takes the pipeline's ``limits.max_events_per_sec`` (the policy: no cap)."""
    cap_hysteresis: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    """Headroom below the cap required before the cap lets N fall again; also the headroom
    left below a learned downstream capacity."""
    capacity_growth: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.02
    """Growth of the learned capacity per relief period once the hold is over (probing for a
    faster consumer); 0 = never probe."""
    capacity_hold_periods: Rate = 20
    """Relief periods after a capacity measurement before the capacity grows (20: 10 s);
    doubled, up to ``MAX_HOLD_FACTOR`` times, while probes find it where it was; also how
    many relief periods in a row in which it does not hold N up forget it."""

    @property
    def cap_per_s(self) -> float:
        """``max_events_per_sec`` with unset as 0 (no cap)."""
        return self.max_events_per_sec or 0.0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.min_sample_rate <= self.max_sample_rate:
            problems.append(
                f"need 1 <= min_sample_rate <= max_sample_rate, got {self.min_sample_rate}, "
                f"{self.max_sample_rate}"
            )
        if not self.adjust_period_s > 0:
            problems.append(f"adjust_period_s must be > 0, got {self.adjust_period_s}")
        if not 0 <= self.low_fill < self.high_fill <= 1:
            problems.append(f"need 0 <= low_fill < high_fill <= 1, got {self.low_fill}, {self.high_fill}")
        lag_inverted = self.high_lag_s > 0 and self.low_lag_s >= self.high_lag_s
        if self.high_lag_s < 0 or self.low_lag_s < 0 or lag_inverted:
            problems.append(f"need 0 <= low_lag_s < high_lag_s, got {self.low_lag_s}, {self.high_lag_s}")
        if not 0 < self.decrease_factor < 1:
            problems.append(f"decrease_factor must be in (0, 1), got {self.decrease_factor}")
        if not 0 < self.increase_step <= 1:
            problems.append(f"increase_step must be in (0, 1], got {self.increase_step}")
        if self.cap_per_s < 0:
            problems.append(f"max_events_per_sec must be >= 0, got {self.max_events_per_sec}")
        if not 0 <= self.cap_hysteresis < 1:
            problems.append(f"cap_hysteresis must be in [0, 1), got {self.cap_hysteresis}")
        if not 0 <= self.capacity_growth < 1:
            problems.append(f"capacity_growth must be in [0, 1), got {self.capacity_growth}")
        if self.capacity_hold_periods < 1:
            problems.append(f"capacity_hold_periods must be >= 1, got {self.capacity_hold_periods}")
        if problems:
            raise ValueError("; ".join(problems))


class ChangeReason(enum.StrEnum):
    PRESSURE = "pressure"
    """Fill or lag above the high watermark."""
    RELIEF = "relief"
    """Fill and lag below the low watermarks."""
    CAP = "cap"
    """The input rate moved against ``max_events_per_sec``."""
    CAPACITY = "capacity"
    """The learned downstream capacity (or the input rate against it) moved N."""


@dataclass(frozen=True, slots=True)
class RateChange:
    """One change of N, with the measurements that caused it."""

    at: float
    old_rate: int
    new_rate: int
    reason: ChangeReason
    fill: float
    lag_s: float
    input_per_s: float
    capacity_per_s: float | None = None
    """The learned downstream capacity after the adjustment (None: none learned)."""


class SamplingPolicy:
    """Sampling-rate policy; see the module docstring for the rules and guarantees."""

    def __init__(self, params: SamplingParams, *, now: float) -> None:
        self.params = params
        self.rate = params.min_sample_rate
        """The current sampling rate N (keep 1 in N)."""
        self.changes = 0
        """How many times N has changed."""
        self.input_per_s = 0.0
        """The input rate ``r`` the last adjustment acted on."""
        self.capacity = DownstreamCapacity(params)
        """What is known of the consumer downstream."""
        self._aimd = params.min_sample_rate
        self._cap = 1
        self._learned = 1
        self._learned_fit = 1.0
        self._exact = float(self.rate)
        self._was_complete = False
        self._complete_input_per_s: float | None = None
        """``r`` of the last period in which it was complete (None: none yet)."""
        self._backlog = 0.0
        self._period_start = now
        self.due_at = now + params.adjust_period_s
        """When the next adjustment is due (the shell sleeps until then)."""
        self._fill_sum = 0.0
        self._fill_n = 0
        self._fill_last = 0.0
        self._fill_end = 0.0
        self._lag_sum = 0.0
        self._lag_n = 0
        self._weighted_in = 0.0
        self._weighted_span_s = 0.0
        self._lost_upstream = 0.0
        self._sent = 0.0
        self._consumed = 0.0
        self._consumed_batches = 0.0
        self._completed = 0.0
        self._completed_span_s = 0.0
        self._full_waits = 0

    @property
    def exact_rate(self) -> float:
        """The rate to sample at: ``N`` itself, except where a limit sets ``N`` (the cap ``C``
        or the learned capacity ``C_L``); there the exact ``r / (h'·C)`` or ``r / (h'·C_L)``
        of the last adjustment, in ``[N - 1, N]`` (see "Fractional rates" in the module
        docstring)."""
        return self._exact if max(1.0, self.rate - 1.0) <= self._exact <= self.rate else float(self.rate)

    @property
    def gate_rate(self) -> int:
        """The integer rate for a kernel gate: the largest that does not sample more than
        :attr:`exact_rate` (``N - 1`` while the exact rate is below ``N``); user space takes
        the remaining ``gate_rate / exact_rate``."""
        return math.floor(self.exact_rate)

    @property
    def keep_fraction(self) -> float:
        return 1.0 / self.exact_rate

    @property
    def capacity_per_s(self) -> float | None:
        """The learned capacity ``C_L`` of the consumer downstream, events/s (None: not known)."""
        return self.capacity.per_s

    def observe(
        self,
        *,
        fill: float | None = None,
        lag_s: float | None = None,
        weighted_events: float = 0.0,
        weighted_span_s: float = 0.0,
        lost_upstream: float = 0.0,
        sent_events: float = 0,
        consumed_events: float = 0,
        consumed_batches: float = 0,
        completed_events: float = 0,
        completed_span_s: float = 0.0,
        full_waits: int = 0,
    ) -> None:
        """Add one sample of the downstream fill and/or the lag, and flows since the last call.
        ``completed_events`` finished by the consumer over ``completed_span_s`` seconds
        (between two of its takes: ``pipeline.EdgeStatistics.completed_events``) measure
        its capacity without a partial batch; without them, ``consumed_events`` over the
        period do."""
        if fill is not None:
            self._fill_last = min(max(fill, 0.0), 1.0)
            self._fill_sum += self._fill_last
            self._fill_n += 1
        if lag_s is not None:
            self._lag_sum += max(lag_s, 0.0)
            self._lag_n += 1
        self._weighted_in += weighted_events
        self._weighted_span_s += weighted_span_s
        self._lost_upstream += lost_upstream
        self._sent += sent_events
        self._consumed += consumed_events
        self._consumed_batches += consumed_batches
        self._completed += completed_events
        self._completed_span_s += completed_span_s
        self._full_waits += full_waits

    def tick(self, now: float) -> RateChange | None:
        """Adjust N if a period has passed. Returns the change, or None if N is unchanged."""
        if now < self.due_at:
            return None
        p = self.params
        elapsed = now - self._period_start
        periods = max(1, int(elapsed // p.adjust_period_s))
        fill = self._fill_sum / self._fill_n if self._fill_n else 0.0
        fill_end = self._fill_last if self._fill_n else 0.0
        lag_s = self._lag_sum / self._lag_n if self._lag_n else 0.0
        arrived = self._weighted_in
        if self._weighted_span_s > 0 and self._lost_upstream == 0:
            # As if gathered over the period. (Not while the source loses: its losses fill the
            # time it could not deliver, the arrivals' rate must not be stretched over it too.)
            arrived *= elapsed / self._weighted_span_s
        input_per_s = (arrived + self._lost_upstream) / elapsed if elapsed > 0 else 0.0
        self.input_per_s = input_per_s
        sent, consumed, batches, lost, full_waits = (
            self._sent,
            self._consumed,
            self._consumed_batches,
            self._lost_upstream,
            self._full_waits,
        )
        took, took_s = consumed, elapsed  # what measures the consumer's rate
        if self._completed > 0 and self._completed_span_s > 0:
            took, took_s = self._completed, self._completed_span_s
        self._period_start = now
        self.due_at = now + p.adjust_period_s
        self._fill_sum = self._lag_sum = self._weighted_in = self._lost_upstream = 0.0
        self._weighted_span_s = 0.0
        self._sent = self._consumed = self._consumed_batches = 0.0
        self._completed = self._completed_span_s = 0.0
        self._fill_n = self._lag_n = self._full_waits = 0

        h = 1.0 - p.cap_hysteresis
        lag_counts = p.high_lag_s > 0
        pressured = fill >= p.high_fill or (lag_counts and lag_s >= p.high_lag_s)
        relieved = not pressured and fill <= p.low_fill and (not lag_counts or lag_s <= p.low_lag_s)
        old, old_aimd = self.rate, self._aimd
        old_limit = max(self._cap, self._learned)

        # Downstream-bound: the channel stayed (nearly) full, or filled up past the low
        # watermark and the backlog grew by more than a batch's worth.
        batch = consumed / batches if batches > 0 else 0.0
        backlog_grew = batches > 0 and sent - consumed > batch
        # Draining: the channel holds fewer batches than at the last adjustment. (Not in
        # events: the bigger batches of a lower N leaving a full channel are no relief.)
        draining = fill >= p.high_fill and fill_end < self._fill_end
        self._fill_end = fill_end
        self._backlog = max(0.0, self._backlog + sent - consumed)  # events queued downstream
        # A probe that filled the channel even once sent more than the consumer takes: it was
        # busy throughout, so what it took is its rate. (Waiting for the mean fill would let
        # the probe hold the source back for a period or more. A backlog that grew by a batch
        # is no such proof: a consumer not yet busy throughout would be measured low.)
        overran = self.capacity.probing and full_waits > 0
        bound = fill >= p.high_fill or (fill > p.low_fill and backlog_grew) or overran
        measured = self.capacity.period(bound=bound, consumed=took, batches=batches, elapsed=took_s)

        # A source that blocks is undercounted while something holds it back (pressure, or
        # a full channel the sampler waited on), not before; one that reports its losses is not.
        complete_now = lost > 0 or not (pressured or full_waits > 0)
        offered_per_s = input_per_s
        if complete_now:
            self._complete_input_per_s = input_per_s
        else:
            offered_per_s = max(input_per_s, self._complete_input_per_s or 0.0)

        if p.cap_per_s > 0:
            low = offered_per_s / p.cap_per_s
            self._cap = max(1, min(max(self._cap, math.ceil(low)), math.ceil(low / h), p.max_sample_rate))
        self._update_learned(offered_per_s, measured)

        if pressured:
            # The input rate is complete if the source reported its losses, or if the pressure
            # just began (``offered_per_s`` is then from the complete period before it); a
            # source held back by it is undercounted after that, and from the start if no
            # period was complete yet (then a channel that holds a batch less is no sign that N
            # relieves it).
            complete = lost > 0 or self._was_complete
            # ``learned`` sends what the consumer takes: a backlog upstream (lag past the high
            # watermark) would never catch up, so there N doubles to shed it.
            fits_backlog = measured and complete and not (lag_counts and lag_s >= p.high_lag_s)
            if fits_backlog or (draining and self._complete_input_per_s is not None):
                self._aimd = max(self._aimd, old)  # N relieves it already, or ``learned`` jumps
            else:
                # No measurement (a stalled consumer, or lag alone), an undercounted input, or a
                # backlog upstream.
                self._aimd = min(p.max_sample_rate, max(old + 1, math.ceil(old / p.decrease_factor)))
        elif relieved:
            for _ in range(min(periods, p.max_sample_rate)):
                if self._aimd <= p.min_sample_rate:
                    break
                keep = 1.0 / self._aimd + p.increase_step
                self._aimd = max(p.min_sample_rate, math.floor(1.0 / keep))
            if self._backlog <= batch and not full_waits:  # probe only while the consumer keeps up
                self.capacity.relieved(periods)
        fits = not pressured and not backlog_grew and self.capacity.per_s is not None
        if fits and self._aimd > self._learned:
            # Unpressured, ``r`` is complete and the consumer keeps up: ``learned`` fits, so what
            # AIMD overshot by while a blocked source hid ``r`` goes at once, not relief by relief.
            self._aimd = max(p.min_sample_rate, self._learned)
        else:
            fits = False
        self._was_complete = complete_now

        self.rate = min(p.max_sample_rate, max(self._aimd, self._cap, self._learned, p.min_sample_rate))
        holds_n_up = self._learned > max(self._aimd, self._cap, p.min_sample_rate)
        # The exact rate: each rule's unrounded value, the largest of them, in [N - 1, N].
        fit = float(p.min_sample_rate)
        if self._aimd > max(self._cap, self._learned):  # AIMD alone sets N (a tie: the limit does)
            fit = max(fit, self._aimd)
        if p.cap_per_s > 0:
            fit = max(fit, offered_per_s / ((1.0 - p.cap_hysteresis / 2) * p.cap_per_s))
        if self.capacity.per_s is not None:
            fit = max(fit, self._learned_fit)
        self._exact = min(float(self.rate), max(self.rate - 1.0, fit))
        if self.capacity.unused(periods if relieved and not holds_n_up else 0):
            self._learned = 1
        if self.rate == old:
            return None
        self.changes += 1
        limit = max(self._cap, self._learned)
        if pressured and self.rate > old:
            reason = ChangeReason.PRESSURE
        elif limit > self._aimd or (self.rate < old and (fits or old_limit > old_aimd)):
            learned_binds = self.capacity.per_s is not None and self._learned >= self._cap
            reason = ChangeReason.CAPACITY if learned_binds else ChangeReason.CAP
        else:
            reason = ChangeReason.PRESSURE if self.rate > old else ChangeReason.RELIEF
        return RateChange(now, old, self.rate, reason, fill, lag_s, input_per_s, self.capacity.per_s)

    def _update_learned(self, input_per_s: float, measured: bool) -> None:
        """``learned`` stays in ``[⌈r/C_L⌉, ⌈r/(h'·C_L)⌉]``; when it moves, to ``⌈r/(h'·C_L)⌉``."""
        if self.capacity.per_s is None:
            self._learned = 1
            self._learned_fit = 1.0
            return
        low = input_per_s / self.capacity.per_s
        aim = 1.0 - self.params.cap_hysteresis / 2
        self._learned_fit = min(low / aim, float(self.params.max_sample_rate))
        top = max(1, min(math.ceil(self._learned_fit), self.params.max_sample_rate))
        if measured or not math.ceil(low) <= self._learned <= top:
            self._learned = top


class DownstreamCapacity:
    """The consumer's capacity ``C_L``, learned from downstream-bound periods, and when to
    probe above it. Part of :class:`SamplingPolicy` (see the module docstring)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.measurements = 0
        """How many measurements were made (forgetting does not reset this)."""
        self._forget()

    def _forget(self) -> None:
        self.per_s: float | None = None
        """``C_L``, events/s: the last measurement, grown since by probing (None: not known)."""
        self.measured_per_s: float | None = None
        """The last measurement."""
        self.hold_periods = self.params.capacity_hold_periods
        """Relief periods the next measurement holds ``C_L`` for before it grows again."""
        self._hold = 0
        self._unused_for = 0
        self._episode_measured = False
        """Whether this downstream-bound episode (bound periods in a row) measured already."""
        self._window: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=CAPACITY_WINDOW_PERIODS
        )

    @property
    def probing(self) -> bool:
        """``C_L`` has grown past its last measurement: a probe is sending more than ever measured."""
        return self.per_s is not None and self.measured_per_s is not None and self.per_s > self.measured_per_s

    def known(self) -> float:
        assert self.per_s is not None
        return self.per_s

    def period(self, *, bound: bool, consumed: float, batches: float, elapsed: float) -> bool:
        """One period's flows. Returns True if it measured the capacity: over the last (up to
        :data:`CAPACITY_WINDOW_PERIODS`) consecutive downstream-bound periods in which the
        consumer took something, once they hold :data:`MIN_CAPACITY_BATCHES` batches. (A
        stall is not a rate: it empties the window.)"""
        if not bound or consumed <= 0 or elapsed <= 0:
            self._window.clear()
            self._episode_measured = False
            return False
        self._window.append((consumed, batches, elapsed))
        if sum(b for _, b, _ in self._window) < MIN_CAPACITY_BATCHES:
            return False
        self._measure(sum(c for c, _, _ in self._window) / sum(e for _, _, e in self._window))
        return True

    def _measure(self, per_s: float) -> None:
        p = self.params
        last = self.measured_per_s
        if last is None or abs(per_s - last) > CAPACITY_TOLERANCE * last:
            self.hold_periods = p.capacity_hold_periods  # new, or changed: probe again soon
        elif not self._episode_measured:
            # A new bound episode (a probe's) found it where the last one did: trust it longer.
            self.hold_periods = min(2 * self.hold_periods, MAX_HOLD_FACTOR * p.capacity_hold_periods)
        # Else the same episode measured again: no new evidence, the hold stays as it was. (One
        # overload measures every period; were each to double the hold, a capacity measured
        # low while the consumer shared the CPU with the overload would stand for 80 s.)
        self._episode_measured = True
        self.per_s = self.measured_per_s = per_s
        self.measurements += 1
        self._hold = self.hold_periods

    def relieved(self, periods: int) -> None:
        """``periods`` relief periods passed: wait out the hold, then grow."""
        if self.per_s is None:
            return
        waited = min(periods, self._hold)
        self._hold -= waited
        growing = min(periods - waited, 1000)
        # Not past the cap: there ``learned`` sends what the cap's own rule sends, h' of it;
        # beyond, the cap, not the consumer, limits what is sent.
        cap = self.params.cap_per_s
        if growing and self.params.capacity_growth > 0 and not 0 < cap <= self.per_s:
            self.per_s *= (1.0 + self.params.capacity_growth) ** growing
            if cap > 0:
                self.per_s = min(self.per_s, cap)

    def unused(self, periods: int) -> bool:
        """``periods`` relief periods in which ``C_L`` did not hold N up (0: it did, or no
        relief). Returns True if that made it forget ``C_L``."""
        if periods == 0 or self.per_s is None:
            self._unused_for = 0
            return False
        self._unused_for += periods
        if self._unused_for < self.params.capacity_hold_periods:
            return False
        self._forget()
        return True


class RateCapBucket:
    """Holds the delivered rate to ``max_events_per_sec`` from the first event, before the
    policy has measured anything (see "Hard cap" in the module docstring).

    A token bucket of ``per_s`` tokens a second, up to ``burst``, full at the start. A batch
    of ``count`` events gets the keep fraction ``q = min(1, tokens / count)`` and costs
    ``q·count`` tokens; which events are kept is a *systematic* sample along the stream:
    event ``j`` is kept when ``phase + q·j`` passes an integer, ``phase`` carried from batch
    to batch and uniform at the start. So each event is kept with probability exactly ``q``
    (the weights of the kept ones, divided by ``q``, stay unbiased), and the events kept over
    any stretch of batches are their tokens rounded down from ``phase``: at most one more."""

    def __init__(self, per_s: float, burst: float, *, now: float, phase: float) -> None:
        if per_s <= 0 or burst < 1 or not 0 <= phase < 1:
            raise ValueError(f"need per_s > 0, burst >= 1, 0 <= phase < 1; got {per_s}, {burst}, {phase}")
        self.per_s = per_s
        self.burst = burst
        self.tokens = burst
        self.phase = phase
        self._last = now

    def keep(self, count: int, now: float) -> tuple[float, npt.NDArray[np.bool_] | None]:
        """The keep fraction ``q`` for a batch of ``count`` events arriving at ``now``, and which
        of them to keep (None: all of them, ``q = 1``)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self._last) * self.per_s)
        self._last = max(self._last, now)
        if count <= self.tokens:
            self.tokens -= count
            return 1.0, None
        q = self.tokens / count
        self.tokens = 0.0
        marks = np.floor(self.phase + q * np.arange(count + 1))
        self.phase = float(self.phase + q * count - marks[-1])
        return q, np.diff(marks) > 0
