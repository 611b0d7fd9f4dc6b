"""The GPU engine: ExLlamaV2's dynamic generator (continuous batching over a paged KV cache).

One worker thread loads the model and then owns a plain `ExLlamaV2DynamicGenerator`: it performs
every enqueue, cancel and `iterate()`, and turns each result into plain Python records (no torch
object leaves it) handed to the event loop with `deliver_threadsafe`, so the loop never waits on
a forward pass. The library's asyncio wrapper is not used because it runs `iterate()` on the
event loop. If `iterate()` raises, the requests in the generator fail with an error, a new
generator is built over the same model and cache, and `healthy` (hence /ready) is False until
it is back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmserve.server.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.server.config import ExLlamaV2Section
from llmserve.server.engines.base import (
    Completion,
    Engine,
    EngineError,
    FinishReason,
    Generation,
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    TokenDelta,
    deliver_threadsafe,
    now_ns,
    require_loaded,
)
from llmserve.server.engines.exllamav2.files import ModelFiles, read_model_files
from llmserve.server.engines.exllamav2.jobs import new_job
from llmserve.server.engines.exllamav2.library import Library, load_library
from llmserve.server.engines.exllamav2.loader import LoadedModel, load_model, max_batch_size
from llmserve.server.engines.fault import describe

__all__ = ["ExLlamaV2Engine"]

log = logging.getLogger("llmserve.engine")

_Delivery = list[tuple[GenerationStream, TokenDelta | Completion]]
_Command = tuple[Literal["start", "cancel"], "_Request"]
_LONGEST_REBUILD_WAIT_SECONDS = 30.0


@dataclass(eq=False, slots=True)
class _Request(Generation):
    job: Any = None
    enqueued_ns: int = 0
    # Ids of tokens that brought no text yet (special tokens, held text): they go out with the
    # next text, as the llamacpp engine does, so the first delta a server sees carries text.
    unsent_ids: list[int] = field(default_factory=list)


class ExLlamaV2Engine(Engine):
    kind = "exllamav2"

    def __init__(self, settings: ExLlamaV2Section, *, model_id: str | None) -> None:
        if not settings.model_dir:
            raise EngineError("the exllamav2 engine needs exllamav2.model_dir, a model directory")
        super().__init__()
        self._library: Library = load_library()
        self._files: ModelFiles = read_model_files(settings.model_dir)
        self._settings = settings
        self._model_id = model_id or Path(settings.model_dir).name
        self._loaded: LoadedModel | None = None
        self._stop_pieces: dict[int, str] = {}
        self._lock = threading.Condition()
        self._commands: deque[_Command] = deque()
        self._jobs: dict[Any, _Request] = {}
        self._closing = False
        self._healthy = True
        self._kv_usage = 0.0
        self._worker: threading.Thread | None = None

    # Engine interface -------------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        if self._loaded is not None:
            return self._loaded.batch_size
        if not self._library.paged_attention:
            return 1
        return max_batch_size(self._settings, self._settings.chunk_tokens)

    @property
    def vocab_size(self) -> int:
        return int(require_loaded(self._loaded).tokenizer.get_vocab_size())

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def active_sequences(self) -> int:
        with self._lock:
            waiting = sum(1 for kind, _ in self._commands if kind == "start")
            return len(self._jobs) + waiting

    def kv_usage(self) -> float:
        return self._kv_usage

    async def load(self) -> ModelInfo:
        started = time.monotonic()
        log.info("loading %s with ExLlamaV2", self._settings.model_dir)
        ready: concurrent.futures.Future[LoadedModel] = concurrent.futures.Future()
        self._worker = threading.Thread(
            target=self._run, args=(ready,), name="exllamav2-generator", daemon=True
        )
        self._worker.start()
        loaded = await asyncio.wrap_future(ready)
        self._loaded = loaded
        files = self._files
        if files.chat_template is None:
            log.warning("%s has no chat template; using ChatML", self._settings.model_dir)
        self._template = ChatTemplate(
            files.chat_template or CHATML_TEMPLATE,
            bos_token=files.bos_token,
            eos_token=files.eos_token,
        )
        vram = loaded.vram_bytes()
        self._info = ModelInfo(
            model_id=self._model_id,
            engine=self.kind,
            source=str(self._settings.model_dir),
            context_length=loaded.context_length,
            parallel=loaded.batch_size,
            description=f"ExLlamaV2 {loaded.config.architecture}",
            load_seconds=time.monotonic() - started,
            details={
                "size_bytes": sum(vram.values()),
                **{f"vram_bytes_{device}": n for device, n in vram.items()},
                "cache_type": self._settings.cache_type,
                "cache_tokens": loaded.cache_tokens,
                "paged": int(loaded.paged),
                "chunk_tokens": loaded.chunk_tokens,
                "draft_tokens": loaded.draft_tokens,
            },
        )
        return self._info

    async def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
            self._worker = None

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        tokenizer = require_loaded(self._loaded).tokenizer
        bos = self._files.bos_token
        add_bos = add_special and self._files.add_bos and not (bos and text.startswith(bos))
        ids = tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)
        return [int(t) for t in ids[0].tolist()]

    def start(self, request: GenerationRequest) -> GenerationStream:
        require_loaded(self._loaded)
        holder: list[_Request] = []
        stream = GenerationStream(cancel=lambda: self._submit(("cancel", holder[0])))
        holder.append(_Request(request, stream))
        with self._lock:
            # A dying worker ends what is queued under this lock, after its fault is recorded:
            # a request either sees the fault here or is queued in time to be ended.
            if self.failed:
                return self._ended_by_fault(request)
            self._submit(("start", holder[0]))
        return stream

    def _submit(self, command: _Command) -> None:
        with self._lock:
            if self._closing and command[0] == "start":
                raise EngineError("the engine is shutting down")
            self._commands.append(command)
            self._lock.notify()

    # worker thread ----------------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[LoadedModel]) -> None:
        try:
            loaded = load_model(self._library, self._settings, _log_progress())
            self._stop_pieces = _stop_pieces(loaded.tokenizer, self._files.eos_token_ids)
            generator = loaded.new_generator()
        except Exception as exc:
            ready.set_exception(
                EngineError(f"loading {self._settings.model_dir} failed: {describe(exc)}")
            )
            return
        ready.set_result(loaded)
        reason: FinishReason = "cancelled"
        error = None
        try:
            while generator is not None:
                generator = self._step(loaded, generator)
        except Exception as exc:
            # Not iterate() (that rebuilds the generator) but our own handling of it: a bug.
            reason, error = "error", self._fault.record(exc)
        finally:
            self._finish_all(reason, error)
            loaded.unload()

    def _step(self, loaded: LoadedModel, generator: Any) -> Any:
        """One round: commands, then one iterate(); returns the generator to go on with, or
        None to stop."""
        with self._lock:
            while not self._closing and not self._commands and not generator.num_remaining_jobs():
                self._lock.wait()
            if self._closing:
                return None
            commands = deque(self._commands)
            self._commands.clear()
        out: _Delivery = []
        # What this step produced reaches the streams even if the step then raises.
        try:
            self._apply(loaded, generator, commands, out)
            if not generator.num_remaining_jobs():
                return generator
            try:
                results = generator.iterate()
            except Exception as exc:
                failure = exc
            else:
                self._translate(results, now_ns(), out)
                self._kv_usage = len(generator.referenced_pages) / generator.max_pages
                return generator
        finally:
            deliver_threadsafe(out)
        return self._rebuild(loaded, generator, failure)

    def _apply(
        self, loaded: LoadedModel, generator: Any, commands: deque[_Command], out: _Delivery
    ) -> None:
        """Run the commands in order; if one raises, it and the rest go back to the queue, so
        that the requests they carry are ended, not lost."""
        try:
            while commands:
                kind, item = commands[0]
                if kind == "start":
                    self._enqueue(loaded, generator, item, out)
                else:
                    self._cancel(generator, item, out)
                commands.popleft()
        except Exception:
            with self._lock:
                self._commands.extendleft(reversed(commands))
            raise

    def _enqueue(self, loaded: LoadedModel, generator: Any, item: _Request, out: _Delivery) -> None:
        request = item.request
        try:
            job = new_job(
                self._library,
                request.prompt_tokens,
                request.params,
                eos_token_ids=self._files.eos_token_ids,
                draft_tokens=loaded.draft_tokens,
                identifier=request.request_id,
            )
            generator.enqueue(job)
        except (AssertionError, ValueError) as exc:
            # enqueue() asserts that the job's pages fit in the cache; check_fits refuses such
            # requests with a 400 first, so this is a safety net, not a crash.
            out.append((item.stream, item.completion("error", describe(exc))))
            return
        item.job = job
        item.enqueued_ns = now_ns()
        self._jobs[job] = item
        # The generator reads the prompt in chunks of chunk_tokens, its own step budget; it
        # says nothing of its progress, so the key is charged for the prompt at once.
        request.tenant.charge(prompt=len(request.prompt_tokens))

    def _cancel(self, generator: Any, item: _Request, out: _Delivery) -> None:
        if self._jobs.pop(item.job, None) is None:
            return  # finished (or failed) before the cancel arrived: nothing to do
        generator.cancel(item.job)
        self._cancelled_total += 1
        out.append((item.stream, item.completion("cancelled")))

    def _translate(self, results: list[dict[str, Any]], stamp: int, out: _Delivery) -> None:
        for result in results:
            item = self._jobs.get(result["job"])
            if item is None:
                continue
            if result["stage"] == "started":
                item.started_ns = stamp
            if result["stage"] != "streaming":
                continue
            text, ids = result.get("text", ""), _token_ids(result.get("token_ids"))
            if result["eos"] and result.get("eos_reason") == "stop_token":
                text, ids = self._released_at_stop_token(result, text, ids)
            if text or ids:
                item.first_token_ns = item.first_token_ns or stamp
                item.completion_tokens += len(ids)
                item.request.tenant.charge(generated=len(ids))
                item.unsent_ids += ids
            if text or (result["eos"] and item.unsent_ids):
                out.append((item.stream, TokenDelta(text, tuple(item.unsent_ids), stamp)))
                item.unsent_ids.clear()
            if result["eos"]:
                del self._jobs[result["job"]]
                out.append((item.stream, _finished(item, result)))

    def _released_at_stop_token(
        self, result: dict[str, Any], text: str, ids: tuple[int, ...]
    ) -> tuple[str, tuple[int, ...]]:
        """Text the library still held when a stop token came, without the stop token itself.

        The library puts it under "held" instead of emitting it (a partial stop string, an
        incomplete character); the other engines send such text, so this one does too.
        """
        held = result.get("held") or {}
        held_ids = _token_ids(held.get("token_ids"))[:-1]
        held_text = held.get("text", "")
        piece = self._stop_pieces.get(int(result["eos_triggering_token_id"]), "")
        if piece and held_text.endswith(piece):
            held_text = held_text[: -len(piece)]
        return text + held_text, ids + held_ids

    def _rebuild(self, loaded: LoadedModel, broken: Any, exc: Exception) -> Any:
        """Fail what the broken generator held, then build a new one over the same model."""
        self._healthy = False
        message = describe(exc)
        log.error(
            "ExLlamaV2 generator failed (%s); failing %d requests and rebuilding it",
            message,
            len(self._jobs),
        )
        deliver_threadsafe(
            [(item.stream, item.completion("error", message)) for item in self._jobs.values()]
        )
        self._jobs.clear()
        _discard(broken)
        wait = 1.0
        while True:
            try:
                generator = loaded.new_generator()
                break
            except Exception as again:
                log.error("rebuilding the generator failed (%s); retrying", describe(again))
                with self._lock:
                    if self._lock.wait_for(lambda: self._closing, wait):
                        return None
                wait = min(wait * 2, _LONGEST_REBUILD_WAIT_SECONDS)
        self._kv_usage = 0.0
        self._healthy = True
        log.info("ExLlamaV2 generator rebuilt; serving again")
        return generator

    def _finish_all(self, reason: FinishReason, error: str | None) -> None:
        with self._lock:
            waiting = [item for kind, item in self._commands if kind == "start"]
            self._commands.clear()
        items = [*self._jobs.values(), *waiting]
        self._jobs.clear()
        deliver_threadsafe([(item.stream, item.completion(reason, error)) for item in items])


def _token_ids(tensor: Any) -> tuple[int, ...]:
    """A (1, n) tensor of token ids as Python ints (n is shape[-1]); None when absent."""
    if tensor is None or tensor.shape[-1] == 0:
        return ()
    return tuple(int(t) for t in tensor[0].tolist())


def _stop_pieces(tokenizer: Any, eos_token_ids: Sequence[int]) -> dict[int, str]:
    # The text a stop token adds to the job's held text (decode_special_tokens=False).
    pieces = tokenizer.get_id_to_piece_list(False)
    return {i: pieces[i] for i in eos_token_ids if 0 <= i < len(pieces)}


def _finished(item: _Request, result: dict[str, Any]) -> Completion:
    """The library's own counts and timings (float seconds) from a job's last result."""
    reason: FinishReason = "length" if result["eos_reason"] == "max_new_tokens" else "stop"
    return Completion(
        finish_reason=reason,
        prompt_tokens=int(result["prompt_tokens"]),
        completion_tokens=item.completion_tokens,
        cached_tokens=int(result["cached_tokens"]),
        # The wait for the worker to pick the request up, plus the generator's own queue.
        queue_ns=item.enqueued_ns - item.submitted_ns + _ns(result["time_enqueued"]),
        prefill_ns=_ns(result["time_prefill"]),
        decode_ns=_ns(result["time_generate"]),
    )


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def _discard(generator: Any) -> None:
    # The generator's sampling and filter thread pools outlive it unless shut down.
    for name in ("sampling_pool", "filter_pool"):
        pool = getattr(generator, name, None)
        if pool is not None:
            pool.shutdown(wait=False)


def _log_progress() -> Any:
    reported: dict[str, int] = {}

    def progress(which: str, done: int, total: int) -> None:
        # About every tenth of the modules, and the last.
        step = done * 10 // max(total, 1)
        if reported.get(which, -1) < step:
            reported[which] = step
            log.info("loading %s: module %d of %d", which, done, total)

    return progress
