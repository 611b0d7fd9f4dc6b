"""The NumPy sampler against llama.cpp's own samplers: the same tokens survive top-k, top-p and
min-p, penalties move the same tokens, and draws follow the softmax they should."""

from __future__ import annotations

import ctypes
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
import pytest

from llmserve.server.engines.base import SamplingParams
from llmserve.server.engines.llamacpp.sampling import TokenSampler

VOCAB = 49_152


def _logits(seed: int, spread: float) -> np.ndarray:
    """Logits shaped like a language model's: a few likely tokens over a long flat tail."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(VOCAB).astype(np.float32) * spread
    logits[rng.choice(VOCAB, 20, replace=False)] += rng.uniform(2, 12, 20).astype(np.float32)
    # As the engine hands them over: a view of llama.cpp's buffer that must not be written.
    logits.flags.writeable = False
    return logits


def _llama_chain(params: SamplingParams, accepted: Sequence[int] = ()) -> Any:
    lib = llama_cpp
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    penalised = (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )
    if penalised:
        lib.llama_sampler_chain_add(
            chain,
            lib.llama_sampler_init_penalties(
                VOCAB,
                params.max_tokens,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            ),
        )
    if params.top_k > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
    if params.temperature == 0.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    for token in accepted:
        lib.llama_sampler_accept(chain, token)
    return chain


def _llama_apply(chain: Any, logits: np.ndarray) -> tuple[set[int], int]:
    """The candidate ids llama.cpp's chain leaves, and the one it selected (-1: none)."""
    data = (llama_cpp.llama_token_data * VOCAB)()
    for i, value in enumerate(logits.tolist()):
        data[i].id, data[i].logit, data[i].p = i, value, 0.0
    array = llama_cpp.llama_token_data_array(data, VOCAB, -1, False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
    kept = {data[i].id for i in range(array.size)}
    selected = data[array.selected].id if array.selected >= 0 else -1
    llama_cpp.llama_sampler_free(chain)
    return kept, selected


def _exact_nucleus_size(logits: np.ndarray, top_p: float) -> int:
    weights = np.sort(np.exp(logits.astype(np.float64) - logits.max()))[::-1]
    return int(np.searchsorted(np.cumsum(weights) / weights.sum(), top_p)) + 1


FILTERS = [
    {"top_k": 40},
    {"top_k": 1},
    {"top_k": 5000},
    {"top_p": 0.9},
    {"top_p": 0.5},
    {"top_p": 0.999},
    {"min_p": 0.05},
    {"min_p": 0.3},
    {"top_k": 200, "top_p": 0.8, "min_p": 0.02},
]


@pytest.mark.parametrize("filters", FILTERS, ids=[str(f) for f in FILTERS])
@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_the_same_tokens_survive_the_filters_as_in_llama_cpp(
    filters: dict[str, float], spread: float
):
    params = SamplingParams(max_tokens=16, **filters)
    for seed in range(3):
        logits = _logits(seed, spread)
        ids, values = TokenSampler(params).candidates(logits)
        ours = set(range(VOCAB)) if ids is None else set(ids.tolist())
        theirs, _ = _llama_apply(_llama_chain(params), logits)
        # llama.cpp adds probabilities in single precision: a nucleus thousands of tokens deep
        # can end a little earlier or later there, but only at its least likely edge.
        differ = list(ours ^ theirs)
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert probabilities[differ].sum() < 2e-4, f"{len(ours)} kept here, {len(theirs)} there"
        assert np.all(logits[differ] <= logits[list(ours & theirs)].min())
        if "top_p" in filters and len(filters) == 1:
            assert len(ours) == _exact_nucleus_size(logits, filters["top_p"])
        assert np.array_equal(values, logits if ids is None else logits[ids])


def test_top_p_over_a_flat_distribution_keeps_just_enough_tokens():
    logits = np.zeros(1000, dtype=np.float32)
    ids, _ = TokenSampler(SamplingParams(max_tokens=1, top_p=0.5)).candidates(logits)
    assert ids is not None and len(ids) == 500


@pytest.mark.parametrize(
    "penalties",
    [
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 0.7, "presence_penalty": 0.5, "repetition_penalty": 1.3},
    ],
)
def test_penalties_move_the_same_tokens_as_llama_cpp(penalties: dict[str, float]):
    params = SamplingParams(max_tokens=64, temperature=0.0, **penalties)
    logits = _logits(7, 3.0)
    ours = TokenSampler(params)
    history: list[int] = []
    # Each greedy pick is penalised in the next step, so the leaders fall one by one.
    for _ in range(12):
        token = ours.sample(logits)
        _, theirs = _llama_apply(_llama_chain(params, history), logits)
        assert token == theirs
        history.append(token)
    assert len(set(history)) > 1, "the penalties should have moved the choice"


def test_greedy_is_the_argmax_and_leaves_the_logits_alone():
    logits = _logits(3, 3.0)
    before = logits.copy()
    assert TokenSampler(SamplingParams(max_tokens=1, temperature=0.0)).sample(logits) == int(
        np.argmax(before)
    )
    assert np.array_equal(logits, before)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_the_softmax_at_the_temperature(temperature: float):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -30.0], dtype=np.float32)
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    sampler = TokenSampler(SamplingParams(max_tokens=1, temperature=temperature, seed=1))
    draws = 20_000
    counts = Counter(sampler.sample(logits) for _ in range(draws))
    for token, p in enumerate(expected):
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(counts[token] - draws * p) <= 4 * sigma + 1, (token, counts[token], p)


def test_a_draw_never_lands_on_a_token_of_no_weight():
    # A vocabulary that is not a whole number of blocks, mostly impossible tokens.
    logits = np.full(1000, -1e9, dtype=np.float32)
    logits[[3, 511, 999]] = [0.0, 1.0, 2.0]
    sampler = TokenSampler(SamplingParams(max_tokens=1, seed=5))
    assert {sampler.sample(logits) for _ in range(3000)} == {3, 511, 999}


def test_a_seed_repeats_its_draws_and_another_seed_does_not():
    logits = _logits(11, 1.0)

    def draws(seed: int | None) -> list[int]:
        sampler = TokenSampler(SamplingParams(max_tokens=1, top_p=0.95, seed=seed))
        return [sampler.sample(logits) for _ in range(30)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)
    assert draws(-1) == draws(-1), "negative seeds are accepted and repeat too"
    assert draws(None) != draws(None)
