"""The suite can be pointed at another Redis with DSPEX_TEST_REDIS_URL (the test process and its workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis

from tests.conftest import REDIS_URL, ROOT, Cluster, RedisServer, program
from tests.modules.faulty import side_channel

pytestmark = pytest.mark.integration


def test_workers_and_the_test_share_the_side_channel(make_cluster) -> None:
    # Given a real worker, and a module that counts its calls in the suite's Redis
    cluster: Cluster = make_cluster()
    cluster.start_worker(concurrency=1, pool="solo")
    key = f"suite-env-{uuid.uuid4().hex[:8]}"
    prog = program("counted", {"a": {"uses": "tests.modules.faulty:flaky", "inputs": {"key": key, "failures": 0}}})
    # When it runs there
    assert cluster.run(prog).succeeded
    # Then the test process reads the worker's count from the same Redis, and the broker is that Redis too
    assert side_channel().hget(key, "calls") == "1"
    assert cluster.settings.broker_url == REDIS_URL
    assert cluster.env()["DSPEX_TEST_REDIS_URL"] == REDIS_URL


def test_suite_can_be_pointed_at_another_redis(own_redis: RedisServer) -> None:
    # Given DSPEX_TEST_REDIS_URL naming a Redis of this test's own (not the default one)
    url = own_redis.url(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
    env.update({"DSPEX_TEST_REDIS_URL": url, "PYTHONPATH": str(ROOT)})
    # When a test with a real worker runs under it
    node = f"{__file__}::test_workers_and_the_test_share_the_side_channel"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    # Then it passes, and its side channel and state lived in that Redis
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    keys = [key.decode() for key in redis.Redis.from_url(url).keys("*")]
    assert any(key.startswith("suite-env-") for key in keys), keys
