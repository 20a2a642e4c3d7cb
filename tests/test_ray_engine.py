"""The cloud server on Ray Serve (`serve-cloud --engine ray`): one local Ray instance, two replicas of the same
app, live on 127.0.0.1.

Through Ray, the served system still takes the offline engine's decisions (the check of
test_serving_consistency on a subset: strategies ee and conventional, both of its levels and k values, its 24
images); answers are spread over both replicas (the `x-edgeexit-replica` header); the bearer token, a bad
payload, an unreachable --address and a missing Ray each get their one-line answer.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from test_serving_consistency import ALPHA, KS, LEVELS, N, _offline

from edgeexit.config import RunConfig
from edgeexit.data import distort
from edgeexit.errors import UserError
from edgeexit.model import load_checkpoint
from edgeexit.serving import wire
from edgeexit.serving.edge_runner import load_runner
from edgeexit.serving.images import png_bytes
from edgeexit.serving.ray_engine import REPLICA_HEADER, RayCloud, start_ray_cloud

pytestmark = [
    pytest.mark.slow,  # starts a Ray instance and real servers
    # Ray Serve's own config models, when ray.serve is imported: not ours to fix
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning"),
]

ray = pytest.importorskip("ray")  # the `test` extra installs it; a bare checkout without it skips this file

TOKEN = "ray-s3cret"
STRATEGIES = ["ee", "conventional"]  # offloads (/v1/offload) and cloud-only classifications (/v1/classify)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _session_processes(sid: int) -> list[str]:
    """The processes still alive in session `sid` (zombies left out: they are gone, only not yet reaped)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) == sid and "Z" not in line.split()[2]]


def test_serve_cloud_command_serves_until_sigterm_and_leaves_no_process(
    tiny_run: tuple[Path, RunConfig],
) -> None:
    # First in the file, before the module's Ray instance starts: one Ray instance at a time on 2 cores.
    port = _refused_port()
    cmd = [sys.executable, "-m", "edgeexit", "serve-cloud", str(tiny_run[0]), "--engine", "ray"]
    cmd += ["--replicas", "1", "--port", str(port), "--runtime", "torch", "--token", TOKEN]
    # Ray's session files go to a short directory of our own (its unix socket paths must stay under 107
    # characters), removed at the end, rather than piling up in /tmp/ray.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    log = temp / "serve.log"
    with open(log, "w") as out:
        p = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_TMPDIR": str(temp)},
        )
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C to stop" not in log.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)  # the line comes once every replica answers
        assert f"at http://127.0.0.1:{port} (1 replicas); Ctrl-C to stop" in log.read_text(), log.read_text()
        r = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers=AUTH)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER]
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 143  # unwound through Python (Ray's own handler aborts: -6), Serve shut down
        deadline = time.monotonic() + 10
        while _session_processes(p.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _session_processes(p.pid) == []  # no raylet, GCS, agent or replica left behind
    finally:
        if p.poll() is None or _session_processes(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cloud(tiny_run: tuple[Path, RunConfig]) -> Iterator[RayCloud]:
    # Ray's files in a short directory of our own, as in the test above; RayCloud.stop removes it.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        handle = start_ray_cloud(
            tiny_run[0], replicas=2, threads=1, temp_dir=temp, token=TOKEN, runtime="torch", max_batch=8
        )
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    with handle:
        yield handle
    assert not ray.is_initialized()
    assert not os.path.exists(temp)  # Ray's session files are gone with it


def _offload(url: str, body: bytes) -> httpx.Response:
    return httpx.post(
        url + "/v1/offload", content=body, headers={**AUTH, "Content-Type": "application/octet-stream"}
    )


@pytest.fixture(scope="module")
def payload(tiny_run: tuple[Path, RunConfig]) -> tuple[bytes, int]:
    """A real stage-2 tensor of one test image, encoded, and the label the model gives it."""
    from tinyrun import tiny_images

    root, cfg = tiny_run
    net, spec = load_checkpoint(root / "ee")
    _, images = tiny_images(root, cfg, 1)
    with torch.no_grad():
        _, h = net.edge_part(spec.preprocessing.normalize(images), 2)
        label = int(net.cloud_part(h, 2).argmax(1))
    return wire.encode_payload(h, model_hash=spec.content_hash, k=2, request_id="ray"), label


def test_online_answers_through_ray_equal_offline_records(
    cloud: RayCloud, tiny_run: tuple[Path, RunConfig], tmp_path: Path
) -> None:
    root, cfg = tiny_run
    records = _offline(root, cfg, 1, tmp_path / "offline")
    from tinyrun import tiny_images

    ids, clean = tiny_images(root, cfg, N)
    cloud_answers: Counter[str] = Counter()
    with load_runner(
        root, strategy="ee", alpha=ALPHA, cloud_url=cloud.url, precision="fp32", runtime="torch", token=TOKEN
    ) as base:
        for level in LEVELS:
            pngs = [png_bytes(x) for x in distort(clean, "gaussian_blur", level, seeds=[int(i) for i in ids])]
            for strategy in STRATEGIES:
                for k in KS:
                    runner = base.variant(strategy=strategy, alpha=ALPHA, k=k)
                    got = [runner.classify_image(data) for data in pngs]
                    rows: pd.DataFrame = records[
                        (records.level == level) & (records.strategy == strategy) & (records.k == k)
                    ]
                    where = f"{strategy} level={level} k={k}"
                    assert rows.sample_id.tolist() == [int(i) for i in ids], where
                    assert all(a.outcome == "ok" for a in got), [a.detail for a in got if a.outcome != "ok"]
                    assert [a.exit for a in got] == rows.exit.tolist(), where
                    assert [a.answered_at == "edge" for a in got] == rows.at_edge.tolist(), where
                    assert [a.label for a in got] == rows.prediction.tolist(), where
                    assert [a.macs for a in got] == rows.macs.tolist(), where
                    np.testing.assert_allclose(
                        [a.confidence for a in got], rows.confidence, rtol=0, atol=1e-5, err_msg=where
                    )
                    cloud_answers[strategy] += sum(a.answered_at == "cloud" for a in got)
    # Both routes went through Ray: every conventional classification, and some of the EE-DNN's offloads.
    assert cloud_answers["conventional"] == len(LEVELS) * len(KS) * N
    assert cloud_answers["ee"] > 0


def test_answers_are_spread_over_both_replicas(cloud: RayCloud, payload: tuple[bytes, int]) -> None:
    body, label = payload
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: _offload(cloud.url, body), range(40)))
    assert [r.status_code for r in answers] == [200] * 40, answers[0].text
    assert {r.json()["label"] for r in answers} == {label}  # the same answer from either replica
    replicas = Counter(r.headers[REPLICA_HEADER] for r in answers)
    assert len(replicas) == 2, replicas
    assert min(replicas.values()) >= 4, replicas  # both took a real share, not one stray request


def test_token_is_required_and_health_is_open(cloud: RayCloud, payload: tuple[bytes, int]) -> None:
    r = httpx.post(cloud.url + "/v1/offload", content=payload[0])
    assert r.status_code == 401
    assert "bearer token" in r.json()["detail"]
    assert r.headers[REPLICA_HEADER]  # the app's own 401, from a replica, not Serve's proxy
    h = httpx.get(cloud.url + "/healthz")
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    m = httpx.get(cloud.url + "/v1/model", headers=AUTH)
    assert m.status_code == 200 and m.json()["max_batch"] == 8  # the options reached the replicas' apps


def test_metrics_name_the_replica_that_answers(cloud: RayCloud) -> None:
    for _ in range(12):
        r = httpx.get(cloud.url + "/metrics", headers=AUTH)
        assert r.status_code == 200
        replica = r.headers[REPLICA_HEADER]
        assert f'edgeexit_replica_info{{replica="{replica}"}} 1.0' in r.text  # this replica's own registry
    assert httpx.get(cloud.url + "/metrics").status_code == 401  # behind the token, as under uvicorn


def test_bad_payload_gets_400_and_the_replicas_keep_serving(
    cloud: RayCloud, payload: tuple[bytes, int]
) -> None:
    bad = [_offload(cloud.url, b"not a safetensors body") for _ in range(6)]
    assert {r.status_code for r in bad} == {400}
    assert all(r.json()["detail"] and "\n" not in r.json()["detail"] for r in bad)
    body, label = payload
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = list(pool.map(lambda _: _offload(cloud.url, body), range(16)))
    assert [r.json().get("label") for r in good] == [label] * 16
    assert len({r.headers[REPLICA_HEADER] for r in good}) == 2


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_unreachable_address_is_one_line_error(tiny_run: tuple[Path, RunConfig]) -> None:
    address = f"127.0.0.1:{_refused_port()}"
    t0 = time.perf_counter()
    with pytest.raises(
        UserError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:\d+'.*ray start --head"
    ):
        start_ray_cloud(tiny_run[0], address=address)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(UserError, match="expected 'auto', HOST:PORT"):
        start_ray_cloud(tiny_run[0], address="no-port-here")


def _cli(*args: str, block_ray: bool = False) -> subprocess.CompletedProcess[str]:
    """The `edgeexit` command in a fresh interpreter; block_ray: as if Ray were not installed."""
    code = "import sys\n"
    if block_ray:
        code += "sys.modules['ray'] = None  # import ray raises ImportError, as without the extra\n"
    code += "from edgeexit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=os.environ
    )


def test_cli_errors_name_the_fix(tiny_run: tuple[Path, RunConfig]) -> None:
    run = str(tiny_run[0])
    cases = [
        (["--engine", "ray"], True, "pip install 'edgeexit[ray]'"),
        (["--engine", "ray", "--address", f"127.0.0.1:{_refused_port()}"], False, "ray start --head"),
        (["--replicas", "2"], False, "--replicas is for --engine ray"),
        (["--engine", "ray", "--workers", "2"], False, "use --replicas N"),
    ]
    for flags, block_ray, fix in cases:
        p = _cli("serve-cloud", run, "--runtime", "torch", *flags, block_ray=block_ray)
        assert p.returncode == 2, (flags, p.stdout, p.stderr)
        lines = [line for line in p.stderr.splitlines() if line.startswith("edgeexit: error:")]
        assert len(lines) == 1 and fix in lines[0], (flags, p.stderr)
