"""The download of tiny Shakespeare, against a local HTTP server on 127.0.0.1.

Whatever the server does, the target folder afterwards holds either the whole, verified file or nothing:
no partial input.txt and no temporary file."""

import hashlib
import http.server
import threading
import time

import pytest

import gpt


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.body
        if self.path == "/good":
            self.send(200, body)
        elif self.path == "/corrupt":  # one byte changed: the same length, another checksum
            self.send(200, body[:1000] + b"#" + body[1001:])
        elif self.path == "/truncated":  # promises the whole file, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif self.path == "/stall":  # headers, then silence
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            self.server.release.wait(10)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/corrupt")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send(404, b"not found")

    def send(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(corpus):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.body = corpus.read_bytes()
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_the_corpus_is_the_one_we_check_against(corpus):
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() == gpt.DATA_SHA256


def test_good_download_ends_as_the_target(server, corpus, tmp_path):
    target = tmp_path / "input.txt"
    gpt.download(target, url=f"{server}/good", timeout=10)
    assert [p.name for p in tmp_path.iterdir()] == ["input.txt"]  # no temporary file left beside it
    assert hashlib.sha256(target.read_bytes()).hexdigest() == gpt.DATA_SHA256
    assert target.read_bytes() == corpus.read_bytes()


def test_load_text_downloads_when_input_txt_is_missing(server, corpus, tmp_path, monkeypatch, capsys):
    target = tmp_path / "input.txt"
    monkeypatch.setattr(gpt, "DEFAULT_DATA", target)
    real = gpt.download
    monkeypatch.setattr(gpt, "download", lambda path: real(path, url=f"{server}/good", timeout=10))
    assert gpt.load_text() == corpus.read_text()
    assert f"downloading tiny Shakespeare to {target}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["input.txt"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/corrupt", "is not tiny Shakespeare (sha256"),
        ("/truncated", "could not download tiny Shakespeare"),
        ("/missing", "could not download tiny Shakespeare from {url} (HTTP 404)"),
        ("/redirect", "is not tiny Shakespeare (sha256"),  # followed, then refused by its checksum
    ],
)
def test_bad_answers_leave_nothing(server, tmp_path, path, expected):
    url = f"{server}{path}"
    with pytest.raises(gpt.UserError) as info:
        gpt.download(tmp_path / "input.txt", url=url, timeout=10)
    message = str(info.value)
    assert expected.format(url=url) in message
    assert f"download {url} by hand and save it as {tmp_path / 'input.txt'}" in message  # how to fix it
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_server_times_out_and_leaves_nothing(server, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(gpt.UserError, match=r"could not download tiny Shakespeare .*\(ConnectionError\)"):
        gpt.download(tmp_path / "input.txt", url=f"{server}/stall", timeout=0.5)
    assert time.monotonic() - t0 < 5  # the timeout fired; the server would have waited 10 s
    assert list(tmp_path.iterdir()) == []
