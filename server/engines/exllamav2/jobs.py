"""One request's ExLlamaV2DynamicJob: its sampler settings, stop conditions and token budget.

`ExLlamaV2Sampler.Settings()` defaults are not neutral (temperature 0.8, top_k 50, top_p 0.8,
repetition penalty 1.025), so every field is given explicitly from the request, and each job gets
its own Settings object because Mirostat and DRY keep state on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmserve.server.engines.base import SamplingParams

__all__ = ["new_job", "sampler_settings", "stop_conditions"]


def sampler_settings(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ExLlamaV2Sampler.Settings: every field it declares except the DRY
    n-gram state (ngram_trie, ngram_index, ngram_history), which is per-job state, not a setting.

    Off values follow the C sampler (exllamav2_ext/ext_sampling.cpp): top_k 0, top_p 0 or 1,
    min_p, top_a, tfs and typical 0 each skip their stage, and a temperature below 0.01 is greedy.
    """
    greedy = params.temperature == 0.0
    return {
        "token_repetition_penalty": params.repetition_penalty,
        # -1: the penalties look at the whole sequence, prompt included.
        "token_repetition_range": -1,
        "token_repetition_decay": 0,
        "token_frequency_penalty": params.frequency_penalty,
        "token_presence_penalty": params.presence_penalty,
        "temperature": 1.0 if greedy else params.temperature,
        "smoothing_factor": 0.0,
        "min_temp": 0.0,
        "max_temp": 0.0,
        "temp_exponent": 1.0,
        "top_k": 1 if greedy else params.top_k,
        "top_p": 1.0 if greedy else params.top_p,
        "top_a": 0.0,
        "min_p": 0.0 if greedy else params.min_p,
        "tfs": 0.0,
        "typical": 0.0,
        "skew": 0.0,
        "temperature_last": False,
        "mirostat": False,
        "mirostat_tau": 1.5,
        "mirostat_eta": 0.1,
        "mirostat_mu": None,
        "token_bias": None,
        "cfg_scale": None,
        "post_sampling_hooks": [],
        "dry_allowed_length": 2,
        "dry_base": 1.75,
        "dry_multiplier": 0.0,
        "dry_sequence_breakers": None,
        "dry_range": 0,
        "dry_max_ngram": 20,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "xtc_ignore_tokens": None,
    }


def stop_conditions(eos_token_ids: Sequence[int], params: SamplingParams) -> list[int | str]:
    """EOS ids then stop strings; the job accepts only exact `int` and `str` elements."""
    ids = [] if params.ignore_eos else [int(t) for t in eos_token_ids]
    return [*ids, *(str(s) for s in params.stop)]


def new_job(
    library: Any,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    *,
    eos_token_ids: Sequence[int],
    draft_tokens: int,
    identifier: str,
) -> Any:
    """Build the job; call on the generator's thread (it makes torch tensors)."""
    torch = library.torch
    generator = library.generator
    return generator.ExLlamaV2DynamicJob(
        input_ids=torch.tensor([list(prompt_tokens)], dtype=torch.long),
        # With speculative decoding the job ends `num_draft_tokens` early (dynamic.py), so the
        # budget is raised by that much to give exactly max_tokens.
        max_new_tokens=params.max_tokens + draft_tokens,
        gen_settings=generator.ExLlamaV2Sampler.Settings(**sampler_settings(params)),
        seed=params.seed,
        stop_conditions=stop_conditions(eos_token_ids, params),
        decode_special_tokens=False,
        identifier=identifier,
    )
