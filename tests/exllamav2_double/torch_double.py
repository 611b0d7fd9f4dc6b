"""The sliver of torch the ExLlamaV2 engine and this double use, installed as `torch` in tests.

PyTorch is not installed here (a CUDA build is several GB and there is no GPU), so tensors are
lists of lists with the few members the engine touches: `.shape`, indexing a row, `.tolist()`,
`.device.type`. Each is also a member of a real `torch.Tensor`, so code that runs against this
runs against torch. `cuda` pretends one GPU whose allocated bytes the double's model and cache add
to, as `torch.cuda.memory_allocated` counts tensors in the caching allocator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__version__ = "2.7.0+cu128"

long = "torch.int64"


@dataclass(frozen=True)
class device:
    type: str


class Tensor:
    """A 1-D or 2-D (list of rows) tensor of Python numbers on the CPU."""

    def __init__(self, data: list[Any], dtype: str) -> None:
        self._data = data
        self.dtype = dtype
        self.device = device("cpu")

    @property
    def shape(self) -> tuple[int, ...]:
        if self._data and isinstance(self._data[0], list):
            return (len(self._data), len(self._data[0]))
        return (len(self._data),)

    def __getitem__(self, index: int) -> Tensor:
        row = self._data[index]
        if not isinstance(row, list):
            raise TypeError("the double's tensors index rows only")
        return Tensor(list(row), self.dtype)

    def tolist(self) -> list[Any]:
        return [list(r) if isinstance(r, list) else r for r in self._data]

    def clone(self) -> Tensor:
        return Tensor(self.tolist(), self.dtype)


def tensor(data: list[Any], dtype: str | None = None) -> Tensor:
    return Tensor([list(r) if isinstance(r, list) else r for r in data], dtype or long)


def row(values: list[int]) -> Tensor:
    """A (1, n) long tensor, as the library's SeqTensor.torch() returns."""
    return Tensor([list(values)], long)


class _Cuda:
    available = True
    allocated: dict[int, int] = {}

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return 1 if self.available else 0

    def memory_allocated(self, index: int = 0) -> int:
        return self.allocated.get(index, 0)


cuda = _Cuda()
