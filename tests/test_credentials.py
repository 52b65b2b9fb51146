"""Credentials in URLs: the one redaction function, moving a credential out of a URL, and the edges that use them
(log records, terminal output, config and record dumps)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from loraflow.credentials import (
    PASSWORD_VAR,
    USERNAME_VAR,
    RedactingStream,
    install_log_redaction,
    move_tracking_credentials,
    redact,
    redacted_output,
    split_credentials,
)
from loraflow.errors import UsageError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://probeuser:S3cret@127.0.0.1:5000", "http://probeuser:***@127.0.0.1:5000"),
        ("https://user:pw@mlflow.example.com/#/experiments/1", "https://user:***@mlflow.example.com/#/experiments/1"),
        # userinfo without a password: the "user" is often the token itself
        ("https://ghp_abc123@github.com/org/repo", "https://***@github.com/org/repo"),
        ("http://user:@host", "http://user:***@host"),
        # percent-encoded characters, and an unencoded "@" that clients read up to the last one
        (
            "postgresql+asyncpg://loraflow:p%40ss%2Fw%3A@127.0.0.1:5432/prefect",
            "postgresql+asyncpg://loraflow:***@127.0.0.1:5432/prefect",
        ),
        ("http://u%40corp:p@ss@host/x", "http://u%40corp:***@host/x"),
        ("s3://AKIAXXX:wJalrXUtn@bucket/key", "s3://AKIAXXX:***@bucket/key"),
        # in free text: log lines, Markdown links, two URLs on a line
        (
            "MLflow UI: [run](http://u:pw@h:5000/#/e/1) or http://v:q@h2",
            "MLflow UI: [run](http://u:***@h:5000/#/e/1) or http://v:***@h2",
        ),
        ("API request to http://u:pw@h/api/2.0/runs failed", "API request to http://u:***@h/api/2.0/runs failed"),
        # query-string credentials keep their names
        ("https://h/hook?token=abc&channel=ml", "https://h/hook?token=***&channel=ml"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F2026&X-Amz-Date=20260101&X-Amz-Signature=f00d#x",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Date=20260101&X-Amz-Signature=***#x",
        ),
        (
            "http://h/?access_key=AK&api_key=1&AWSAccessKeyId=A&sig=s&client_secret=c",
            "http://h/?access_key=***&api_key=***&AWSAccessKeyId=***&sig=***&client_secret=***",
        ),
    ],
)
def test_redact_hides_credentials_in_urls(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: a dump of a dump stays the same


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "see http://host/a@b/c and mailto:someone@example.com",
        "models:/tiny-wordnet@candidate",
        "runs:/0123abcd/data/eval.jsonl",
        "git@github.com:org/repo.git",
        "train.learning_rate=0.0002 key=value",
        "https://h/search?keyword=lora&monkey=1",
        "/var/lib/loraflow/runs/tiny-20260101/summary.json",
        "",
    ],
)
def test_redact_leaves_other_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_walks_containers_and_keeps_other_values() -> None:
    value = {"uri": "http://u:p@h", "nested": [("https://t@h", 3)], "n": 1.5, "none": None, "flag": True}
    assert redact(value) == {
        "uri": "http://u:***@h",
        "nested": [("https://***@h", 3)],
        "n": 1.5,
        "none": None,
        "flag": True,
    }


def test_split_credentials_decodes_and_keeps_the_rest() -> None:
    assert split_credentials("http://u%40corp:p%2Fw@h:5000/x?y=1") == ("http://h:5000/x?y=1", "u@corp", "p/w")
    assert split_credentials("https://tok@h") == ("https://h", "tok", "")
    assert split_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)
    assert split_credentials("sqlite:///tmp/mlflow.db") == ("sqlite:///tmp/mlflow.db", None, None)


def test_move_tracking_credentials_puts_them_where_mlflow_reads_them() -> None:
    environ: dict[str, str] = {}
    clean, warning = move_tracking_credentials("http://bot:pa%3Ass@h:5000", "tracking.uri", environ)
    assert clean == "http://h:5000"
    assert environ == {USERNAME_VAR: "bot", PASSWORD_VAR: "pa:ss"}
    assert warning and "tracking.uri" in warning and USERNAME_VAR in warning and "\n" not in warning
    assert "pa:ss" not in warning and "pa%3Ass" not in warning

    # variables already set win, as in MLflow itself; a clean URI changes nothing and warns nothing
    environ = {USERNAME_VAR: "set", PASSWORD_VAR: "before"}
    assert move_tracking_credentials("http://bot:x@h", "MLFLOW_TRACKING_URI", environ)[0] == "http://h"
    assert environ == {USERNAME_VAR: "set", PASSWORD_VAR: "before"}
    assert move_tracking_credentials("http://h", "tracking.uri", environ) == ("http://h", None)


def test_a_database_url_with_a_password_is_refused_not_moved() -> None:
    environ: dict[str, str] = {}
    with pytest.raises(UsageError, match=r"tracking.uri is a postgresql\+psycopg database URL .*`mlflow server") as e:
        move_tracking_credentials("postgresql+psycopg://u:s3cret@db:5432/mlflow", "tracking.uri", environ)
    assert "s3cret" not in str(e.value) and environ == {}
    assert move_tracking_credentials("sqlite:///tmp/m.db", "tracking.uri", environ) == ("sqlite:///tmp/m.db", None)


def test_mlflow_sends_the_moved_credential_as_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """What moving relies on: MLflow's client authenticates from its variables (a real client, a recording server)."""
    import base64
    import http.server
    import threading

    from mlflow import MlflowClient

    seen: list[str | None] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            seen.append(self.headers.get("Authorization"))
            body = b'{"experiments": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        environ: dict[str, str] = {}
        url = f"http://probe:S3cret%2F1@127.0.0.1:{server.server_port}"
        clean, _ = move_tracking_credentials(url, "tracking.uri", environ)
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        MlflowClient(tracking_uri=clean).search_experiments()
    finally:
        server.shutdown()
    assert seen and seen[0] == "Basic " + base64.b64encode(b"probe:S3cret/1").decode()


def test_log_records_are_redacted_with_their_arguments_and_tracebacks() -> None:
    install_log_redaction()
    install_log_redaction()  # a second entry point in the same process: still one factory
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("loraflow.test.credentials")
    logger.addHandler(handler)
    try:
        logger.warning("tracking %s", "http://u:S3cret@h")
        try:
            raise RuntimeError("API request to http://u:S3cret@h/api failed")
        except RuntimeError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "S3cret" not in text
    assert "tracking http://u:***@h" in text and "API request to http://u:***@h/api failed" in text


def test_terminal_output_is_redacted_line_by_line() -> None:
    out = io.StringIO()
    stream = RedactingStream(out)
    stream.write("MLflow UI: http://u:S3")  # a URL split across writes is redacted once its line is complete
    assert out.getvalue() == ""
    stream.write("cret@h/#/1\nnext ")
    stream.flush()
    assert out.getvalue() == "MLflow UI: http://u:***@h/#/1\nnext "

    before = sys.stdout
    with redacted_output():
        print("uri http://u:S3cret@h")
    assert sys.stdout is before


def test_config_and_record_dumps_are_redacted(tmp_path) -> None:
    """Every dump of the config (run files, MLflow params, Prefect parameters) hides the credential; the live
    object keeps it for the entry point."""
    import json

    from loraflow.config import config_from_dict
    from loraflow.records import RegisteredVersion

    cfg = config_from_dict(
        {
            "base_model": {"name": "tiny", "path": "models/tiny"},
            "data": {"path": "data/train.jsonl"},
            "train": {"max_steps": 10},
            "registry": {"model_name": "tiny-adapter"},
            "tracking": {"uri": "http://bot:S3cret@mlflow:5000"},
        }
    )
    assert cfg.tracking.uri == "http://bot:S3cret@mlflow:5000"
    assert cfg.model_dump()["tracking"]["uri"] == "http://bot:***@mlflow:5000"
    assert "S3cret" not in cfg.model_dump_json() and "S3cret" not in json.dumps(cfg.tracking.model_dump(mode="json"))
    same_but_password = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"uri": "http://bot:x@mlflow:5000"})}
    )
    assert cfg.config_hash() == same_but_password.config_hash()  # a rotated password is the same recipe

    record = RegisteredVersion(name="m", version="1", alias="candidate", model_uri="http://u:S3cret@h/x", run_id="r")
    assert "S3cret" not in record.save(tmp_path / "r.json").read_text()


def test_mlflow_params_and_tags_are_redacted_before_mlflow_cuts_them(tmp_path) -> None:
    """The tracker redacts every param and tag, then cuts to MLflow's limits (a real MLflow store in a file):
    a cut first would leave a half password that no longer looks like one."""
    from mlflow import MlflowClient

    from loraflow import tags as T
    from loraflow.tracking import MlflowTracker, stage_run

    url, half = "http://u:Pw0rdXYZ@h", "http://u:Pw0rd"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MlflowTracker.start(uri, "credentials", "run", tags={"source": url})
    parent.log_params({"tracking": {"uri": url}, "long": "x" * (6000 - len(half)) + url})
    failure = "RuntimeError: " + "y" * (8000 - len("RuntimeError: ") - len(half) - 1) + " " + url
    with pytest.raises(RuntimeError), stage_run(parent, "train"):
        raise RuntimeError(failure.removeprefix("RuntimeError: "))
    run = MlflowClient(tracking_uri=uri).get_run(parent.run_id)
    assert run.data.params["tracking.uri"] == run.data.tags["source"] == "http://u:***@h"
    assert run.data.tags[T.FAILED_STAGE] == "train" and len(run.data.tags[T.FAILURE]) == 8000
    assert not any("Pw0rd" in v for v in [*run.data.params.values(), *run.data.tags.values()])
