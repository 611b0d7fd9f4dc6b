"""exllamav2.attn as far as the engine reads it: whether paged attention is available."""

from __future__ import annotations

# exllamav2/attn.py:27,47-59: True when flash-attn >= 2.5.7 imported. Tests flip it to run the
# unpaged fallback.
has_flash_attn_with_paged = True


def assert_paged_attn() -> None:
    # exllamav2/attn.py:84-90
    assert has_flash_attn_with_paged, "Paged attention required Flash Attention 2.5.7 or later"
