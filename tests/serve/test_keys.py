"""`fourwalls keys add/list/rm`: the secret is printed once and only its sha256 is stored, in a file written
atomically and readable by its owner only, which `fourwalls serve` then reads."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from fourwalls.cli import main
from fourwalls.serve.caller import KeyRing


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def key_file(tmp_path) -> Path:
    return tmp_path / "home" / "api-keys.json"


def test_add_prints_the_secret_once_and_stores_only_its_hash(capsys, key_file):
    code, out, err = run(capsys, "keys", "add", "support-bot", "--group", "staff", "--models", "smol", "office-v1",
                         "--rpm", "60", "--tpm", "20000", "--profile", "rag")
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("fw-") and len(secret) > 40 and "\n" not in secret
    assert f"added key 'support-bot' to {key_file}" in err and secret not in err
    text = key_file.read_text()
    assert secret not in text
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    entry = json.loads(text)["keys"][0]
    assert entry == {"name": "support-bot", "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                     "models": ["smol", "office-v1"], "admin": False, "rpm": 60, "tpm": 20000, "groups": ["staff"],
                     "profile": "rag"}
    caller = KeyRing.load(key_file).authenticate(f"Bearer {secret}")
    assert caller.name == "support-bot" and caller.groups == {"staff"} and caller.key.profile == "rag"
    assert caller.may_use("office-v1") and not caller.may_use("other")
    assert [p.name for p in key_file.parent.iterdir()] == ["api-keys.json"]  # no temporary file left behind


def test_two_keys_have_different_secrets_and_list_shows_no_secret(capsys, key_file):
    _, first, _ = run(capsys, "keys", "add", "alice", "--admin")
    _, second, _ = run(capsys, "keys", "add", "bob")
    assert first != second
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ADMIN", "MODELS", "GROUPS", "RPM", "TPM", "PROFILE"]
    assert lines[1].split() == ["alice", "yes", "*", "(all)", "-", "-", "-"]
    assert lines[2].split() == ["bob", "no", "*", "(ungrouped", "only)", "-", "-", "-"]
    digest = json.loads(key_file.read_text())["keys"][0]["sha256"]
    assert first.strip() not in out and digest not in out
    ring = KeyRing.load(key_file)
    assert ring.authenticate(f"Bearer {first.strip()}").name == "alice"
    assert ring.authenticate(f"Bearer {second.strip()}").name == "bob"


def test_rm_removes_one_key_and_bad_input_changes_nothing(capsys, key_file):
    _, secret, _ = run(capsys, "keys", "add", "alice")
    run(capsys, "keys", "add", "bob")
    before = key_file.read_bytes()
    for argv, message in [(("keys", "add", "alice"), "already has a key named 'alice'"),
                          (("keys", "add", "bad name"), "invalid key name"),
                          (("keys", "add", "carol", "--rpm", "0"), "--rpm must be at least 1"),
                          (("keys", "rm", "nobody"), "no key named 'nobody'")]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
        assert key_file.read_bytes() == before
    code, out, _ = run(capsys, "keys", "rm", "bob")
    assert code == 0 and out == f"removed key 'bob' from {key_file}\n"
    assert [k.name for k in KeyRing.load(key_file).keys] == ["alice"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_serve_reads_the_homes_key_file_when_it_exists(capsys, key_file, monkeypatch):
    import fourwalls.serve.server as server

    seen = []
    monkeypatch.setattr(server, "serve", seen.append)
    assert main(["serve"]) == 0
    assert seen[-1].api_keys is None  # no key file: no keys
    run(capsys, "keys", "add", "alice")
    assert main(["serve"]) == 0
    assert seen[-1].api_keys == key_file
    assert main(["serve", "--api-keys", "other.json"]) == 0
    assert seen[-1].api_keys == Path("other.json")
    assert seen[-1].profiles is True and seen[-1].default_profile == "chat"  # the built-in profiles
    assert main(["serve", "--profiles", "p.toml", "--default-profile", "rag"]) == 0
    assert seen[-1].profiles == Path("p.toml") and seen[-1].default_profile == "rag"
    assert main(["serve", "--no-profiles"]) == 0
    assert seen[-1].profiles is None
