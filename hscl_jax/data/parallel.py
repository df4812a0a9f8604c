"""An ordered, bounded parallel map: the host-side workhorse of the input pipeline (threads) and
of dataset preparation (processes)."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    executor: futures.Executor,
    depth: int,
) -> Iterator[Result]:
    """function(item) for each item, run by `executor` at most `depth` items ahead of the
    consumer, yielded in the order of `items`. Memory stays bounded by `depth` results however
    long `items` is."""
    item_iterator = iter(items)
    pending = collections.deque(
        executor.submit(function, item) for item in itertools.islice(item_iterator, depth)
    )
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(item_iterator, 1):
            pending.append(executor.submit(function, item))
        yield result
