"""The README's "Signing requests" section is a contract: check it works.

Three signers written only from the README — plain Python (no itsdangerous),
the ```sh block (bash + openssl) and the ```js block (node) — must make tokens
that RequestVerifier accepts, and must reproduce the worked example, whose
numbers are parsed out of README.md so the test fails if the text drifts.
Nothing here touches the network: curl is replaced by a script that echoes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from openim_bizplugin.signing import RequestVerifier, sign

README = Path(__file__).resolve().parents[1] / "README.md"

# Timestamps whose bytes trip naive shell code: "%", "\", NUL, newline, short.
AWKWARD_TIMESTAMPS = [0x25252525, 0x5C5C5C5C, 0x69000000, 0x6900005C, 0x0A0A0A0A, 255, 256]
AWKWARD_SECRET = "k:with spaces $`\\ and 'quotes'"


def signing_section() -> str:
    text = README.read_text(encoding="utf-8")
    begin, end = text.index("<!-- SIGNING:BEGIN -->"), text.index("<!-- SIGNING:END -->")
    return text[begin:end]


def fenced(tag: str, after: str = "") -> str:
    """The first ```tag block of the signing section (after the heading *after*)."""
    section = signing_section()
    section = section[section.index(after):] if after else section
    match = re.search(rf"^```{tag}\n(.*?)^```", section, re.S | re.M)
    assert match, f"no ```{tag} block in the README signing section"
    return match.group(1)


def worked_example() -> dict[str, str]:
    return _pairs(fenced("text", after="### Worked example"))


def keyed_example() -> dict[str, str]:
    """The worked example again, sent with an Idempotency-Key header: its own values, then the rest."""
    return {**worked_example(), **_pairs(fenced("text", after="with the header `Idempotency-Key"))}


def _pairs(block: str) -> dict[str, str]:
    pairs = (re.match(r"^(\w[\w ]*?):\s+(.*)$", line) for line in block.splitlines())
    return {m.group(1): m.group(2) for m in pairs if m}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def readme_sign(secret: str, method: str, path: str, body: bytes, now: int,
                key: str | None = None) -> dict[str, str]:
    """SPEC §3 as the README states it, step by step, without itsdangerous."""
    first_line = f"{method.upper()} {path}" + ("" if key is None else f" {key}")
    value = hashlib.sha256(f"{first_line}\n".encode() + body).hexdigest()
    derived = hmac.new(secret.encode(), b"openim-bizplugin", hashlib.sha256).digest()
    ts_b64 = b64url(now.to_bytes(8, "big").lstrip(b"\0"))
    sig_b64 = b64url(hmac.new(derived, f"{value}.{ts_b64}".encode(), hashlib.sha256).digest())
    return {
        "value": value,
        "derived key": derived.hex(),
        "ts_b64": ts_b64,
        "sig_b64": sig_b64,
        "token": f"{value}.{ts_b64}.{sig_b64}",
    }


def verifier_at(secret: str, now: float) -> RequestVerifier:
    return RequestVerifier({"crm": [secret]}, clock=lambda: now)


# --- (a) the text ------------------------------------------------------------------


def test_worked_example_matches_independent_implementation() -> None:
    ex = worked_example()
    body = ex["body"].encode()
    assert f"The body is the {len(body)} bytes" in signing_section()
    computed = readme_sign(ex["secret"], ex["method"], ex["path"], body, int(ex["timestamp"]))
    for key in ("value", "derived key", "ts_b64", "sig_b64", "token"):
        assert ex[key] == computed[key], key


def test_worked_example_matches_the_package() -> None:
    ex = worked_example()
    body = ex["body"].encode()
    assert sign(ex["secret"], ex["method"], ex["path"], body, now=int(ex["timestamp"])) == ex["token"]
    result = verifier_at(ex["secret"], int(ex["timestamp"])).verify(
        "crm", ex["token"], ex["method"], ex["path"], body
    )
    assert result.timestamp == int(ex["timestamp"])


def test_keyed_example_matches_independent_implementation_and_the_package() -> None:
    ex = keyed_example()
    body, key = ex["body"].encode(), ex["idempotency key"]
    assert f"hashes `{ex['method']} {ex['path']} {key}`, a newline and the same body" in signing_section()
    computed = readme_sign(ex["secret"], ex["method"], ex["path"], body, int(ex["timestamp"]), key)
    assert (ex["value"], ex["token"]) == (computed["value"], computed["token"])
    assert sign(ex["secret"], ex["method"], ex["path"], body, now=int(ex["timestamp"]), idempotency_key=key) \
        == ex["token"]
    verifier = verifier_at(ex["secret"], int(ex["timestamp"]))
    assert verifier.verify("crm", ex["token"], ex["method"], ex["path"], body, key).client_id == "crm"


@pytest.mark.parametrize("now", [*AWKWARD_TIMESTAMPS, 1_764_158_400])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/messages", b'{"a": "\xc3\xa9\\n"}\n'), ("GET", "/v1/messages/abc?x=1&y=%20", b"")],
)
def test_independent_tokens_verify(now: int, method: str, path: str, body: bytes) -> None:
    token = readme_sign(AWKWARD_SECRET, method, path, body, now)["token"]
    assert token == sign(AWKWARD_SECRET, method, path, body, now=now)
    assert verifier_at(AWKWARD_SECRET, now).verify("crm", token, method, path, body).timestamp == now


# --- (b) the sh block ------------------------------------------------------------------


@pytest.fixture
def fake_curl(tmp_path: Path) -> Path:
    script = tmp_path / "fake-curl"
    script.write_text('#!/bin/sh\nfor arg in "$@"; do printf \'%s\\n\' "$arg"; done\n')
    script.chmod(0o755)
    return script


def run_sh(tmp_path: Path, script: str, **env: str) -> list[str]:
    if not shutil.which("bash") or not shutil.which("openssl"):
        pytest.skip("the README's sh example needs bash and openssl on PATH")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BIZ_URL": "http://sidecar.invalid"}
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env={**base, **env},
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def test_sh_block_reproduces_worked_example_and_calls_curl(tmp_path: Path, fake_curl: Path) -> None:
    ex = worked_example()
    (tmp_path / "body.json").write_bytes(ex["body"].encode())
    args = run_sh(
        tmp_path, fenced("sh"), CURL=str(fake_curl), BIZ_CLIENT="crm",
        BIZ_SECRET=ex["secret"], BIZ_NOW=ex["timestamp"],
    )
    assert args[args.index("-X") + 1] == "POST"
    assert "http://sidecar.invalid/v1/messages" in args
    assert "X-Biz-Client: crm" in args
    assert f"X-Biz-Signature: {ex['token']}" in args
    assert args[args.index("--data-binary") + 1] == "@body.json"


def test_sh_block_signs_with_the_current_time(tmp_path: Path, fake_curl: Path) -> None:
    body = b'{"type":"profile.updated","version":1}\n'
    (tmp_path / "body.json").write_bytes(body)
    args = run_sh(tmp_path, fenced("sh"), CURL=str(fake_curl), BIZ_CLIENT="crm", BIZ_SECRET="s")
    token = next(a for a in args if a.startswith("X-Biz-Signature: ")).split(": ", 1)[1]
    verifier = verifier_at("s", time.time())  # `date +%s` just ran; no sleeping
    assert verifier.verify("crm", token, "POST", "/v1/messages", body).client_id == "crm"


def test_sh_biz_sign_function_signs_an_idempotency_key(tmp_path: Path) -> None:
    ex = keyed_example()
    (tmp_path / "body.json").write_bytes(ex["body"].encode())
    calls = (f"biz_sign POST /v1/messages body.json '{ex['idempotency key']}'\n"
             "biz_sign POST /v1/messages body.json\n")
    tokens = run_sh(tmp_path, fenced("sh") + "\n" + calls, CURL=":", BIZ_SECRET=ex["secret"],
                    BIZ_NOW=ex["timestamp"], BIZ_CLIENT="crm")
    assert tokens == [ex["token"], worked_example()["token"]]


def test_sh_biz_sign_function_with_awkward_inputs(tmp_path: Path) -> None:
    path = "/v1/messages/abc?x=1&y=%20"
    calls = "\n".join(f"BIZ_NOW={now} biz_sign get '{path}' /dev/null" for now in AWKWARD_TIMESTAMPS)
    (tmp_path / "body.json").write_bytes(b"{}")
    tokens = run_sh(tmp_path, fenced("sh") + "\n" + calls, CURL=":", BIZ_SECRET=AWKWARD_SECRET)
    assert len(tokens) == len(AWKWARD_TIMESTAMPS)
    for now, token in zip(AWKWARD_TIMESTAMPS, tokens):
        assert verifier_at(AWKWARD_SECRET, now).verify("crm", token, "GET", path, b"").timestamp == now


# --- (c) the js block ----------------------------------------------------------------------


def test_js_block(tmp_path: Path) -> None:
    if not shutil.which("node"):
        pytest.skip("node is not on PATH")
    ex = worked_example()
    (tmp_path / "body.json").write_bytes(ex["body"].encode())
    driver = """
const fs = require("fs");
const secret = process.env.BIZ_SECRET;
const body = fs.readFileSync("body.json");
console.log(bizSign(secret, "post", "/v1/messages", body, Number(process.env.BIZ_NOW) + 0.5));
console.log(bizSign(secret, "POST", "/v1/messages", body));
console.log(bizSign(secret, "POST", "/v1/messages", body, Number(process.env.BIZ_NOW), process.env.BIZ_KEY));
"""
    program = tmp_path / "sign.js"
    program.write_text(fenced("js") + driver)
    done = subprocess.run(
        ["node", str(program)], cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ.get("PATH", ""), "BIZ_SECRET": ex["secret"], "BIZ_NOW": ex["timestamp"],
             "BIZ_KEY": keyed_example()["idempotency key"]},
    )
    assert done.returncode == 0, done.stderr
    pinned, current, keyed = done.stdout.split()
    assert pinned == ex["token"] and keyed == keyed_example()["token"]
    verifier = verifier_at(ex["secret"], time.time())
    assert verifier.verify("crm", current, "POST", "/v1/messages", ex["body"].encode()).client_id == "crm"
