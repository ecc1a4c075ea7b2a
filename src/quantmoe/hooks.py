"""Forward hooks that never outlive the work they were registered for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.hooks import RemovableHandle


@contextmanager
def removed_after() -> Iterator[list[RemovableHandle]]:
    """Collect hook handles in the yielded list; all are removed on exit, also when the body raises.

    Example::

        >>> with removed_after() as handles:  # doctest: +SKIP
        ...     handles.append(module.register_forward_hook(hook))
        ...     model(input_ids)
    """
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
