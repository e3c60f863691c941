"""Straggler backups: a module still running after its ``backup_after_s`` gets a second attempt.

``backup_after_s`` comes from the program (module key), or from the optimizer's profile (a multiple
of the module's p95, where learned limits are on); ``backup: false`` turns it off for a module with
side effects. The worker running the module launches the backup: a timer thread per running
attempt sends a ``run_module`` message with task id ``EXEC.MODULE.backup`` to the module's queue
(once per module and execution: ``HSETNX`` on the execution's ``backup`` hash). The worker is the
one that knows when the call really started (after its resource-slot wait), and it needs no client
to stay up. The backup runs on whichever worker takes it first; a worker whose slots are all busy
(the primary holding one) cannot, so with one slot per worker it is another worker.

The first attempt to finish wins: the store's ``save_success`` refuses a module that already has a
final record, so outputs and children go out once. The winner revokes the other task (terminating
it where the pool can: prefork); a thread pool cannot stop a call, so the loser runs on and its
late result is discarded. Both are recorded: the winner's record says ``backup: true`` when the
backup won (``backup_launched: true`` when a backup was sent), and the loser's attempt is logged with
status ``cancelled`` and why. A failure decides nothing while the other attempt of the race runs on:
the first of the two to fail for good (a backup never retries; the primary may retry first, its retry
racing the backup in the same way) is logged as the race's loser and steps aside; the second fails
the module as any failure would; except under a staged strategy (``levels``), where a stage's chord
waits for the primary's own task, so a primary that fails for good fails the module (its backup's
later success is refused and logged as lost). One backup per module per execution.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from dspex_celery.canvas import module_signature
from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.results import ModuleRecord, ModuleStatus, isoformat, utcnow
from dspex_celery.settings import Settings
from dspex_celery.state import ATTEMPTS, attempt_entry

if TYPE_CHECKING:
    from celery import Task

    from dspex_celery.state import StateStore

log = logging.getLogger(__name__)

#: Task id suffix of a backup attempt: ``EXEC.MODULE.backup``.
BACKUP_SUFFIX = ".backup"
#: The execution's hash: module -> the backed-up attempt (its task id, worker, when the backup was sent).
BACKUPS = "backup"
#: What the loser's logged attempt says.
LOST_TO_BACKUP = "its backup attempt finished first; this attempt was revoked and its result discarded"
LOST_TO_PRIMARY = "the attempt it backed up finished first; this backup was revoked and its result discarded"


def backup_task_id(execution_id: str, module: str) -> str:
    return f"{execution_id}.{module}{BACKUP_SUFFIX}"


def is_backup(task: Task) -> bool:
    """True when ``task`` is running a backup attempt."""
    return str(task.request.id or "").endswith(BACKUP_SUFFIX)


def launched(store: StateStore, execution_id: str, module: str) -> dict[str, Any] | None:
    """What was stored when the module's backup was sent (None: none was)."""
    raw = store.client.hget(store.key(execution_id, BACKUPS), module)
    return None if raw is None else dict(json.loads(raw))


def log_attempt(store: StateStore, execution_id: str, module: str, record: ModuleRecord) -> None:
    """Add an attempt to the execution's attempt log without touching the module's record."""
    key = store.key(execution_id, ATTEMPTS)
    store.client.pipeline().rpush(key, attempt_entry(module, record)).expire(key, store.ttl_s).execute()


def leave_race(store: StateStore, execution_id: str, module: str) -> int:
    """Count an attempt of the race as out (failed for good, or a backup no longer needed); how many are."""
    return int(store.client.hincrby(store.key(execution_id, BACKUPS), f"{module}:out", 1))


def steps_aside(store: StateStore, execution_id: str, module: str) -> bool:
    """True when a failing attempt should leave the module to the other attempt of its race (a backup
    was sent and the other is not out yet); it is counted out either way."""
    return launched(store, execution_id, module) is not None and leave_race(store, execution_id, module) == 1


def backup_record(record: ModuleRecord, worker: str | None) -> ModuleRecord:
    """The running record of a backup (on ``worker``) of the attempt ``record`` is of (same number)."""
    return record.model_copy(update={"backup": True, "started_at": isoformat(utcnow()), "worker": worker})


class BackupLauncher(Hook):
    """Starts a timer per running attempt that has a ``backup_after_s``; revokes the loser of a race;
    logs the loser's attempt."""

    def before_module(self, ctx: ModuleContext) -> None:
        after = ctx.module.backup_after_s
        if after is None or ctx.record.model_extra and ctx.record.model_extra.get("backup"):
            return
        task_id = ctx.extras.get("task_id")
        timer = threading.Timer(after, self._launch, (ctx, task_id))
        timer.daemon = True
        timer.name = f"dspex-backup-{ctx.module.name}"
        ctx.extras["backup_timer"] = timer
        timer.start()

    def after_module(self, ctx: ModuleContext) -> None:
        timer = ctx.extras.pop("backup_timer", None)
        if timer is not None:
            timer.cancel()

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        self._settle_race(ctx, "succeeded")

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        if not isinstance(error, Exception):  # terminated: most likely revoked by the winner
            self._settle_race(ctx, "terminated")

    def _launch(self, ctx: ModuleContext, task_id: str | None) -> None:
        """Send the backup (once per module and execution) unless the execution ended."""
        store, runtime = ctx.runtime.store, ctx.runtime
        if store.is_finished(ctx.execution_id):
            return
        entry = json.dumps({"task_id": task_id, "worker": ctx.worker, "attempt": ctx.attempt, "at": time.time(),
                            "started_at": ctx.record.started_at})
        if not store.client.hsetnx(store.key(ctx.execution_id, BACKUPS), ctx.module.name, entry):
            return
        store.client.expire(store.key(ctx.execution_id, BACKUPS), store.ttl_s)
        setattr(ctx.record, "backup_launched", True)  # noqa: B010  (an extra field: the final record says so)
        signature = module_signature(runtime.app, ctx.plan, ctx.execution_id, ctx.module.name,
                                     runtime.settings.namespace)
        signature.set(task_id=backup_task_id(ctx.execution_id, ctx.module.name)).apply_async()
        log.warning("%s of %s still runs after %g s (backup_after_s): sent a backup attempt",
                    ctx.module.name, ctx.execution_id, ctx.module.backup_after_s or 0)

    def _settle_race(self, ctx: ModuleContext, how: str) -> None:
        """If a backup raced this attempt: revoke the other when this one won; log this one if it lost."""
        if ctx.module.backup_after_s is None:  # no backup is ever sent: no race, and no read per module
            return
        store = ctx.runtime.store
        race = launched(store, ctx.execution_id, ctx.module.name)
        if race is None:
            return
        mine_is_backup = bool((ctx.record.model_extra or {}).get("backup"))
        final = store.record(ctx.execution_id, ctx.module.name)
        won = final.status is ModuleStatus.SUCCEEDED and bool((final.model_extra or {}).get("backup")) == mine_is_backup
        if won and how == "succeeded":
            self._revoke_loser(ctx, race, mine_is_backup)
        elif final.status.final and not won:
            lost = ctx.record.model_copy(update={
                "status": ModuleStatus.CANCELLED, "finished_at": isoformat(utcnow()),
                "error": LOST_TO_PRIMARY if mine_is_backup else LOST_TO_BACKUP,
            })
            log_loser(store, ctx.execution_id, ctx.module.name, lost)

    def _revoke_loser(self, ctx: ModuleContext, race: dict[str, Any], mine_is_backup: bool) -> None:
        """Revoke the other attempt (terminated where the pool can); a backup that won logs the
        attempt it backed up at once (a terminated pool process may log nothing)."""
        store = ctx.runtime.store
        other = race.get("task_id") if mine_is_backup else backup_task_id(ctx.execution_id, ctx.module.name)
        if other:
            ctx.runtime.app.control.revoke(other, terminate=True)
        if mine_is_backup:
            lost = ModuleRecord(status=ModuleStatus.CANCELLED, attempts=int(race.get("attempt") or ctx.attempt),
                                started_at=race.get("started_at"), finished_at=isoformat(utcnow()),
                                worker=race.get("worker"), resource=ctx.module.resource, error=LOST_TO_BACKUP)
            log_loser(store, ctx.execution_id, ctx.module.name, lost)


def log_loser(store: StateStore, execution_id: str, module: str, record: ModuleRecord) -> None:
    """Log the losing attempt of a race, once (the winner and the loser may both try)."""
    if store.client.hsetnx(store.key(execution_id, BACKUPS), f"{module}:lost", "1"):
        log_attempt(store, execution_id, module, record)


def backup_hooks(settings: Settings) -> list[Hook]:
    """The backup launcher (it acts only on modules with a ``backup_after_s``)."""
    return [BackupLauncher()]
