"""A short run of the HTTP benchmark's pieces (bench/http.py runs them longer)."""

import asyncio

from bench import http
from bench.common import demo_traffic, free_port


def test_served_harness_measures_in_process_and_http_on_the_same_traffic():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = http.start(port)
    try:
        assert http.in_process(url, 24) > 0
        before = http.cache_stats(url)
        result = asyncio.run(http.load_test(url, demo_traffic(24, per_task=http.PER_TASK), 4, 60))
        after = http.cache_stats(url)
    finally:
        proc.terminate()
        proc.wait(30)
    assert result["requests"] == 24 and result["errors"] == 0 and result["statuses"] == {200: 24}
    assert after["hits"] > before["hits"]  # served from the combinations the in-process run cached
