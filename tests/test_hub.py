"""`--push-to-hub`: dry run, missing token, a real upload through huggingface_hub to a loopback
fake Hub, and the token never reaching a file or the output."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill import hub
from mlx_distill.errors import DistillError
from mlx_distill.export import cli
from tests.test_export_helpers import make_adapter

SENTINEL = "hf_SENTINELtokenDoNotLeak1234567890"


class FakeHub:
    """Just enough of the Hub API for create_repo + upload_folder (files sent inline, 'regular')."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.created: list[dict] = []
        self.files: dict[str, bytes] = {}
        hubself = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hubself.requests.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    hubself.created.append(json.loads(body))
                    name = json.loads(body)
                    return self.reply({"url": f"{hubself.url}/{name['organization']}/{name['name']}"})
                if path == "/api/validate-yaml":
                    return self.reply({"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                                  "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hubself.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self.reply({"commitUrl": f"{hubself.url}/c/1", "commitOid": "a" * 40,
                                       "pullRequestUrl": None})
                self.reply({"error": f"fake hub: no route {path}"}, 404)

            def do_GET(self) -> None:  # noqa: N802
                hubself.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                self.reply({"error": "fake hub: no GET routes"}, 404)

            def reply(self, obj: dict, status: int = 200) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    server = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("hub") / "adapters", iters=2, learning_rate=1e-2)


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


@pytest.mark.torch
def test_export_dry_run_lists_sends_nothing_and_never_leaks_the_token(
        tiny_model_dir: Path, adapter: Path, tmp_path: Path, fake_hub: FakeHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter), "--out", str(out),
                                   "--push-to-hub", "me/tiny-student", "--private", "--dry-run", "--peft"])
    assert res.exit_code == 0, res.output
    assert "would create private repo me/tiny-student" in res.output
    for name in ("model.safetensors", "README.md", "config.json", "peft/adapter_model.safetensors", "verify.json"):
        assert f"  {name}  (" in res.output
    assert "nothing was sent" in res.output
    assert fake_hub.requests == []
    assert SENTINEL not in res.output
    assert SENTINEL.encode() not in all_bytes(tmp_path)
    assert 'from_pretrained("me/tiny-student"' in (out / "README.md").read_text()


def test_push_without_token_says_how_to_log_in(tiny_model_dir: Path, adapter: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    res = CliRunner().invoke(cli, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter),
                                   "--out", str(tmp_path / "out"), "--push-to-hub", "me/x"])
    assert res.exit_code == 2
    assert "huggingface-cli login" in res.output and "export HF_TOKEN=" in res.output
    assert not (tmp_path / "out").exists()  # failed before any work
    res = CliRunner().invoke(cli, ["--adapter-path", str(adapter), "--out", str(tmp_path / "o"),
                                   "--push-to-hub", "not a repo"])
    assert res.exit_code == 2 and "expected a Hub repo id" in res.output


def test_push_uploads_through_huggingface_hub(tiny_model_dir: Path, adapter: Path, tmp_path: Path,
                                              fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter), "--out", str(out),
                                   "--no-verify"])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    # Push the finished export (no --adapter-path: push-only), private.
    res = CliRunner().invoke(cli, ["--out", str(out), "--push-to-hub", "me/tiny-student", "--private"])
    assert res.exit_code == 0, res.output
    assert fake_hub.created == [{"name": "tiny-student", "organization": "me", "visibility": "private",
                                 "type": "model"}]
    assert set(fake_hub.files) == {n for n, _ in hub.plan(out)}
    assert fake_hub.files["config.json"] == (out / "config.json").read_bytes()
    auth = {path.split("/")[2]: h.get("authorization") for _, path, h in fake_hub.requests}
    assert auth["repos"] == auth["models"] == f"Bearer {SENTINEL}"  # create + preupload/commit
    assert {a for a in auth.values() if a} == {f"Bearer {SENTINEL}"}
    assert SENTINEL not in res.output
    assert SENTINEL.encode() not in all_bytes(tmp_path)


def test_upload_errors_are_scrubbed_of_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("x")

    class Failing:
        def __init__(self, **kw: object) -> None:
            self.token = kw["token"]

        def create_repo(self, *a: object, **kw: object) -> None:
            raise RuntimeError(f"401 for token {self.token}")

    with pytest.raises(DistillError, match=r"401 for token \*\*\*") as e:
        hub.push(tmp_path, "me/x", token=SENTINEL, api_factory=Failing, echo=lambda s: None)
    assert SENTINEL not in str(e.value)


def test_secret_scan_blocks_a_leaking_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-secretvalue")
    (tmp_path / "README.md").write_text("key: sk-ant-api03-secretvalue")
    with pytest.raises(DistillError, match="README.md contains a secret token"):
        hub.assert_no_secrets(tmp_path)
