"""The scheduler's decisions, deterministically: counters, activation, weights, work
conservation, no starvation, spare slots, and what goes into a step. No engine, no clock: each
test drives `FairShare`, `AdmissionGate` and `plan_step` directly and checks who goes next."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest

from llmserve.server.admission import AdmissionGate
from llmserve.server.errors import ServiceUnavailable
from llmserve.server.scheduler import FairShare, ServiceWeights, Tenant, jain_index, plan_step


def test_a_counter_grows_by_weighted_service_divided_by_the_key_weight():
    share = FairShare(ServiceWeights(prompt=1, generated=2))
    light, heavy = share.tenant("light"), share.tenant("heavy", weight=4)
    light.charge(prompt=10, generated=5)
    heavy.charge(prompt=10, generated=5)
    assert (light.service, light.counter) == (20, 20)
    assert (heavy.service, heavy.counter, heavy.normalized) == (20, 5, 5)
    # Other weights, from the configuration.
    custom = FairShare(ServiceWeights(prompt=0.5, generated=3)).tenant("k")
    custom.charge(prompt=4, generated=1)
    assert custom.counter == 5


def test_a_key_that_becomes_active_starts_at_the_lowest_active_counter():
    share = FairShare()
    busy, other, newcomer = share.tenant("busy"), share.tenant("other"), share.tenant("new")
    share.arrive(busy)
    share.arrive(other)
    busy.charge(generated=500)
    other.charge(generated=300)
    share.arrive(newcomer)
    assert newcomer.counter == 600  # other's, the lowest active: no credit for never asking
    # A key coming back keeps a counter above the floor: it already had its service.
    share.depart(busy)
    busy_counter = busy.counter
    share.arrive(busy)
    assert busy.counter == busy_counter == 1000


def test_idle_time_is_never_banked_as_credit():
    share = FairShare()
    early, late = share.tenant("early"), share.tenant("late")
    share.arrive(early)
    early.charge(generated=5000)
    share.depart(early)
    # Nobody active: the newcomer starts where the last active key left off, not at zero, so
    # it cannot now hold the server for the 10,000 units it "missed" while it sent nothing.
    share.arrive(late)
    assert late.counter == early.counter
    share.arrive(early)
    assert early.counter == late.counter


async def _hold(gate: AdmissionGate, tenant: Tenant, stack: AsyncExitStack) -> None:
    await stack.enter_async_context(gate.slot(tenant))


@dataclass
class Waiting:
    """A request queued at the gate: its task holds the slot once granted, until `release`."""

    tenant: Tenant
    granted: asyncio.Event
    done: asyncio.Event
    task: asyncio.Task[None]

    async def release(self) -> None:
        self.done.set()
        await self.task


def _request(gate: AdmissionGate, tenant: Tenant) -> Waiting:
    granted, done = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with gate.slot(tenant):
            granted.set()
            await done.wait()

    return Waiting(tenant, granted, done, asyncio.get_running_loop().create_task(run()))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _gate(max_running: int, spare: int = 0, **share: object) -> AdmissionGate:
    return AdmissionGate(
        max_running=max_running,
        spare_slots=spare,
        max_waiting=100,
        timeout_seconds=60,
        share=FairShare(**share),  # type: ignore[arg-type]
    )


async def test_the_key_with_the_lowest_counter_gets_the_next_free_slot():
    gate = _gate(1)
    heavy, light = gate.share.tenant("heavy"), gate.share.tenant("light")
    first = _request(gate, heavy)
    await _settle()
    queued = [_request(gate, heavy) for _ in range(3)]
    await _settle()
    light_request = _request(gate, light)
    await _settle()
    heavy.charge(generated=100)  # what the running request was given meanwhile
    await first.release()
    await _settle()
    # light arrived last but has the lowest counter: it goes before heavy's earlier requests.
    assert light_request.granted.is_set()
    assert not any(q.granted.is_set() for q in queued)
    await light_request.release()
    await _settle()
    # Within one key, first come first served.
    assert [q.granted.is_set() for q in queued] == [True, False, False]
    for q in queued:
        await q.release()


async def test_first_come_first_served_ignores_the_counters():
    gate = _gate(1, fair=False)
    heavy, light = gate.share.tenant("heavy"), gate.share.tenant("light")
    first = _request(gate, heavy)
    await _settle()
    queued = _request(gate, heavy)
    await _settle()
    light_request = _request(gate, light)
    await _settle()
    heavy.charge(generated=100)
    await first.release()
    await _settle()
    assert queued.granted.is_set() and not light_request.granted.is_set()
    await queued.release()
    await light_request.release()


async def test_a_lone_key_uses_every_slot_but_not_the_spare_ones():
    gate = _gate(4, spare=2)
    alone = gate.share.tenant("alone")
    requests = [_request(gate, alone) for _ in range(8)]
    await _settle()
    assert sum(r.granted.is_set() for r in requests) == 4
    assert (gate.running, gate.waiting) == (4, 4)
    # Each slot freed is used again at once: the server never idles while work waits.
    for r in requests[:4]:
        await r.release()
    await _settle()
    assert sum(r.granted.is_set() for r in requests[4:]) == 4
    for r in requests[4:]:
        await r.release()
    assert (gate.running, gate.waiting) == (0, 0)


async def test_a_key_with_nothing_running_starts_at_once_in_a_spare_slot():
    gate = _gate(2, spare=1)
    heavy, light, third = (gate.share.tenant(n) for n in ("heavy", "light", "third"))
    held = [_request(gate, heavy) for _ in range(4)]
    await _settle()
    light_request = _request(gate, light)
    await _settle()
    assert light_request.granted.is_set()  # no need to wait for a heavy stream to end
    assert gate.running == 3
    # A second request of the same light key, and a third key, wait: the spare is taken.
    again, third_request = _request(gate, light), _request(gate, third)
    await _settle()
    assert not again.granted.is_set() and not third_request.granted.is_set()
    # The next freed slot goes to the lowest counter among them, not to heavy's queue.
    heavy.charge(generated=1000)
    light.charge(generated=10)
    await held[0].release()
    await _settle()
    assert third_request.granted.is_set() and not again.granted.is_set()
    for r in [*held[1:], light_request, again, third_request]:
        await r.release()
    assert gate.running == 0


async def test_no_key_starves_and_weights_divide_the_slots():
    """Three backlogged keys, weights 1, 1 and 2; each granted request is charged the same.
    Every key keeps being served, and slots follow the weights (1:1:2)."""
    gate = _gate(2)
    tenants = [gate.share.tenant("a"), gate.share.tenant("b"), gate.share.tenant("c", weight=2)]
    pending = [_request(gate, t) for t in tenants for _ in range(3)]
    served: Counter[str] = Counter()
    gaps: dict[str, int] = dict.fromkeys(("a", "b", "c"), 0)
    for _ in range(400):
        await _settle()
        running = next(r for r in pending if r.granted.is_set())
        running.tenant.charge(generated=50)
        served[running.tenant.name] += 1
        for name in gaps:
            gaps[name] = 0 if name == running.tenant.name else gaps[name] + 1
            assert gaps[name] < 8, f"{name} waited {gaps[name]} grants in a row"
        pending.remove(running)
        await running.release()
        pending.append(_request(gate, running.tenant))
    assert served["c"] / served["a"] == pytest.approx(2, rel=0.05)
    assert served["a"] == pytest.approx(served["b"], rel=0.05)
    for r in pending:
        r.task.cancel()
    await asyncio.gather(*(r.task for r in pending), return_exceptions=True)
    assert (gate.running, gate.waiting) == (0, 0)


async def test_a_waiter_that_goes_away_leaves_nothing_behind():
    gate = _gate(1, spare=0)
    tenant = gate.share.tenant("k")
    first = _request(gate, tenant)
    second = _request(gate, tenant)
    await _settle()
    second.task.cancel()
    await asyncio.gather(second.task, return_exceptions=True)
    assert (gate.waiting, tenant.waiting, tenant.outstanding) == (0, 0, 1)
    await first.release()
    assert (gate.running, tenant.running, tenant.outstanding) == (0, 0, 0)


async def test_a_full_queue_is_refused_and_a_long_wait_times_out():
    gate = AdmissionGate(max_running=1, max_waiting=1, timeout_seconds=0.05)
    tenant = gate.share.tenant("k")
    async with AsyncExitStack() as stack:
        await _hold(gate, tenant, stack)
        with pytest.raises(ServiceUnavailable, match="No generation slot became free"):
            async with gate.slot(tenant):
                pass
        waiting = _request(gate, tenant)
        await _settle()
        with pytest.raises(ServiceUnavailable, match="at capacity"):
            async with gate.slot(tenant):
                pass
        waiting.task.cancel()
        await asyncio.gather(waiting.task, return_exceptions=True)
    assert (gate.running, gate.waiting, tenant.outstanding) == (0, 0, 0)


@dataclass(eq=False)
class Seq:
    """What `plan_step` needs of a sequence."""

    tenant: Tenant
    arrival: int
    prompt_left: int = 0
    served: int = 0


def test_a_step_carries_every_next_token_first_then_prompt_chunks_within_the_budget():
    share = FairShare()
    t = share.tenant("k")
    decoding = [Seq(t, i) for i in range(3)]
    reading = [Seq(t, 3, prompt_left=300), Seq(t, 4, prompt_left=50)]
    plan = plan_step([reading[0], *decoding, reading[1]], budget=64)
    assert plan.decode == decoding
    # The earlier prompt first and as far as the budget goes: its stream starts soonest.
    assert plan.prefill == [(reading[0], 61)]
    assert plan.tokens == 64


def test_a_long_prompt_is_read_across_steps():
    t = FairShare().tenant("k")
    long = Seq(t, 0, prompt_left=300)
    chunks = []
    while long.prompt_left:
        plan = plan_step([long], budget=128)
        ((seq, n),) = plan.prefill
        chunks.append(n)
        seq.prompt_left -= n
    assert chunks == [128, 128, 44]


def test_the_lowest_counter_gets_the_rows_of_a_full_step_and_one_keys_streams_take_turns():
    share = FairShare()
    heavy, light = share.tenant("heavy"), share.tenant("light")
    heavy.charge(generated=1000)
    heavy_streams = [Seq(heavy, i) for i in range(4)]
    light_prompt = Seq(light, 9, prompt_left=10)
    plan = plan_step([*heavy_streams, light_prompt], budget=5)
    # Running streams come first even when their key has had more: a prompt never stalls them.
    assert plan.decode == heavy_streams and plan.prefill == [(light_prompt, 1)]
    light_stream = Seq(light, 9)
    plan = plan_step([*heavy_streams, light_stream], budget=3)
    assert plan.decode[0] is light_stream  # lowest counter first
    # heavy's streams share the two remaining rows in turn: the least served go first.
    turns: Counter[int] = Counter()
    for _ in range(20):
        plan = plan_step(heavy_streams, budget=2)
        for seq in plan.decode:
            seq.served += 1
            turns[seq.arrival] += 1
    assert set(turns.values()) == {10}


def test_a_step_smaller_than_the_streams_still_reads_a_waiting_prompt():
    t = FairShare().tenant("k")
    streams = [Seq(t, i) for i in range(4)]
    prompt = Seq(t, 4, prompt_left=3)
    steps = 0
    while prompt.prompt_left:
        plan = plan_step([*streams, prompt], budget=4)
        assert len(plan.decode) == 3 and plan.prefill == [(prompt, 1)]
        for seq in plan.decode:
            seq.served += 1
        prompt.prompt_left -= 1
        steps += 1
    assert steps == 3
    # With nothing to read, every row goes to the streams again.
    assert len(plan_step([*streams, prompt], budget=4).decode) == 4


def test_jain_index():
    assert jain_index([5, 5, 5]) == 1
    assert jain_index([1, 0, 0, 0]) == 0.25
    assert jain_index([0, 0]) == 1
    assert jain_index([2, 1]) == pytest.approx(0.9)


def test_the_fairness_index_covers_the_last_minute_of_keys_that_had_work_waiting():
    share = FairShare()
    a, b, idle = share.tenant("a"), share.tenant("b", weight=2), share.tenant("idle")
    assert share.fairness() is None
    share.tick()
    a.waited = b.waited = True
    a.charge(generated=50)
    b.charge(generated=100)  # twice a's service at twice a's weight: fair
    idle.charge(generated=1)  # served, but never waited: not in the index
    share.tick()
    assert share.fairness() == pytest.approx(1.0)
    b.waited = True
    b.charge(generated=300)
    share.tick()
    # a had work waiting in the window, so getting nothing since counts against the index.
    assert share.fairness() == pytest.approx(jain_index([50, 200]))
    for _ in range(61):
        share.tick()
    assert share.fairness() is None  # a minute without anyone waiting


def test_keys_idle_for_a_minute_at_the_floor_are_forgotten_and_come_back_the_same():
    share = FairShare()
    keys = [share.tenant(f"k{i}") for i in range(1000)]
    for tenant in keys:
        share.arrive(tenant)
        share.depart(tenant)
    busy = share.tenant("busy")
    share.arrive(busy)
    busy.charge(generated=10)
    for _ in range(120):
        share.tick()
    assert {t.name for t in share.tenants} == {"busy"}
    # One coming back starts where a newcomer would: at the lowest active counter.
    again = share.tenant("k7")
    share.arrive(again)
    assert again.counter == busy.counter
    # Still-active keys and keys above the floor (they owe service) are kept.
    share.depart(again)
    again.charge(generated=100)
    for _ in range(120):
        share.tick()
    assert {t.name for t in share.tenants} == {"busy", "k7"}
