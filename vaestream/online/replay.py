"""The replay buffer of online learning: a ring of the most recent model inputs, sampled uniformly."""

from __future__ import annotations

import numpy as np


class ReplayBuffer:
    """A ring of the ``capacity`` most recent records ``[capacity, D]`` (uint8 or float32 model inputs)."""

    def __init__(self, capacity: int, dim: int, dtype: np.dtype):
        self.capacity, self.dim = int(capacity), int(dim)
        self.data = np.zeros((self.capacity, self.dim), dtype)
        self.size = 0    # filled slots
        self.next = 0    # where the next record goes

    def add(self, x: np.ndarray) -> None:
        """Append records ``[n, D]`` (the oldest are overwritten when full)."""
        x = np.asarray(x).reshape(len(x), self.dim)
        if len(x) >= self.capacity:
            self.data[:] = x[-self.capacity:]
            self.size, self.next = self.capacity, 0
            return
        end = self.next + len(x)
        if end <= self.capacity:
            self.data[self.next:end] = x
        else:
            k = self.capacity - self.next
            self.data[self.next:] = x[:k]
            self.data[:end - self.capacity] = x[k:]
        self.next = end % self.capacity
        self.size = min(self.capacity, self.size + len(x))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` records drawn uniformly with replacement, ``[n, D]``."""
        return self.data[rng.integers(0, self.size, size=n)]

    def contents(self) -> np.ndarray:
        """The records held, oldest first, ``[size, D]``."""
        if self.size < self.capacity:
            return self.data[:self.size]
        return np.concatenate([self.data[self.next:], self.data[:self.next]])

    def __len__(self) -> int:
        return self.size

    @classmethod
    def restore(cls, slots: np.ndarray, capacity: int, next_slot: int) -> "ReplayBuffer":
        """A ring from its filled slots ``[size, D]`` (as ``data[:size]``) and write position."""
        buf = cls(capacity, slots.shape[1], slots.dtype)
        buf.data[:len(slots)] = slots
        buf.size, buf.next = len(slots), int(next_slot)
        return buf
