"""The hardened server's DICOMweb proxy against a stand-in PACS on loopback that records what reaches it and can be
slow: only QIDO/WADO-RS reads below the DICOMweb root arrive, with the viewer's ``Accept`` header and the server's
PACS credentials; a slow PACS holds up nobody else, and a PACS slower than the timeout gives 502."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from hardened_server import hardened_server
from test_merge_run import make_datastore

POOL = __import__("pathlib").Path(__file__).resolve().parents[1] / "sample-data" / "pool"
STUDY, SERIES = "1.2.826.0.1.3680043.2.1125.1", "1.2.826.0.1.3680043.2.1125.2"


class FakePacs(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[dict[str, str]] = []
        self.delay_s = 0.0

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakePacs

    def log_message(self, *args: object) -> None:
        pass

    def _record(self) -> None:
        self.server.seen.append({"method": self.command, "path": self.path,
                                 "accept": self.headers.get("Accept", ""),
                                 "auth": self.headers.get("Authorization", "")})

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        if "/wado-slow" in self.path or ("metadata" in self.path and self.server.delay_s):
            time.sleep(self.server.delay_s)
        body = json.dumps([]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "pacs-session=secret")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        self.send_response(500)
        self.end_headers()


@pytest.fixture(scope="module")
def pacs() -> Iterator[FakePacs]:
    srv = FakePacs()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    studies = make_datastore(tmp_path_factory.mktemp("unused"), n=1, labelled=0)
    del studies  # the studies are the stand-in PACS
    env = {"MONAI_LABEL_DICOMWEB_USERNAME": "pacsuser", "MONAI_LABEL_DICOMWEB_PASSWORD": "pacs-pw",
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path_factory.mktemp("cache"))}
    with hardened_server(pacs.root, {"pool": str(POOL)}, args=["--proxy-timeout-s", "3"], env=env) as srv:
        yield srv


def test_reads_arrive_with_accept_and_credentials(server, pacs):
    pacs.seen.clear()
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = requests.get(f"{server.url}/proxy/dicom/wado/studies/{STUDY}/series/{SERIES}/metadata",
                     headers={"Accept": accept}, timeout=30)
    assert r.status_code == 200 and r.json() == []
    assert "set-cookie" not in {k.lower() for k in r.headers}  # the PACS's cookies do not reach the browser
    r = requests.get(f"{server.url}/proxy/dicom/qido/studies", params={"PatientID": "P1", "limit": "5"}, timeout=30)
    assert r.status_code == 200
    paths = [s["path"] for s in pacs.seen]
    assert paths == [f"/dicom-web/studies/{STUDY}/series/{SERIES}/metadata", "/dicom-web/studies?PatientID=P1&limit=5"]
    assert pacs.seen[0]["accept"] == accept
    assert pacs.seen[0]["auth"] == "Basic " + base64.b64encode(b"pacsuser:pacs-pw").decode()


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/proxy/dicom/wado/studies/../../tools/reset", (400, 404)),  # clients may fold the '..' first
    ("GET", "/proxy/dicom/wado/studies/1.2/..%2F..%2Ftools", 400),
    ("GET", "/proxy/dicom/wado/instances", 400),
    ("GET", "/proxy/dicom/wado/studies/1.2/series/abc", 400),
    ("GET", "/proxy/dicom/stow/studies", 404),
    ("GET", "/proxy/dicom/tools/find", 404),
    ("GET", "/proxy/dicom/studies", 404),
    ("POST", "/proxy/dicom/wado/studies", 405),
    ("POST", "/proxy/dicom/stow/studies", 405),
    ("GET", "/proxy/dicom/qido/studies?expand=1", 400),
])
def test_nothing_else_reaches_the_pacs(server, pacs, method, path, status):
    pacs.seen.clear()
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # sends the path as written
    conn.request(method, path)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    assert r.status in (status if isinstance(status, tuple) else (status,)), text
    assert pacs.seen == []


def test_a_slow_pacs_holds_up_nobody_and_times_out(server, pacs):
    pacs.delay_s = 6.0
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            slow = [ex.submit(requests.get, f"{server.url}/proxy/dicom/wado/studies/{STUDY}/metadata", timeout=60)
                    for _ in range(3)]
            time.sleep(0.5)
            t0 = time.perf_counter()
            info = requests.get(f"{server.url}/info/", timeout=30)
            info_s = time.perf_counter() - t0
            answers = [f.result() for f in slow]
        assert info.status_code == 200 and info_s < 2.0, info_s
        assert all(a.status_code == 502 and "did not answer" in a.json()["detail"] for a in answers)
    finally:
        pacs.delay_s = 0.0
