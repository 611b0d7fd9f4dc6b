"""ExLlamaV2DynamicGenerator and ExLlamaV2DynamicJob, reduced to their contract.

Kept from exllamav2/generator/dynamic.py (v0.3.2), with the line each comes from: the
constructor's checks, the page table (256-token pages, prefix pages shared by hash, the oldest
free page reused first), enqueue's page assertion, the start/prefill/generate order of iterate(),
the result dicts and their keys, when text is held back, and cancel. Left out: CUDA, logits and
sampling (the next token is the model's script), speculative decoding (one token per iterate
even with a draft model), banned strings, filters, CFG, incomplete-UTF-8 holding (the double's
pieces are whole characters), re-hashing pages filled by generated tokens, and defragmentation.

For tests only, class attributes: `failure` is raised by the iterate() call that comes after
`fail_after_iterations` more successful ones, and `construction_gate`, when not None, makes
constructors wait until that event is set.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from tests.exllamav2_double import torch_double
from tests.exllamav2_double.attn import assert_paged_attn
from tests.exllamav2_double.cache import ExLlamaV2Cache_8bit
from tests.exllamav2_double.generator.sampler import ExLlamaV2Sampler

# exllamav2/generator/dynamic.py:33
PAGED_PAGE_SIZE = 256

_hashes = itertools.count(1)


def _random_hash() -> tuple[str, int]:
    # exllamav2/generator/dynamic.py:53-57: a hash no content can have.
    return ("unique", next(_hashes))


class _Page:
    # exllamav2/generator/dynamic.py:60-82 (CachePage), the fields the double needs.
    def __init__(self, index: int) -> None:
        self.page_index = index
        self.phash: Any = _random_hash()
        self.ref_count = 0
        self.access_serial = index
        self.kv_position = 0
        self.sequence: list[int] = []
        self.kv_position_revert = 0


def partial_strings_match(text: str, strings: list[str]) -> int:
    """exllamav2_ext/cpp/generator.cpp:12-54, in code points: the first string (in list order)
    that occurs in full gives its start, or -2 as soon as one is cut off by the end of the
    text; -1 when none."""
    for s in strings:
        a = 0
        while a < len(text):
            a0, b = a, 0
            while text[a] == s[b]:
                a += 1
                b += 1
                if b == len(s):
                    return a0
                if a == len(text):
                    return -2
            a = a0 + 1
    return -1


class ExLlamaV2DynamicGenerator:
    # A forward pass takes time and releases the GIL (CUDA work); so does the double's.
    seconds_per_iteration: ClassVar[float] = 0.0005
    fail_after_iterations: ClassVar[int | None] = None
    failure: ClassVar[BaseException] = RuntimeError("CUDA error: an illegal memory access")
    construction_gate: ClassVar[threading.Event | None] = None

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokenizer: Any,
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        max_chunk_size: int | None = None,
        max_q_size: int = 8,
        draft_model: Any = None,
        draft_cache: Any = None,
        num_draft_tokens: int = 4,
        use_ngram_draft: bool = False,
        max_ngram: int = 4,
        max_sampling_threads: int = 16,
        min_sampling_threads: int = 3,
        paged: bool = True,
        filter_background_eval: bool = True,
        **kwargs: Any,
    ) -> None:
        gate = ExLlamaV2DynamicGenerator.construction_gate
        if gate is not None:
            gate.wait()
        cfg = model.config
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.draft_model, self.draft_cache = draft_model, draft_cache
        # exllamav2/generator/dynamic.py:338-352
        if draft_model or use_ngram_draft:
            assert num_draft_tokens <= max_q_size, (
                "num_draft_tokens cannot be larger than max_q_size."
            )
            self.num_draft_tokens = num_draft_tokens
        else:
            self.num_draft_tokens = 0
        if draft_model:
            assert draft_cache is not None, "Must supply cache for draft model"
            assert draft_cache.max_seq_len == cache.max_seq_len, (
                "Cache and draft cache must be same dimensions"
            )
            assert draft_model.config.max_seq_len >= cfg.max_seq_len, (
                "Draft model seq len must be >= model seq len"
            )
        self.use_ngram_draft = use_ngram_draft
        # exllamav2/generator/dynamic.py:354-360
        if paged:
            assert_paged_attn()
            assert not cfg.no_flash_attn, (
                "Paged mode requires flash-attn, but flash-attn is disabled in model config."
            )
        assert not isinstance(cache, ExLlamaV2Cache_8bit), (
            "Dynamic generator does not currently work with 8-bit cache. Use either FP16 or Q4."
        )
        # exllamav2/generator/dynamic.py:362-371
        if not max_batch_size:
            self.max_batch_size = cfg.max_input_len // max_q_size
        else:
            assert max_q_size * max_batch_size <= cfg.max_batch_size * cfg.max_input_len, (
                f"Model has max_batch_size * max_input_len = {cfg.max_batch_size} * "
                f"{cfg.max_input_len} tokens, generator requires max_batch_size * max_q_size = "
                f"{max_batch_size} * {max_q_size} tokens."
            )
            self.max_batch_size = max_batch_size
        # exllamav2/generator/dynamic.py:373-379
        if max_seq_len is not None:
            assert max_seq_len <= cfg.max_seq_len
            self.max_seq_len = max_seq_len
        else:
            self.max_seq_len = cfg.max_seq_len
        # exllamav2/generator/dynamic.py:383-392: unpaged, one page holds the whole cache.
        self.paged = paged
        self.page_size = PAGED_PAGE_SIZE if paged else cache.max_seq_len
        assert cache.batch_size == 1, "DynamicGenerator requires cache to have batch_size = 1"
        assert cache.max_seq_len % PAGED_PAGE_SIZE == 0, (
            f"cache.max_seq_len must be multiple of {PAGED_PAGE_SIZE}, received {cache.max_seq_len}"
        )
        self.max_pages = max(cache.max_seq_len // self.page_size, 1)
        self.max_total_tokens = cache.max_seq_len
        self.reset_page_table()
        # exllamav2/generator/dynamic.py:396-408
        if max_chunk_size is not None:
            assert max_chunk_size <= cfg.max_input_len, (
                f"max_chunk_size must be less than model max_input_len ({cfg.max_input_len}), "
                f"received {max_chunk_size}"
            )
            self.max_chunk_size = max_chunk_size
        else:
            self.max_chunk_size = cfg.max_input_len
        if paged:
            assert self.max_chunk_size % self.page_size == 0, (
                f"max_chunk_size must be multiple of {self.page_size}, received {max_chunk_size}"
            )
        # exllamav2/generator/dynamic.py:412-414
        self.job_serial = 0
        self.pending_jobs: list[ExLlamaV2DynamicJob] = []
        self.active_jobs: list[ExLlamaV2DynamicJob] = []
        # exllamav2/generator/dynamic.py:451-461: pools are made here and never shut down.
        if max_sampling_threads > 1:
            self.sampling_pool = ThreadPoolExecutor(max_workers=max_sampling_threads)
        self.filter_pool = ThreadPoolExecutor(max_workers=16) if filter_background_eval else None
        self._script: list[int] | None = None

    def reset_page_table(self) -> None:
        # exllamav2/generator/dynamic.py:483-511: every page free, oldest index first.
        self.referenced_pages: dict[Any, _Page] = {}
        self.unreferenced_pages: dict[Any, _Page] = {}
        self.all_pages = [_Page(i) for i in range(self.max_pages)]
        for page in self.all_pages:
            self.unreferenced_pages[page.phash] = page
        self.access_serial = self.max_pages

    def num_remaining_jobs(self) -> int:
        # exllamav2/generator/dynamic.py:816-817
        return len(self.pending_jobs) + len(self.active_jobs)

    def enqueue(self, job: ExLlamaV2DynamicJob | list[ExLlamaV2DynamicJob]) -> int | list[int]:
        # exllamav2/generator/dynamic.py:832-853
        if isinstance(job, list):
            return [self.enqueue(j) for j in job]  # type: ignore[misc]
        job.prepare_for_queue(self, self.job_serial)
        self.job_serial += 1
        self.pending_jobs.append(job)
        job.time_enqueue = time.time()
        return job.serial_number

    def cancel(self, job: ExLlamaV2DynamicJob) -> None:
        # exllamav2/generator/dynamic.py:856-873: a job in neither list is ignored.
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            job.deallocate_pages()
            self.active_jobs.remove(job)

    def iterate(self) -> list[dict[str, Any]]:
        cls = ExLlamaV2DynamicGenerator
        if cls.fail_after_iterations is not None:
            cls.fail_after_iterations -= 1
            if cls.fail_after_iterations < 0:
                cls.fail_after_iterations = None
                raise cls.failure
        # exllamav2/generator/dynamic.py:979-1005: start jobs, one prefill round each, then one
        # generation step for every job whose prefill is done (also one finished just now).
        time.sleep(cls.seconds_per_iteration)
        results: list[dict[str, Any]] = []
        self.iterate_start_jobs(results)
        for job in self.active_jobs:
            job.prefill(results)
        self.iterate_gen(results)
        return results

    def iterate_start_jobs(self, results: list[dict[str, Any]]) -> None:
        # exllamav2/generator/dynamic.py:1296-1347
        current_max_batch = len(self.active_jobs)
        if not (
            self.unreferenced_pages
            and self.pending_jobs
            and current_max_batch < self.max_batch_size
        ):
            return
        skipped: list[ExLlamaV2DynamicJob] = []
        for job in self.pending_jobs.copy():
            if (
                1 + current_max_batch > self.max_batch_size
                or job.current_new_pages_required() > len(self.unreferenced_pages)
            ):
                skipped.append(job)
                continue
            # A job skipped max_skips times holds back the ones behind it (1318-1324).
            if any(j.skips >= j.max_skips for j in skipped):
                return
            for j in skipped:
                j.skips += 1
            self.pending_jobs.remove(job)
            self.active_jobs.append(job)
            job.allocate_pages()
            current_max_batch += 1
            result = {"job": job, "stage": "started", "eos": False, "serial": job.serial_number}
            if job.identifier is not None:
                result["identifier"] = job.identifier
            results.append(result)

    def iterate_gen(self, results: list[dict[str, Any]]) -> None:
        # exllamav2/generator/dynamic.py:1139-1295
        completed = []
        for job in self.active_jobs:
            if not job.is_prefill_done():
                continue
            if job.time_first_token is None:
                job.time_first_token = time.time()  # 1178-1179, before the token is sampled
            token = self.model_next_token(job)
            if job.receive_sample(token, results):
                completed.append(job)
        # 1286-1290: a finished job's pages are released at once.
        for job in completed:
            job.deallocate_pages()
            self.active_jobs.remove(job)

    def model_next_token(self, job: ExLlamaV2DynamicJob) -> int:
        """The double's forward pass and sampler: the script, then an EOS id, repeated. A
        special token's text in the script is that token, as a model may generate one."""
        if self._script is None:
            tokenizer = self.tokenizer
            self._script = [
                *tokenizer.encode(self.model.script, encode_special_tokens=True)[0].tolist(),
                tokenizer.eos_token_id,
            ]
        return self._script[job.new_tokens % len(self._script)]


class ExLlamaV2DynamicJob:
    def __init__(
        self,
        input_ids: Any,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        max_skips: int | None = 4,
        gen_settings: ExLlamaV2Sampler.Settings | None = None,
        seed: int | None = None,
        stop_conditions: list[Any] | tuple[Any, ...] | set[Any] | None = None,
        decode_special_tokens: bool = False,
        return_top_tokens: int = 0,
        return_logits: bool = False,
        return_probs: bool = False,
        filters: list[Any] | None = None,
        filter_prefer_eos: bool = False,
        token_healing: bool = False,
        identifier: object | None = None,
        banned_strings: list[str] | None = None,
        embeddings: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # exllamav2/generator/dynamic.py:1691-1692: a (CPU) tensor, not a list of ints.
        assert input_ids.device.type == "cpu", "input_ids must reside in system memory"
        self.generator: ExLlamaV2DynamicGenerator | None = None
        self.serial_number: int | None = None
        self.identifier = identifier
        self.max_skips = max_skips
        # exllamav2/generator/dynamic.py:1701-1702: no settings means the library's defaults.
        self.gen_settings = (
            gen_settings if gen_settings is not None else ExLlamaV2Sampler.Settings()
        )
        # exllamav2/generator/dynamic.py:1717-1721
        assert input_ids.shape[-1] > 0, "Input IDs cannot be empty."
        assert input_ids.shape[0] == 1, (
            "input_ids must be [1, seq_len] tensor or list of [1, seq_len] tensors"
        )
        self.input_ids: list[int] = input_ids[0].tolist()
        self.sequence_ids: list[int] = list(self.input_ids)
        self.kv_position = 0
        self.prefill_complete = False
        self.allocated_pages: list[_Page] = []
        # exllamav2/generator/dynamic.py:1735-1740
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.new_tokens = 0
        self.rng = random.Random() if seed is None else random.Random(seed)
        self.seed = seed
        self.decode_special_tokens = decode_special_tokens
        # exllamav2/generator/dynamic.py:1750-1764: ints are stop tokens, strs stop strings,
        # anything else (a numpy int, a tensor) is refused.
        self.stop_strings: set[str] = set()
        self.stop_tokens: set[int] = set()
        for t in stop_conditions or ():
            if isinstance(t, int):
                self.stop_tokens.add(t)
            elif isinstance(t, str):
                self.stop_strings.add(t)
            else:
                raise ValueError("Unsupported type in stop_conditions")
        self.stop_strings_list = list(self.stop_strings)
        self.stop_conditions = stop_conditions
        # exllamav2/generator/dynamic.py:1781-1791
        self.time_enqueue: float | None = None
        self.time_first_prefill: float | None = None
        self.time_first_token: float | None = None
        self.time_last_token: float | None = None
        self.cached_pages = 0
        self.cached_tokens = 0
        self.is_finished = False

    def is_prefill_done(self) -> bool:
        # exllamav2/generator/dynamic.py:1818-1819: all but the last prompt token are in cache.
        return self.kv_position == len(self.sequence_ids) - 1

    def prepare_for_queue(self, generator: ExLlamaV2DynamicGenerator, serial_number: int) -> None:
        # exllamav2/generator/dynamic.py:2244-2300
        self.serial_number = serial_number
        self.generator = generator
        self.skips = 0
        page_size = generator.page_size
        max_len = len(self.sequence_ids) + self.max_new_tokens
        context_pages = (len(self.sequence_ids) - 1) // page_size
        total_pages = (max_len + page_size - 1) // page_size
        self.page_hashes = []
        previous: Any = None
        for i in range(context_pages):
            previous = (previous, tuple(self.sequence_ids[i * page_size : (i + 1) * page_size]))
            self.page_hashes.append(previous)
        self.new_unique_pages = total_pages - context_pages
        total_pages = len(set(self.page_hashes)) + self.new_unique_pages
        assert total_pages <= generator.max_pages, (
            f"Job requires {total_pages} pages (only {generator.max_pages} available) and cannot "
            f"be enqueued. Total cache allocated is {generator.max_pages} * {page_size} = "
            f"{generator.max_total_tokens} tokens"
        )
        self.held_text = ""
        self.held_tokens: list[int] = []
        self.full_completion = ""

    def current_new_pages_required(self) -> int:
        # exllamav2/generator/dynamic.py:2320-2327
        generator = self._generator()
        shared = sum(1 for h in set(self.page_hashes) if h in generator.referenced_pages)
        return len(set(self.page_hashes)) - shared + self.new_unique_pages

    def allocate_pages(self) -> None:
        # exllamav2/generator/dynamic.py:2534-2629: prompt pages by hash (a referenced page is
        # shared, a free page with that hash reused), the rest from the oldest free pages.
        generator = self._generator()
        for h in self.page_hashes:
            generator.access_serial += 1
            page = generator.referenced_pages.get(h) or generator.unreferenced_pages.get(h)
            if page is None:
                page = self._oldest_free(generator)
                del generator.unreferenced_pages[page.phash]
                page.phash, page.kv_position, page.sequence = h, 0, []
                generator.unreferenced_pages[h] = page
            self._add_ref(generator, page)
        for _ in range(self.new_unique_pages):
            generator.access_serial += 1
            page = self._oldest_free(generator)
            page.kv_position_revert = page.kv_position
            del generator.unreferenced_pages[page.phash]
            page.phash, page.kv_position = _random_hash(), 0
            generator.unreferenced_pages[page.phash] = page
            self._add_ref(generator, page)
        # 2612-2618: whole pages already in the cache are skipped and counted as cached.
        for page in self.allocated_pages:
            if page.kv_position != generator.page_size:
                break
            self.kv_position += generator.page_size
            self.cached_pages += 1

    def _add_ref(self, generator: ExLlamaV2DynamicGenerator, page: _Page) -> None:
        # exllamav2/generator/dynamic.py:106-113 (CachePage.add_ref)
        if page.ref_count == 0:
            del generator.unreferenced_pages[page.phash]
            generator.referenced_pages[page.phash] = page
        page.ref_count += 1
        page.access_serial = max(generator.access_serial, page.access_serial)
        self.allocated_pages.append(page)

    @staticmethod
    def _oldest_free(generator: ExLlamaV2DynamicGenerator) -> _Page:
        return min(generator.unreferenced_pages.values(), key=lambda p: p.access_serial)

    def deallocate_pages(self) -> None:
        # exllamav2/generator/dynamic.py:2631-2642 with CachePage.sub_ref (139-149): a page
        # nobody references is free again but keeps its content for a later prefix match.
        generator = self._generator()
        if not generator.paged:
            generator.all_pages[0].kv_position_revert = generator.all_pages[0].kv_position
        for page in self.allocated_pages:
            page.ref_count -= 1
            if page.ref_count == 0:
                del generator.referenced_pages[page.phash]
                generator.unreferenced_pages[page.phash] = page
        self.allocated_pages = []

    def prefill(self, results: list[dict[str, Any]]) -> None:
        # exllamav2/generator/dynamic.py:2330-2519: one chunk of the prompt per iterate.
        generator = self._generator()
        page_size = generator.page_size
        if self.time_first_prefill is None:
            self.time_first_prefill = time.time()
        if self.prefill_complete:
            return
        last = len(self.sequence_ids) - 1
        progress = 0
        if not generator.paged and self.kv_position == 0:
            # 2418-2431: unpaged, the single page's previous tokens count as cached.
            page = generator.all_pages[0]
            limit = min(page.kv_position_revert, last)
            match = next(
                (i for i in range(limit) if page.sequence[i] != self.sequence_ids[i]), limit
            )
            self.kv_position = match
            self.cached_tokens += match
            progress += match
        start = self.kv_position
        end = start + generator.max_chunk_size
        if generator.paged:
            end = (end // page_size) * page_size  # 2344-2347
        end = min(end, last)
        if end > start:
            self.kv_position = end
            progress += end - start
            for index, page in enumerate(self.allocated_pages):
                page.kv_position = min(max(end - index * page_size, 0), page_size)
                page.sequence = self.sequence_ids[index * page_size : (index + 1) * page_size]
        if self.kv_position >= last:
            self.prefill_complete = True
        if progress:
            # 2507-2517
            result = {
                "job": self,
                "stage": "prefill",
                "eos": False,
                "curr_progress": self.kv_position,
                "max_progress": last,
                "serial": self.serial_number,
            }
            if self.identifier is not None:
                result["identifier"] = self.identifier
            results.append(result)

    def receive_sample(self, token: int, results: list[dict[str, Any]]) -> bool:
        """exllamav2/generator/dynamic.py:1905-2241; True when the job has ended."""
        generator = self._generator()
        # 1939-1947
        self.new_tokens += 1
        self.sequence_ids.append(token)
        self.kv_position += 1
        # 2102-2110: the token's piece joins the held text (special tokens are "" unless
        # decode_special_tokens).
        pieces = generator.tokenizer.get_id_to_piece_list(self.decode_special_tokens)
        self.held_text += pieces[token]
        self.held_tokens.append(token)
        # 2121-2122: a stop token ends the job; what is held is NOT emitted (see "held").
        if token in self.stop_tokens:
            return self.emit(results, emit_eos=True, eos_reason="stop_token", stop_token=token)
        # 2127-2128
        if self.new_tokens >= self.max_new_tokens - generator.num_draft_tokens:
            return self.emit(results, emit_eos=True, emit_held=True, eos_reason="max_new_tokens")
        # 2216-2238: stop strings; text is held while its end could begin one.
        if self.stop_strings_list:
            match = partial_strings_match(self.held_text, self.stop_strings_list)
            if match >= 0:
                held = self.held_text[match:]
                self.held_text = self.held_text[:match]
                for s in self.stop_strings:
                    if held.startswith(s):
                        return self.emit(
                            results,
                            emit_eos=True,
                            emit_held=True,
                            eos_reason="stop_string",
                            stop_string=s,
                            rem_held_text=held,
                        )
                raise AssertionError("Detected stop string but couldn't identify it (logic error)")
            if match == -2:
                return self.emit(results)
        # 2241
        return self.emit(results, emit_held=True)

    def emit(
        self,
        results: list[dict[str, Any]],
        emit_eos: bool = False,
        eos_reason: str | None = None,
        emit_held: bool = False,
        stop_token: int | None = None,
        stop_string: str | None = None,
        rem_held_text: str | None = None,
    ) -> bool:
        # exllamav2/generator/dynamic.py:2005-2100
        generator = self._generator()
        r: dict[str, Any] = {
            "job": self,
            "stage": "streaming",
            "eos": emit_eos,
            "serial": self.serial_number,
        }
        if eos_reason is not None:
            r["eos_reason"] = eos_reason
            if eos_reason == "stop_token":
                assert stop_token is not None
                pieces = generator.tokenizer.get_id_to_piece_list(True)
                r["eos_triggering_token_id"] = stop_token
                r["eos_triggering_token_str"] = pieces[stop_token]
            if eos_reason == "stop_string":
                r["eos_triggering_string"] = stop_string
        # 2035-2044: held text and tokens go out together; no "text" key when none is held.
        if emit_held:
            if self.held_text != "":
                self.full_completion += self.held_text
                r["text"] = self.held_text
                self.held_text = ""
            if self.held_tokens:
                r["token_ids"] = torch_double.row(self.held_tokens)
                self.held_tokens = []
        # 2059-2091: counts and timings (time.time() differences) only on the last result.
        if emit_eos:
            assert self.time_enqueue is not None and self.time_first_prefill is not None
            assert self.time_first_token is not None
            self.is_finished = True
            self.time_last_token = time.time()
            r.update(
                {
                    "full_completion": self.full_completion,
                    "new_tokens": self.new_tokens,
                    "prompt_tokens": len(self.input_ids),
                    "time_enqueued": self.time_first_prefill - self.time_enqueue,
                    "time_prefill": self.time_first_token - self.time_first_prefill,
                    "time_generate": self.time_last_token - self.time_first_token,
                    "cached_pages": self.cached_pages,
                    "cached_tokens": self.cached_pages * generator.page_size + self.cached_tokens,
                }
            )
            if generator.draft_model or generator.use_ngram_draft:
                r["accepted_draft_tokens"] = 0
                r["rejected_draft_tokens"] = 0
            if eos_reason == "stop_string":
                self.held_text = rem_held_text or ""
            held: dict[str, Any] = {}
            if self.held_text:
                held["text"] = self.held_text
            if self.held_tokens:
                held["token_ids"] = torch_double.row(self.held_tokens)
            if held:
                r["held"] = held
        # 2094-2095
        if self.identifier is not None:
            r["identifier"] = self.identifier
        results.append(r)
        return emit_eos

    def _generator(self) -> ExLlamaV2DynamicGenerator:
        assert self.generator is not None, "the job was never enqueued"
        return self.generator
