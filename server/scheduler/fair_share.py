"""Fair sharing of one model between keys: the Virtual Token Counter (Sheng et al., OSDI 2024).

Every key is a tenant with a counter of the service it received: prompt tokens read and tokens
generated, each weighted (1 and 2 by default, as in the paper), divided by the key's own weight.
Whoever has the lowest counter goes next: for the next free slot, and for the rows of a step
that cannot carry every ready sequence. A tenant that becomes active starts at the lowest
counter among the active ones, so time spent idle is never banked as credit, and a lone tenant
still gets the whole server: nothing here ever holds work back, it only orders it.

The counters are charged from the engine's worker thread and read by admission on the event
loop, so every change happens under one lock; reading one counter is a single float load.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

__all__ = ["FairShare", "ServiceWeights", "Tenant", "jain_index"]

_WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class ServiceWeights:
    """What one prompt token and one generated token cost a tenant's counter."""

    prompt: float = 1.0
    generated: float = 2.0

    def of(self, prompt: int, generated: int) -> float:
        return self.prompt * prompt + self.generated * generated


@dataclass(eq=False, slots=True)
class Tenant:
    """One key's standing. `counter` orders tenants; `service` is what it was given, unweighted
    by the key's weight (the per-key service metric); `normalized` is service / weight, the
    quantity fairness is judged on."""

    name: str
    weight: float = 1.0
    counter: float = 0.0
    service: float = 0.0
    normalized: float = 0.0
    # Requests admitted or waiting; the tenant is active while this is above zero.
    outstanding: int = 0
    # Kept by admission on the event loop: requests holding a slot, and waiting for one.
    running: int = 0
    waiting: int = 0
    # Had a request waiting since the fairness window's last tick.
    waited: bool = False
    share: FairShare | None = field(default=None, repr=False)
    # The fairness window: (tick, normalized) when it changed, one entry kept from before the
    # window as its baseline; and the last tick in which the tenant had work waiting.
    history: deque[tuple[int, float]] = field(default_factory=deque, repr=False)
    unrecorded: float = 0.0
    waited_tick: int = -_WINDOW_SECONDS

    @property
    def priority(self) -> float:
        """Lower goes first; equal for everyone under first-come-first-served."""
        return self.counter if self.share is not None and self.share.fair else 0.0

    def charge(self, prompt: int = 0, generated: int = 0) -> None:
        """Count service given to this tenant (any thread)."""
        if self.share is not None:
            self.share.charge(self, prompt, generated)


class FairShare:
    """The tenants and their counters. With `fair=False` every tenant's counter stays equal,
    which turns every choice into first-come-first-served (kept for comparison)."""

    def __init__(self, weights: ServiceWeights | None = None, *, fair: bool = True) -> None:
        self.weights = weights or ServiceWeights()
        self.fair = fair
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}
        self._active: set[Tenant] = set()
        # The counter a tenant activating now starts from when nobody else is active: the last
        # value the lowest active counter had, so leaving and coming back earns nothing.
        self._floor = 0.0
        self._ticks = 0
        # Charged since the last tick, and with a history inside the fairness window.
        self._changed: set[Tenant] = set()
        self._recent: set[Tenant] = set()

    def tenant(self, name: str, weight: float = 1.0) -> Tenant:
        """The tenant of a key, with the key's current weight. Requests without a key come as
        the `anonymous` key, so they share one tenant."""
        with self._lock:
            tenant = self._tenants.get(name)
            if tenant is None:
                tenant = self._tenants[name] = Tenant(name, weight, share=self)
            tenant.weight = weight
            return tenant

    @property
    def tenants(self) -> list[Tenant]:
        with self._lock:
            return list(self._tenants.values())

    def arrive(self, tenant: Tenant) -> None:
        """A request of this tenant is now waiting or running."""
        with self._lock:
            tenant.outstanding += 1
            if tenant.outstanding > 1:
                return
            # Forgotten while idle between its lookup and now: it is known again.
            self._tenants.setdefault(tenant.name, tenant)
            floor = min((t.counter for t in self._active), default=self._floor)
            self._floor = max(self._floor, floor)
            tenant.counter = max(tenant.counter, self._floor)
            self._active.add(tenant)

    def depart(self, tenant: Tenant) -> None:
        """A request of this tenant left (finished, refused or gone)."""
        with self._lock:
            tenant.outstanding -= 1
            if tenant.outstanding > 0:
                return
            self._active.discard(tenant)
            # Recorded at the next tick, in case it had work waiting this second.
            self._changed.add(tenant)
            low = min((t.counter for t in self._active), default=tenant.counter)
            self._floor = max(self._floor, low)

    def charge(self, tenant: Tenant, prompt: int, generated: int) -> None:
        cost = self.weights.of(prompt, generated)
        if cost <= 0:
            return
        with self._lock:
            tenant.service += cost
            tenant.normalized += cost / tenant.weight
            tenant.unrecorded += cost / tenant.weight
            tenant.counter += cost / tenant.weight
            self._changed.add(tenant)

    def tick(self) -> None:
        """Close one second of the fairness window (the state reporter calls this each second).
        Costs what changed in the second, not the number of keys ever seen."""
        with self._lock:
            self._ticks += 1
            now = self._ticks
            for tenant in self._changed | self._active:
                self._record(tenant, now)
            self._changed.clear()
            if now % _WINDOW_SECONDS == 0:
                self._forget_the_idle(now)

    def _record(self, tenant: Tenant, now: int) -> None:
        if tenant.waited or tenant.waiting:
            tenant.waited, tenant.waited_tick = False, now
        history = tenant.history
        if not history:
            # Its value before this second's charges: what it had when last recorded, or 0.
            history.append((now - 1, tenant.normalized - tenant.unrecorded))
        history.append((now, tenant.normalized))
        tenant.unrecorded = 0.0
        while len(history) > 1 and history[1][0] <= now - _WINDOW_SECONDS:
            history.popleft()
        self._recent.add(tenant)

    def _forget_the_idle(self, now: int) -> None:
        """Drop tenants a fresh one would equal: idle, out of the window, at or below the
        floor (a newcomer is lifted to it). A key store can churn through many keys."""
        for tenant in self._recent - self._active:
            if tenant.history and tenant.history[-1][0] <= now - _WINDOW_SECONDS:
                self._recent.discard(tenant)
        for name, tenant in list(self._tenants.items()):
            idle = tenant.outstanding == 0 and tenant not in self._recent
            if idle and tenant.counter <= self._floor:
                del self._tenants[name]

    def fairness(self) -> float | None:
        """Jain's index over the last minute, among the tenants that had work waiting in it:
        1 when each got the same service per unit of weight, 1/n when one got everything.
        None when fewer than two tenants had to wait: there was nothing to share."""
        with self._lock:
            start = self._ticks - _WINDOW_SECONDS
            served = []
            for tenant in self._recent:
                if tenant.waited_tick <= start:
                    continue
                history = tenant.history
                baseline = history[0][1]
                served.append(history[-1][1] - baseline)
        return jain_index(served) if len(served) >= 2 else None


def jain_index(values: list[float]) -> float:
    """(Σx)² / (n·Σx²): 1 for equal shares; 1 as well when nobody got anything."""
    squares = sum(v * v for v in values)
    if squares == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * squares)
