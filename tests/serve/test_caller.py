"""Who is calling: keys from the key file, their scopes and budgets, and anyone when there is no key file."""

from __future__ import annotations

import hashlib
import json

import pytest

from fourwalls.errors import AuthError, ForbiddenError, FormatError, RateLimitError
from fourwalls.serve.caller import Caller, KeyRing


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ring(tmp_path, *keys: dict) -> KeyRing:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return KeyRing.load(path)


def test_key_groups_are_read_from_the_key_file(tmp_path):
    keys = ring(tmp_path, {"name": "admin", "sha256": sha("x"), "admin": True},
                {"name": "user", "sha256": sha("y")},
                {"name": "hr", "sha256": sha("z"), "groups": ["hr", "eng"]},
                {"name": "all", "sha256": sha("w"), "groups": ["*"]},
                {"name": "scoped-admin", "sha256": sha("v"), "admin": True, "groups": ["hr"]})
    groups = {k.name: Caller(k).groups for k in keys.keys}
    assert groups["admin"] is None and groups["all"] is None
    assert groups["user"] == set()  # only documents without groups
    assert groups["hr"] == {"hr", "eng"} and groups["scoped-admin"] == {"hr"}
    with pytest.raises(FormatError, match="groups"):
        ring(tmp_path, {"name": "bad", "sha256": sha("x"), "groups": "hr"})


def test_the_authorization_header_names_the_caller(tmp_path):
    keys = ring(tmp_path, {"name": "app", "sha256": sha("sk-app")}, {"name": "ops", "sha256": sha("sk-ops")})
    assert keys.authenticate("Bearer sk-ops").name == "ops"
    assert keys.authenticate("bearer  sk-app ").name == "app"
    for header in (None, "", "sk-app", "Basic sk-app", "Bearer sk-nope"):
        with pytest.raises(AuthError):
            keys.authenticate(header)


def test_without_a_key_file_anyone_may_do_anything():
    anyone = Caller()
    assert anyone.name is None and anyone.groups is None and anyone.may_use("any-model")
    anyone.require_model("any-model")
    anyone.require_admin("deleting a collection")
    for _ in range(1000):
        anyone.admit(10**6)
        anyone.spend(10**6)


def test_models_and_admin_routes_follow_the_key(tmp_path):
    keys = ring(tmp_path, {"name": "app", "sha256": sha("a"), "models": ["base", "pw"]},
                {"name": "ops", "sha256": sha("o"), "admin": True})
    app, ops = (keys.authenticate(f"Bearer {k}") for k in ("a", "o"))
    assert app.may_use("base") and not app.may_use("other") and ops.may_use("other")  # models: ["*"] by default
    app.require_model("base:pw", adapter="pw")  # an adapter the key may use, named with its base model
    with pytest.raises(ForbiddenError, match="this API key may not use model 'other'"):
        app.require_model("other")
    with pytest.raises(ForbiddenError, match="^creating a collection needs an admin API key$"):
        app.require_admin("creating a collection")
    ops.require_admin("creating a collection")


def test_budgets_count_requests_and_tokens_per_key(tmp_path):
    keys = ring(tmp_path, {"name": "rpm", "sha256": sha("r"), "rpm": 2},
                {"name": "tpm", "sha256": sha("t"), "tpm": 100})
    by_requests, by_tokens = keys.authenticate("Bearer r"), keys.authenticate("Bearer t")
    by_requests.admit(10**6)
    by_requests.admit(0)
    with pytest.raises(RateLimitError, match="2 requests per minute") as e:
        by_requests.admit(0)
    assert 1 <= e.value.retry_after <= 60
    by_tokens.admit(60)
    by_tokens.spend(70)  # prompt and completion: charged after the request
    by_tokens.admit(30)  # 70 + 30 fits in 100
    with pytest.raises(RateLimitError, match=r"70 used, this prompt has 31"):
        by_tokens.admit(31)
    with pytest.raises(RateLimitError):  # the next request of the same key shares its budget
        keys.authenticate("Bearer r").admit(0)
