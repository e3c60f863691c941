"""``dag`` pushes ready children's task messages from a Lua step: they must be what Celery would send."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from dspex_celery.bootstrap import create_runtime
from dspex_celery.canvas import module_signature
from dspex_celery.examples import synthetic
from dspex_celery.program import Program
from dspex_celery.redis_queues import RedisQueues
from dspex_celery.settings import Settings

pytestmark = pytest.mark.integration

#: Unique per message (or per publishing thread): not compared.
PER_MESSAGE = {"delivery_tag", "reply_to", "argsrepr", "kwargsrepr"}


def decoded(raw: str | bytes) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    message["properties"] = {k: v for k, v in message["properties"].items() if k not in PER_MESSAGE}
    message["headers"].pop("origin")
    return message


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_enqueued_message_is_the_one_apply_async_sends(redis_url: str, timeout_s: float | None) -> None:
    # Given a module signature of a plan, with and without a time limit
    runtime = create_runtime(Settings(broker_url=redis_url, namespace=f"q{uuid.uuid4().hex[:8]}"))
    data = synthetic.chain(3)
    if timeout_s:
        data["modules"]["c1"]["timeout_s"] = timeout_s
    plan = Program.from_dict(data).plan()
    signature = module_signature(runtime.app, plan, "exec1", "c1", runtime.settings.namespace)
    queues = runtime.queues
    assert queues is not None
    client = runtime.store.client
    try:
        # When Celery publishes it, and RedisQueues builds it
        signature.apply_async(ignore_result=True)
        key, message = queues.message(signature)
        # Then it lands on the same list, with the same body, headers and properties
        assert client.llen(key) == 1
        assert decoded(message) == decoded(client.lindex(key, 0))
    finally:
        client.delete(*client.keys(f"{runtime.settings.namespace}*"))


def test_atomic_enqueue_only_where_a_store_script_reaches_the_queues(redis_url: str) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/15"
    enabled = [
        Settings(broker_url=redis_url),
        Settings(broker_url=redis_url, result_backend=redis_url),
    ]
    disabled = [
        Settings(broker_url=redis_url, result_backend=other_db),  # queues in another database
        Settings(broker_url=redis_url, sent_events=True),  # task-sent events come from Celery's publish
        Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", result_backend=redis_url),
        Settings(),  # embedded
    ]
    assert all(isinstance(RedisQueues.of(s, create_runtime(s).app), RedisQueues) for s in enabled)
    assert all(RedisQueues.of(s, create_runtime(s).app) is None for s in disabled)
