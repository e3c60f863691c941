"""Defaults several modules share, each with the reason it has that value.

A tunable that only one module uses lives beside its code.
"""

from __future__ import annotations

#: Resource class of a module that names none; its queue is served by plain ``worker`` processes.
RESOURCE = "default"

#: Prefix of queue names and state-store keys, so several deployments can share one Redis.
NAMESPACE = "dspex"

#: How long an execution's plan, module outputs and records stay in the state store (resume window).
STATE_TTL_S = 7 * 24 * 3600

#: Redis broker visibility timeout: a message taken by a worker that died (main process included)
#: is re-delivered after this long. Keep it above the longest module timeout plus retry backoff.
VISIBILITY_TIMEOUT_S = 3600

#: Longest pause between a Redis worker's sweeps for messages of dead workers (re-queued once their
#: visibility timeout is over): a quarter of the visibility timeout, at most this.
MAX_RESTORE_INTERVAL_S = 10.0

#: Worker concurrency of the in-process (embedded) worker that runs when no broker is configured.
EMBEDDED_CONCURRENCY = 4

#: Poll interval of the embedded memory transport and chord unlock; the stock 1 s makes a
#: 10-level program take ~20 s.
EMBEDDED_POLL_S = 0.005

#: Least countdown of a retry that goes through Celery's ``task.retry``: it sends the next attempt
#: before the worker reports the retry (its ``task-retried`` event), and an attempt run to the end
#: in between leaves Flower showing RETRY for a module that succeeded (Celery's event state lets a
#: later RETRY override SUCCESS).
MIN_RETRY_COUNTDOWN_S = 0.2

#: Seconds a hard time limit adds to a module's ``timeout_s`` (the soft limit) before the pool
#: process is killed.
HARD_TIMEOUT_GRACE_S = 5.0

#: Default configuration file, relative to the working directory (``DSPEX_CONFIG`` overrides).
CONFIG_FILE = "config/dspex.yaml"

#: Characters of the output (or error) summary a module task returns as its Celery result, which
#: Flower shows in its task list; the output itself stays in the state store.
RESULT_SUMMARY_CHARS = 200

#: Seconds an entry of the shared LM cache lives after it was written: a week, long enough for the
#: reruns of an evaluation, short enough that a changed model behind the same name is seen again.
LM_CACHE_TTL_S = 7 * 24 * 3600

#: Entries the shared LM cache keeps (least recently used go first): ~100k answers of a few KB each
#: stay within a few hundred MB of a Redis that others share (its maxmemory is not ours to set).
LM_CACHE_MAX_ENTRIES = 100_000
