"""The adaptive sampler's policy: pure AIMD on an integer sampling rate, plus a rate cap.

Representation
--------------
The policy's output is the *sampling rate* ``N`` — keep 1 event in ``N`` — an
integer in ``[min_sample_rate, max_sample_rate]`` (default ``[1, 1000]``), because
the kernel's sampling gate takes integers; the keep fraction is ``1/N``. ``N``
counts relative to the events the kernel saw: an event that reaches user space
with weight ``w`` (the kernel gate kept it 1 in ``w``) is already reduced ``w``-fold.

Inputs and timing
-----------------
The shell calls :meth:`SamplingPolicy.observe` with what it sees — the fill of the
channel downstream (0..1), the processing lag (now - read time) and the weighted
number of events that arrived (pre-sampling, so it estimates the true rate even
after kernel sampling) — and :meth:`SamplingPolicy.tick` with the current time.
A tick at or after :attr:`SamplingPolicy.due_at` (``period_s`` after the previous
adjustment) runs one adjustment on the period's *mean* fill and *mean* lag (no
samples counts as an idle, unpressured period) and the period's input rate;
earlier ticks do nothing. The clock is passed in: no trio here, no clock read.

One adjustment
--------------
Two components; the rate is ``clamp(max(aimd, cap), min_sample_rate, max_sample_rate)``.

* ``aimd`` — *pressure* (fill ≥ ``high_fill`` or lag ≥ ``high_lag_s``): the keep
  fraction falls multiplicatively, starting from the current rate:
  ``aimd ← max(N + 1, ⌈N / decrease_factor⌉)``. *Relief* (fill ≤ ``low_fill`` and
  lag ≤ ``low_lag_s``): the keep fraction rises additively,
  ``aimd ← ⌊1 / (1/aimd + increase_step)⌋``, once per whole period elapsed since
  the last adjustment. In between it holds. ``high_lag_s = 0`` ignores lag.
* ``cap`` — with ``C = max_events_per_sec > 0`` and input rate ``r``:
  ``cap ← clamp(cap, ⌈r / C⌉, ⌈r / (h·C)⌉)`` with ``h = 1 - cap_hysteresis``. It
  rises at once to meet the cap and falls only as far as leaves ``cap_hysteresis``
  headroom, so an input rate near a boundary does not make ``N`` flap.

Guarantees (``tests/property/test_sampler_policy.py`` checks each)
------------------------------------------------------------------
* **Bounds.** ``min_sample_rate ≤ N ≤ max_sample_rate`` after any inputs.
* **Falls under pressure.** Each pressured period raises ``N`` until the upper
  bound, which it reaches from any ``N`` within
  ``⌈log(max_sample_rate) / log(1 / decrease_factor)⌉`` periods (10 at defaults).
* **Recovers.** Once fill and lag are at or below the low watermarks and the
  input rate is at most ``h·C`` (or there is no cap), ``N`` is back to
  ``min_sample_rate`` (1 by default) within ``⌈0.5 / increase_step⌉ + 1`` periods
  (11 at defaults: 5.5 s) from any ``N``: each relief period raises the keep
  fraction by at least ``increase_step``, and ``N`` is 1 once it passes 1/2.
* **Converges to the cap.** With no pressure (and ``min_sample_rate = 1``), at
  most 2 periods after a step change to a steady weighted input rate ``r`` (the
  first *whole* period after the step measures ``r`` exactly), the expected
  delivered rate ``D = r / N`` satisfies ``D ≤ C`` and ``D ≥ h·C·r / (r + h·C)``:
  integer ``N`` and the hysteresis cost at most that much. At defaults that is
  ``D ≥ 0.81·C`` for ``r ≥ 10·C``, and ``N = 1`` for ``r ≤ 0.9·C``. When
  ``r > C · max_sample_rate`` the bound wins (``N = max_sample_rate``; the
  in-flight budget protects the rest). Pressure can only make ``D`` lower.
* **Reports once.** :meth:`~SamplingPolicy.tick` returns a :class:`RateChange`
  exactly when ``N`` changes, else ``None``; the shell logs each change once.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["ChangeReason", "RateChange", "SamplingParams", "SamplingPolicy"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The policy's knobs (the stage's config maps onto these one to one)."""

    min_sample_rate: int = 1
    """Lower bound of N (and its starting value): always keep at most 1 event in this many."""
    max_sample_rate: int = 1000
    """Upper bound of N: never keep fewer than 1 event in this many."""
    period_s: float = 0.5
    high_fill: float = 0.75
    low_fill: float = 0.25
    high_lag_s: float = 1.0
    """Lag at or above this is pressure; 0 ignores lag."""
    low_lag_s: float = 0.2
    decrease_factor: float = 0.5
    """Keep fraction multiplier per pressured period, in (0, 1)."""
    increase_step: float = 0.05
    """Keep fraction added per relief period, in (0, 1]."""
    max_events_per_sec: float = 0.0
    """Cap on the delivered (post-sampling) event rate; 0 = no cap."""
    cap_hysteresis: float = 0.1
    """Headroom required before the cap lets N fall, in [0, 1)."""

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.min_sample_rate <= self.max_sample_rate:
            problems.append(
                f"need 1 <= min_sample_rate <= max_sample_rate, got {self.min_sample_rate}, "
                f"{self.max_sample_rate}"
            )
        if not self.period_s > 0:
            problems.append(f"period_s must be > 0, got {self.period_s}")
        if not 0 <= self.low_fill < self.high_fill <= 1:
            problems.append(f"need 0 <= low_fill < high_fill <= 1, got {self.low_fill}, {self.high_fill}")
        lag_inverted = self.high_lag_s > 0 and self.low_lag_s >= self.high_lag_s
        if self.high_lag_s < 0 or self.low_lag_s < 0 or lag_inverted:
            problems.append(f"need 0 <= low_lag_s < high_lag_s, got {self.low_lag_s}, {self.high_lag_s}")
        if not 0 < self.decrease_factor < 1:
            problems.append(f"decrease_factor must be in (0, 1), got {self.decrease_factor}")
        if not 0 < self.increase_step <= 1:
            problems.append(f"increase_step must be in (0, 1], got {self.increase_step}")
        if self.max_events_per_sec < 0:
            problems.append(f"max_events_per_sec must be >= 0, got {self.max_events_per_sec}")
        if not 0 <= self.cap_hysteresis < 1:
            problems.append(f"cap_hysteresis must be in [0, 1), got {self.cap_hysteresis}")
        if problems:
            raise ValueError("; ".join(problems))


class ChangeReason(enum.StrEnum):
    PRESSURE = "pressure"
    """Fill or lag above the high watermark."""
    RELIEF = "relief"
    """Fill and lag below the low watermarks."""
    CAP = "cap"
    """The input rate moved against ``max_events_per_sec``."""


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


class SamplingPolicy:
    """AIMD sampling-rate policy; see the module docstring for the rules and guarantees."""

    def __init__(self, params: SamplingParams, *, now: float) -> None:
        self.params = params
        self.rate = params.min_sample_rate
        """The current sampling rate N (keep 1 in N)."""
        self.changes = 0
        """How many times N has changed."""
        self._aimd = params.min_sample_rate
        self._cap = 1
        self._period_start = now
        self.due_at = now + params.period_s
        """When the next adjustment is due (the shell sleeps until then)."""
        self._fill_sum = 0.0
        self._fill_n = 0
        self._lag_sum = 0.0
        self._lag_n = 0
        self._weighted_in = 0.0

    @property
    def keep_fraction(self) -> float:
        return 1.0 / self.rate

    def observe(
        self, *, fill: float | None = None, lag_s: float | None = None, weighted_events: float = 0.0
    ) -> None:
        """Add one sample of the downstream fill and/or the lag, and events that arrived."""
        if fill is not None:
            self._fill_sum += min(max(fill, 0.0), 1.0)
            self._fill_n += 1
        if lag_s is not None:
            self._lag_sum += max(lag_s, 0.0)
            self._lag_n += 1
        self._weighted_in += weighted_events

    def tick(self, now: float) -> RateChange | None:
        """Adjust N if a period has passed. Returns the change, or None if N is unchanged."""
        if now < self.due_at:
            return None
        p = self.params
        elapsed = now - self._period_start
        periods = max(1, int(elapsed // p.period_s))
        fill = self._fill_sum / self._fill_n if self._fill_n else 0.0
        lag_s = self._lag_sum / self._lag_n if self._lag_n else 0.0
        input_per_s = self._weighted_in / elapsed if elapsed > 0 else 0.0
        self._period_start = now
        self.due_at = now + p.period_s
        self._fill_sum = self._lag_sum = self._weighted_in = 0.0
        self._fill_n = self._lag_n = 0

        old, old_aimd, old_cap = self.rate, self._aimd, self._cap
        lag_counts = p.high_lag_s > 0
        if fill >= p.high_fill or (lag_counts and lag_s >= p.high_lag_s):
            self._aimd = min(p.max_sample_rate, max(old + 1, math.ceil(old / p.decrease_factor)))
        elif fill <= p.low_fill and (not lag_counts or lag_s <= p.low_lag_s):
            for _ in range(min(periods, p.max_sample_rate)):
                if self._aimd <= p.min_sample_rate:
                    break
                keep = 1.0 / self._aimd + p.increase_step
                self._aimd = max(p.min_sample_rate, math.floor(1.0 / keep))

        if p.max_events_per_sec > 0:
            cap_per_s = p.max_events_per_sec
            low = math.ceil(input_per_s / cap_per_s)
            high = math.ceil(input_per_s / (cap_per_s * (1.0 - p.cap_hysteresis)))
            self._cap = max(1, min(max(self._cap, low), high, p.max_sample_rate))

        self.rate = min(p.max_sample_rate, max(self._aimd, self._cap, p.min_sample_rate))
        if self.rate == old:
            return None
        self.changes += 1
        if self._cap > self._aimd or (self.rate < old and old_cap > old_aimd):
            reason = ChangeReason.CAP
        else:
            reason = ChangeReason.PRESSURE if self.rate > old else ChangeReason.RELIEF
        return RateChange(now, old, self.rate, reason, fill, lag_s, input_per_s)
