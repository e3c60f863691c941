"""``forward``: the strategy of a distributed ``dspy.Module`` (``dspex_celery.distribute``).

The client runs the module's ``forward`` and dispatches each sub-module call itself, so there is
nothing to start and nothing to dispatch after a call: a finished call is only announced on the
execution's ``calls:done`` list, which the waiting client pops (it also polls the records, so a
lost announcement only costs a poll).
"""

from __future__ import annotations

from dspex_celery.execution import Execution
from dspex_celery.results import ModuleStatus
from dspex_celery.strategies.base import Strategy

#: The execution key part of the list of finished calls (``{ns}:x:{id}:calls:done``).
CALLS_DONE = "calls:done"


class ForwardStrategy(Strategy):
    """Calls are dispatched by the client running ``forward``; workers announce each final one."""

    name = "forward"

    def start(self, execution: Execution) -> None:
        """Nothing to dispatch: the first call is sent when ``forward`` makes it."""

    def module_finished(self, execution: Execution, module: str, status: ModuleStatus) -> None:
        store = execution.store
        key = store.key(execution.id, CALLS_DONE)
        pipe = store.client.pipeline()
        pipe.rpush(key, module)
        pipe.expire(key, store.ttl_s)
        pipe.execute()
