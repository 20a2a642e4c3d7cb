"""Dynamic batching: the batcher on its own (asyncio), then the cloud server gathering real concurrent requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from tinyrun import png, tiny_images

from edgeexit.cli import main
from edgeexit.config import RunConfig
from edgeexit.errors import UserError
from edgeexit.model import load_checkpoint
from edgeexit.runtime import TorchRuntime
from edgeexit.serving import batcher, wire
from edgeexit.serving.batcher import Batcher, BatchFailed
from edgeexit.serving.cloud_app import create_cloud_app
from edgeexit.serving.cloud_runner import CloudRunner
from edgeexit.serving.server import start_server

# --- the batcher alone -------------------------------------------------------------------------------------


class Recorder:
    """A `run` for the batcher that doubles each item and remembers every batch it was given."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key: Hashable, items: list[int]) -> list[int]:
        self.gate.wait(10)
        self.batches.append((key, list(items)))
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


async def _gather_while_busy(batcher: Batcher, rec: Recorder, jobs: list[tuple[str, int]]) -> list[object]:
    """Submit one job, hold the consumer busy on it, queue `jobs` behind it, then release: the queued jobs
    must be batched."""
    rec.gate.clear()
    first = asyncio.ensure_future(batcher.submit("a", -1))
    await asyncio.sleep(0.05)  # the consumer is now blocked inside run(), on the gate
    rest = [asyncio.ensure_future(batcher.submit(key, item)) for key, item in jobs]
    await asyncio.sleep(0.01)
    rec.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_requests_queued_behind_a_busy_forward_run_as_one_batch_per_key() -> None:
    rec = Recorder()

    async def go() -> list[object]:
        b = Batcher(rec, max_batch=8)
        return await _gather_while_busy(b, rec, [("a", 1), ("b", 10), ("a", 2), ("a", 3), ("b", 20)])

    results = asyncio.run(go())
    assert results == [-2, 2, 20, 4, 6, 40]  # each request gets its own answer, in its own order
    assert rec.batches == [("a", [-1]), ("a", [1, 2, 3]), ("b", [10, 20])]


def test_batches_never_exceed_max_batch_rows() -> None:
    rec = Recorder()

    async def go() -> list[object]:
        b = Batcher(rec, max_batch=3)
        return await _gather_while_busy(b, rec, [("a", i) for i in range(7)])

    results = asyncio.run(go())
    assert results == [-2] + [2 * i for i in range(7)]
    assert [len(items) for _, items in rec.batches] == [1, 3, 3, 1]


def test_a_failed_batch_fails_only_its_requests_and_the_next_batch_is_served() -> None:
    rec = Recorder(fail_on=5)

    async def go() -> list[object]:
        b = Batcher(rec, max_batch=2)
        out = await _gather_while_busy(b, rec, [("a", 4), ("a", 5), ("a", 6)])
        out.append(await b.submit("a", 7))  # the batcher still serves afterwards
        return out

    results = asyncio.run(go())
    assert results[0] == -2 and results[3] == 12 and results[4] == 14
    for failed in results[1:3]:
        assert isinstance(failed, BatchFailed)
        assert "batch of 2 rows failed" in str(failed) and "bad item 5" in str(failed)


def test_a_cancelled_request_is_dropped_before_its_batch_runs() -> None:
    rec = Recorder()

    async def go() -> list[object]:
        b = Batcher(rec, max_batch=8)
        rec.gate.clear()
        first = asyncio.ensure_future(b.submit("a", 0))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit("a", 1))
        kept = asyncio.ensure_future(b.submit("a", 2))
        await asyncio.sleep(0.01)
        gone.cancel()
        rec.gate.set()
        return await asyncio.gather(first, kept)

    assert asyncio.run(go()) == [0, 4]
    assert rec.batches == [("a", [0]), ("a", [2])]


def test_max_wait_holds_a_lone_request_for_company() -> None:
    rec = Recorder()

    async def go() -> list[object]:
        b = Batcher(rec, max_batch=4, max_wait_ms=300)
        first = asyncio.ensure_future(b.submit("a", 1))
        await asyncio.sleep(0.05)  # well inside the wait: joins the first request's batch
        second = asyncio.ensure_future(b.submit("a", 2))
        return await asyncio.gather(first, second)

    assert asyncio.run(go()) == [2, 4]
    assert rec.batches == [("a", [1, 2])]


def test_adaptive_hold_after_a_busy_batch_gathers_as_many_rows_again() -> None:
    """After a batch of 2 rows that took 0.2 s, the next batch waits (up to 5 ms) for a second request; without
    the hold, the consumer would take the first one alone as soon as it woke."""
    rec = Recorder()

    def slow(key: Hashable, items: list[int]) -> list[int]:
        time.sleep(0.2)
        return rec(key, items)

    async def go() -> list[object]:
        b = Batcher(slow, max_batch=4)  # max_wait_ms None: adaptive
        await asyncio.gather(b.submit("a", 1), b.submit("a", 2))  # one batch of 2 rows
        first = asyncio.ensure_future(b.submit("a", 3))
        for _ in range(3):  # let the consumer wake and start holding
            await asyncio.sleep(0)
        second = asyncio.ensure_future(b.submit("a", 4))
        return await asyncio.gather(first, second)

    assert asyncio.run(go()) == [6, 8]
    assert rec.batches == [("a", [1, 2]), ("a", [3, 4])]


def test_without_max_wait_a_lone_request_runs_at_once() -> None:
    rec = Recorder()

    async def go() -> None:
        b = Batcher(rec, max_batch=4)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await b.submit("a", 1) == 2
        assert loop.time() - t0 < 5  # not held for company (generous: CI machines stall)

    asyncio.run(go())
    assert rec.batches == [("a", [1])]


def test_an_idle_batcher_runs_a_quick_request_on_the_event_loop_and_a_slow_one_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batcher, "INLINE_MAX_MS", 30.0)  # wide margins both ways on a stalling CI machine
    threads: list[tuple[Hashable, str]] = []

    def run(key: Hashable, items: list[int]) -> list[int]:
        threads.append((key, threading.current_thread().name))
        if key == "slow":
            time.sleep(0.1)  # over INLINE_MAX_MS
        if -1 in items:
            raise RuntimeError("bad item -1")
        return [2 * i for i in items]

    async def go() -> list[object]:
        b = Batcher(run, max_batch=4)
        out = [await b.submit("quick", 1), await b.submit("quick", 2)]  # unknown cost: a thread; then inline
        out += [await b.submit("slow", 3), await b.submit("slow", 4)]  # 20 ms: a thread, both times
        with pytest.raises(BatchFailed, match="batch of 1 rows failed.*bad item -1"):
            await b.submit("quick", -1)  # fails inline, alone
        out.append(await b.submit("quick", 5))  # and the next request is served
        # Requests that arrive together are company: one batch, in the worker thread, and the next lone one
        # runs in the thread too (its key's last batch was not one request alone).
        out += await asyncio.gather(*(b.submit("quick", i) for i in (6, 7, 8)))
        out.append(await b.submit("quick", 9))
        out.append(await b.submit("quick", 10))  # alone after alone: on the loop again
        return out

    assert asyncio.run(go()) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    main = threading.current_thread().name
    assert [(key, name == main) for key, name in threads] == [
        ("quick", False),  # cost unknown
        ("quick", True),
        ("slow", False),
        ("slow", False),
        ("quick", True),  # fails, alone
        ("quick", True),
        ("quick", False),  # the batch of 3
        ("quick", False),
        ("quick", True),
    ], threads


@pytest.mark.parametrize(
    ("max_batch", "max_wait_ms", "expected"),
    [(0, 0, "max_batch"), (True, 0, "max_batch"), (4, -1, "max_wait_ms"), (4, float("nan"), "max_wait_ms")],
)
def test_bad_batching_settings_are_refused(max_batch: object, max_wait_ms: object, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        Batcher(Recorder(), max_batch=max_batch, max_wait_ms=max_wait_ms)  # type: ignore[arg-type]


# --- the cloud server -------------------------------------------------------------------------------------


class FailingRuntime(TorchRuntime):
    """The tiny run's torch runtime, made to fail a forward whose batch holds a poisoned row (all 7s)."""

    def cloud_part(self, h: torch.Tensor, k: int) -> torch.Tensor:
        if bool((h.flatten(1) == 7.0).all(dim=1).any()):
            raise RuntimeError("injected failure")
        return super().cloud_part(h, k)


@pytest.fixture(scope="module")
def served(tiny_run: tuple[Path, RunConfig]) -> Iterator[tuple[str, CloudRunner, Path, RunConfig]]:
    root, cfg = tiny_run
    models = CloudRunner(FailingRuntime.from_run(root))
    # A long max_wait: concurrent requests from the threads below surely share a batch.
    app = create_cloud_app(root, max_batch=8, max_wait_ms=400, models=models)
    with start_server(app) as srv:
        yield srv.url, models, root, cfg


def _post_all(url: str, bodies: list[tuple[str, bytes, str]]) -> list[httpx.Response]:
    """POST every (path, body, content type) at once, one thread each."""
    out: list[httpx.Response | None] = [None] * len(bodies)

    def send(i: int) -> None:
        path, body, ctype = bodies[i]
        with httpx.Client(base_url=url, timeout=60) as c:
            out[i] = c.post(path, content=body, headers={"Content-Type": ctype, "X-Request-ID": f"r{i}"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _stage(root: Path, cfg: RunConfig, k: int, n: int) -> tuple[torch.Tensor, list[int], list[float]]:
    """Stage-k tensors of n test images, and the calibrated final-exit answers computed one image at a time."""
    net, spec = load_checkpoint(root / "ee")
    _, x = tiny_images(root, cfg, n)
    t = spec.temperature(spec.num_exits)
    with torch.inference_mode():
        _, h = net.edge_part(spec.preprocessing.normalize(x), k)
        conf, label = torch.cat(
            [torch.softmax(net.cloud_part(h[i : i + 1], k) / t, 1) for i in range(n)]
        ).max(1)
    return h, label.tolist(), conf.tolist()


def test_concurrent_offloads_share_a_forward_and_each_gets_its_own_answer(served: tuple) -> None:
    url, models, root, cfg = served
    h, labels, confs = _stage(root, cfg, 2, 6)
    bodies = [
        (
            "/v1/offload",
            wire.encode_payload(h[i : i + 1], model_hash=models.ee_hash, k=2, request_id=f"r{i}"),
            "application/octet-stream",
        )
        for i in range(6)
    ]
    answers = [r.json() for r in _post_all(url, bodies)]
    assert [a["label"] for a in answers] == labels
    assert [a["confidence"] for a in answers] == pytest.approx(confs, abs=1e-4)  # batched float sums
    assert [a["request_id"] for a in answers] == [f"r{i}" for i in range(6)]
    assert max(a["batch"] for a in answers) > 1  # some shared a forward pass


def test_concurrent_classifications_are_batched_too(served: tuple) -> None:
    url, models, root, cfg = served
    _, x = tiny_images(root, cfg, 4)
    singles = [models.classify(x[i]) for i in range(4)]
    answers = [r.json() for r in _post_all(url, [("/v1/classify", png(x[i]), "image/png") for i in range(4)])]
    assert [a["label"] for a in answers] == [s[0] for s in singles]
    assert [a["confidence"] for a in answers] == pytest.approx(
        [s[1] for s in singles], abs=1e-4
    )  # batched float sums
    assert max(a["batch"] for a in answers) > 1


def test_a_bad_request_fails_alone_and_a_failed_batch_names_each_request(served: tuple) -> None:
    url, models, root, cfg = served
    h, labels, _ = _stage(root, cfg, 1, 3)
    good = [
        wire.encode_payload(h[i : i + 1], model_hash=models.ee_hash, k=1, request_id=f"r{i}")
        for i in range(3)
    ]
    wrong_k = wire.encode_payload(h[:1], model_hash=models.ee_hash, k=2, request_id="r3")
    ctype = "application/octet-stream"
    rs = _post_all(url, [("/v1/offload", b, ctype) for b in [*good, wrong_k]])
    assert [r.status_code for r in rs] == [200, 200, 200, 422]
    assert [r.json()["label"] for r in rs[:3]] == labels

    # A forward that raises: every request in that batch gets a 500 naming its own id; the server goes on.
    poison = wire.encode_payload(torch.full_like(h[:1], 7.0), model_hash=models.ee_hash, k=1, request_id="r1")
    rs = _post_all(url, [("/v1/offload", good[0], ctype), ("/v1/offload", poison, ctype)])
    assert [r.status_code for r in rs] == [500, 500]
    for i, r in enumerate(rs):
        detail = r.json()["detail"]
        assert f"request r{i}" in detail and "injected failure" in detail
    after = httpx.post(f"{url}/v1/offload", content=good[2], headers={"Content-Type": ctype}, timeout=60)
    assert after.status_code == 200 and after.json()["label"] == labels[2]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve-cloud", "RUN", "--threads", "0"], "threads must be an integer >= 1"),
        (["serve-cloud", "RUN", "--max-batch", "0"], "max_batch must be an integer >= 1"),
        (["serve-cloud", "RUN", "--max-wait-ms", "-1"], "max_wait_ms must be a number"),
        (
            ["serve-edge", "RUN", "--cloud", "http://x:1", "--threads", "-2"],
            "threads must be an integer >= 1",
        ),
        (["classify", "x.png", "--run", "RUN", "--threads", "0"], "threads must be an integer >= 1"),
        (["evaluate", "RUN", "--threads", "0"], "runtime.threads"),
    ],
)
def test_bad_thread_and_batch_flags_give_one_line(
    argv: list[str], expected: str, tiny_run: tuple[Path, RunConfig], capsys: pytest.CaptureFixture
) -> None:
    root, _ = tiny_run
    argv = [str(root) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
