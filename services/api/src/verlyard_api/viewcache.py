"""Pure core: the API process's cache of pipeline views, kept exact by the projector (docs/adr/0018).

The projector is the only writer of the read models, so it knows when a view changes: it puts every
view it commits and drops those that another process's projector changed (it sees their positions in
the tracking row, under the row lock). A reader that missed the cache reads the table and offers the
row back with the stamp it took before reading; any put or drop since then bumps the generation and
the offer is refused, so a read that raced a change can never overwrite the newer view.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from verlyard_api.views import PipelineView

CAPACITY = 4096
"""Views kept (least recently used first out): a few KB each."""


class ViewCache:
    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._views: OrderedDict[str, PipelineView] = OrderedDict()
        self.generation = 0
        """Bumped by every put, drop and clear; a reader's stamp is the generation before it read."""
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._views)

    def get(self, pipeline_id: str) -> PipelineView | None:
        view = self._views.get(pipeline_id)
        if view is None:
            self.misses += 1
            return None
        self._views.move_to_end(pipeline_id)
        self.hits += 1
        return view

    def peek(self, pipeline_id: str) -> PipelineView | None:
        """The cached view without counting or reordering (the projector's own lookups)."""
        return self._views.get(pipeline_id)

    def stamp(self) -> int:
        return self.generation

    def offer(self, view: PipelineView, stamp: int) -> bool:
        """Keep `view`, read from the table after `stamp` was taken, unless anything changed since."""
        if stamp != self.generation:
            return False
        self._keep(view)
        return True

    def put(self, views: Iterable[PipelineView]) -> None:
        """Keep views the projector has just committed (they are the table's rows now)."""
        self.generation += 1
        for view in views:
            self._keep(view)

    def drop(self, pipeline_ids: Iterable[str]) -> None:
        """Forget views that changed where this process did not see how."""
        self.generation += 1
        for pipeline_id in pipeline_ids:
            self._views.pop(pipeline_id, None)

    def clear(self) -> None:
        self.generation += 1
        self._views.clear()

    def _keep(self, view: PipelineView) -> None:
        self._views[view.id] = view
        self._views.move_to_end(view.id)
        while len(self._views) > self._capacity:
            self._views.popitem(last=False)
