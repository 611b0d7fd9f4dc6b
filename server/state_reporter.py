"""Tell the sidecar what the server is doing: model loads, and every second the running and
waiting counts, KV cache use, readiness, the fair scheduler's fairness index and the engine's
decode-step histograms, which events about single requests cannot carry.

The reporter is also the fair scheduler's clock: each report closes one second of the window
its fairness index is computed over.

The load event is repeated every second too: a sidecar restarted after the model loaded would
otherwise never learn which model and engine it serves, and report the model as not loaded.
"""

from __future__ import annotations

import asyncio
import contextlib

from llmserve.server.admission import AdmissionGate
from llmserve.server.engines.base import Engine, ModelInfo
from llmserve.server.state import ServerState
from llmserve.shared.client import EventSender
from llmserve.shared.protocol import Load, State

__all__ = ["StateReporter"]

_INTERVAL_SECONDS = 1.0


class StateReporter:
    def __init__(
        self, events: EventSender | None, engine: Engine, gate: AdmissionGate, state: ServerState
    ) -> None:
        self.events = events
        self.engine = engine
        self.gate = gate
        self.state = state
        self._task: asyncio.Task[None] | None = None
        self._load: tuple[ModelInfo, bool] | None = None

    def loaded(self, info: ModelInfo, *, loaded: bool = True) -> None:
        self._load = (info, loaded)
        if self.events is None:
            return
        self.events.send(
            Load(
                model=info.model_id,
                engine=info.engine,
                source=info.source,
                load_s=info.load_seconds,
                memory_bytes=int(info.details.get("size_bytes", 0)),
                loaded=loaded,
            )
        )

    def report(self) -> None:
        if self.events is None:
            return
        fairness = self.gate.share.fairness()
        tokens = self.engine.steps.tokens.snapshot()
        seconds = self.engine.steps.seconds.snapshot()
        self.events.send(
            State(
                model=self.engine.info.model_id,
                running=self.gate.running,
                waiting=self.gate.waiting,
                kv_usage=self.engine.kv_usage(),
                ready=self.state.status == "ready",
                draining=self.state.draining,
                keys_stale_s=self.state.keys_stale_seconds(),
                # Rounding keeps a float's last bit from taking an index of 1 past its bound.
                fairness=None if fairness is None else min(1.0, round(fairness, 6)),
                step_tokens=list(tokens.counts),
                step_tokens_sum=tokens.total,
                step_seconds=list(seconds.counts),
                step_seconds_sum=seconds.total,
            )
        )

    def start(self) -> None:
        if self.events is not None:
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            self.gate.share.tick()
            self.report()
            if self._load is not None:
                info, loaded = self._load
                self.loaded(info, loaded=loaded)
            await asyncio.sleep(_INTERVAL_SECONDS)

    async def stop(self, info: ModelInfo) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.report()
        self.loaded(info, loaded=False)
