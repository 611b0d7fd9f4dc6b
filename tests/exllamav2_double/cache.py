"""The KV cache classes: sizes and the bytes they take, no tensors."""

from __future__ import annotations

from typing import Any

from tests.exllamav2_double import torch_double


class ExLlamaV2CacheBase:
    # (K, V) storage elements per byte and whether it keeps fp16 scales per 32 elements.
    weights_per_element: tuple[float, float] = (0.5, 0.5)
    has_scales = False

    def __init__(
        self,
        model: Any,
        batch_size: int = 1,
        max_seq_len: int = -1,
        copy_from: Any = None,
        lazy: bool = False,
        num_key_value_heads: int | None = None,
        fixed_device: int | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        # exllamav2/cache.py:49: -1 means the model's max_seq_len.
        self.max_seq_len = max_seq_len if max_seq_len != -1 else cfg.max_seq_len
        self.batch_size = batch_size
        self.num_key_value_heads = num_key_value_heads or cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.current_seq_len = 0
        if self.has_scales:
            # exllamav2/cache.py:450-459: Q caches round the length to whole quant blocks.
            q_block = 1
            while (self.num_key_value_heads * self.head_dim * q_block) % 512:
                q_block += 1
            self.max_seq_len = -(-self.max_seq_len // q_block) * q_block
        self.lazy = lazy
        # exllamav2/cache.py:85-110: a lazy cache allocates while load_autosplit places layers.
        if not lazy:
            self.allocate()

    def bytes_per_token_per_layer(self) -> int:
        # exllamav2/cache.py:66-69 shapes: K and V of heads * head_dim elements, plus fp16
        # scales per 32 elements for the Q caches.
        elements = self.num_key_value_heads * self.head_dim
        k, v = self.weights_per_element
        scales = 2 * 2 * (elements // 32) if self.has_scales else 0
        return int(elements * k + elements * v) + scales

    def allocate(self) -> None:
        layers = self.model.config.num_hidden_layers
        size = self.max_seq_len * layers * self.bytes_per_token_per_layer()
        if self.has_scales:
            # exllamav2/cache.py:464-468: one fp16 K and V of the whole length per device.
            size += 2 * 2 * self.max_seq_len * self.num_key_value_heads * self.head_dim
        torch_double.cuda.allocated[0] = torch_double.cuda.allocated.get(0, 0) + size


class ExLlamaV2Cache(ExLlamaV2CacheBase):
    # exllamav2/cache.py:245-254: torch.half, one element per element: 2 bytes each.
    weights_per_element = (2.0, 2.0)


class ExLlamaV2Cache_Q4(ExLlamaV2CacheBase):
    # exllamav2/cache.py:596-606: uint8 storage, 2 weights per byte for K and V.
    weights_per_element = (0.5, 0.5)
    has_scales = True


class ExLlamaV2Cache_Q6(ExLlamaV2CacheBase):
    # exllamav2/cache.py:621-631: K one weight per byte, V two.
    weights_per_element = (1.0, 0.5)
    has_scales = True


class ExLlamaV2Cache_Q8(ExLlamaV2CacheBase):
    # exllamav2/cache.py:646-656: one weight per byte for K and V.
    weights_per_element = (1.0, 1.0)
    has_scales = True


class ExLlamaV2Cache_8bit(ExLlamaV2CacheBase):
    # exllamav2/cache.py:306-340: FP8; the dynamic generator refuses it (dynamic.py:359-360).
    weights_per_element = (1.0, 1.0)
