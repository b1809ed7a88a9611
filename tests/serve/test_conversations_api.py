"""/v1/conversations, /v1/me and the web page's files over HTTP, against a live server with API keys (a tiny random
model with the bundled model's tokenizer answers: these routes never run it)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.serve.app import UI, UI_LIBRARIES, route_label
from fourwalls.serve.server import ServeConfig
from tests.serve.conftest import LiveServer, free_port, key_file, tiny_chat_model

pytestmark = pytest.mark.slow
ADMIN, ALICE, BOB = "sk-admin", "sk-alice", "sk-bob"
SETTINGS = {"model": "tiny-chat", "system": "", "temperature": 0.5, "max_tokens": 32, "collection": None,
            "tools": ["calculator"]}


@pytest.fixture(scope="module")
def server(session_store, smol, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conversations-api")
    keys = key_file(tmp / "keys.json", {ADMIN: {"name": "admin", "admin": True},
                                        ALICE: {"name": "alice", "groups": ["a"]}, BOB: {"name": "bob"}})
    cfg = ServeConfig(tiny_chat_model(session_store, smol), port=free_port(), api_keys=keys,
                      conversations=tmp / "conversations.db", engine=EngineConfig(max_batch=2, max_len=512),
                      max_body_bytes=32 * 1024)
    live = LiveServer(cfg, session_store)
    yield live
    live.close()


def call(server, method: str, path: str, key: str | None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kw)


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def create(server, key: str, title: str, question: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": f"About {title}.",
                                                        "usage": {"prompt_tokens": 5, "completion_tokens": 3}}]
    r = call(server, "POST", "/v1/conversations", key, json={"title": title, "settings": SETTINGS,
                                                              "messages": messages})
    assert r.status_code == 201, r.text
    return r.json()


def test_a_conversation_is_saved_listed_searched_renamed_exported_and_deleted(server):
    c = create(server, ALICE, "Holidays", "How many vacation days?")
    assert c["id"].startswith("conv_") and c["object"] == "conversation" and c["settings"] == SETTINGS
    assert c["messages"][1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3}  # kept as sent
    got = call(server, "GET", f"/v1/conversations/{c['id']}", ALICE).json()
    assert got["messages"] == c["messages"] and got["title"] == "Holidays"
    listed = call(server, "GET", "/v1/conversations", ALICE).json()
    assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == [c["id"]]
    assert listed["data"][0]["message_count"] == 2 and "messages" not in listed["data"][0]
    assert [x["id"] for x in call(server, "GET", "/v1/conversations?q=VACATION", ALICE).json()["data"]] == [c["id"]]
    assert call(server, "GET", "/v1/conversations?q=payroll", ALICE).json()["data"] == []

    more = [*c["messages"], {"role": "user", "content": "And sick days?"},
            {"role": "assistant", "content": "Ask HR [1].", "citations": [{"index": 1, "source": "hr.md"}]}]
    r = call(server, "PATCH", f"/v1/conversations/{c['id']}", ALICE, json={"title": "Time off", "messages": more})
    assert r.status_code == 200 and r.json()["title"] == "Time off" and r.json()["message_count"] == 4
    assert call(server, "GET", f"/v1/conversations/{c['id']}", ALICE).json()["messages"] == more

    md = call(server, "GET", f"/v1/conversations/{c['id']}/export?format=markdown", ALICE)
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert md.headers["content-disposition"] == 'attachment; filename="Time-off.md"'
    assert md.text.startswith("# Time off\n") and "## User\n\nAnd sick days?" in md.text and "- [1] hr.md" in md.text
    js = call(server, "GET", f"/v1/conversations/{c['id']}/export", ALICE)
    assert js.headers["content-disposition"] == 'attachment; filename="Time-off.json"'
    assert json.loads(js.text)["messages"] == more

    r = call(server, "DELETE", f"/v1/conversations/{c['id']}", ALICE)
    assert r.status_code == 200 and r.json() == {"id": c["id"], "object": "conversation", "deleted": True}
    error(call(server, "GET", f"/v1/conversations/{c['id']}", ALICE), 404)


def test_another_keys_conversation_is_a_404_as_if_it_did_not_exist(server):
    theirs = create(server, BOB, "Bob's notes", "What is my bonus?")
    mine = create(server, ALICE, "Alice's notes", "What is my bonus?")
    missing = "conv_" + "0" * 32
    for method, suffix, kw in [("GET", "", {}), ("PATCH", "", {"json": {"title": "stolen"}}), ("DELETE", "", {}),
                               ("GET", "/export?format=markdown", {})]:
        got = error(call(server, method, f"/v1/conversations/{theirs['id']}{suffix}", ALICE, **kw), 404)
        nothing = error(call(server, method, f"/v1/conversations/{missing}{suffix}", ALICE, **kw), 404)
        assert got["message"].replace(theirs["id"], "X") == nothing["message"].replace(missing, "X")
        assert got["code"] == nothing["code"] == "conversation_not_found"
    assert [x["id"] for x in call(server, "GET", "/v1/conversations?q=bonus", ALICE).json()["data"]] == [mine["id"]]
    assert mine["id"] not in {x["id"] for x in call(server, "GET", "/v1/conversations", BOB).json()["data"]}
    # An admin key is an owner like any other: it does not read other keys' conversations either.
    error(call(server, "GET", f"/v1/conversations/{theirs['id']}", ADMIN), 404)
    assert call(server, "GET", f"/v1/conversations/{theirs['id']}", BOB).json()["title"] == "Bob's notes"


@pytest.mark.parametrize("body, param", [
    ({"title": "x" * 201}, "title"),
    ({"settings": {"model": "m", "temprature": 1}}, "settings"),  # a misspelt setting is refused, not dropped
    ({"settings": {"temperature": 3}}, "settings"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_conversations_get_a_400_naming_the_field(server, body, param):
    assert error(call(server, "POST", "/v1/conversations", ALICE, json=body), 400)["param"] == param


def test_conversations_need_a_key_and_a_body_within_the_limit(server):
    error(call(server, "GET", "/v1/conversations", None), 401)
    error(call(server, "GET", "/v1/conversations", "sk-wrong"), 401)
    big = [{"role": "user", "content": "x" * 40_000}]
    err = error(call(server, "POST", "/v1/conversations", ALICE, json={"messages": big}), 413)
    assert "32768 bytes" in err["message"]
    error(call(server, "GET", "/v1/conversations?limit=0", ALICE), 400)


def test_me_tells_the_page_what_the_key_may_do(server):
    me = call(server, "GET", "/v1/me", ALICE).json()
    assert me == {"object": "caller", "name": "alice", "admin": False, "groups": ["a"], "models": ["*"],
                  "auth": True, "max_body_bytes": 32 * 1024}
    assert call(server, "GET", "/v1/me", ADMIN).json()["admin"] is True
    assert call(server, "GET", "/v1/me", ADMIN).json()["groups"] is None  # an admin reads every group
    assert error(call(server, "GET", "/v1/me", "sk-wrong"), 401)["message"] == "invalid API key"
    keys, server.state.keys = server.state.keys, None
    try:
        local = call(server, "GET", "/v1/me", None).json()
        assert local["name"] is None and local["admin"] is True and local["auth"] is False
    finally:
        server.state.keys = keys


def test_every_route_of_the_page_is_in_the_openapi_document(server):
    paths = call(server, "GET", "/openapi.json", None).json()["paths"]
    assert set(paths["/v1/conversations"]) == {"get", "post"}
    assert set(paths["/v1/conversations/{conversation_id}"]) == {"get", "patch", "delete"}
    assert "get" in paths["/v1/conversations/{conversation_id}/export"] and "get" in paths["/v1/me"]
    # What the page calls: every /v1 path its scripts write out is a documented route (parameters as {}).
    used = {re.sub(r"\$\{[^}]*\}", "{}", path.split("?")[0]) for script in UI.glob("*.js")
            for path in re.findall(r"[`\"](/v1/[^`\"]*)[`\"]", script.read_text())}
    documented = {re.sub(r"\{[^}]*\}", "{}", p) for p in paths}
    assert "/v1/conversations/{}/export" in used and "/v1/chat/completions" in used
    assert used <= documented, used - documented


def test_the_page_and_its_files_are_served_with_a_strict_policy(server):
    assert all((UI / name).is_file() for name in UI_LIBRARIES), "run scripts/build-ui (make test does)"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp
    assert '<script type="module" src="/ui/app.js">' in page.text
    for name in ("app.js", "style.css", *UI_LIBRARIES):
        r = httpx.get(f"{server.url}/ui/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript", "text/css")
    error(httpx.get(f"{server.url}/ui/nothing.js"), 404)
    error(httpx.get(f"{server.url}/ui/../app.py"), 404)


def test_route_labels_keep_ids_out_of_metrics():
    assert route_label("/v1/conversations/conv_1234") == "/v1/conversations/{id}"
    assert route_label("/v1/conversations/conv_1234/export") == "/v1/conversations/{id}/export"
    assert route_label("/ui/vendor/marked.esm.js") == "/ui/{path}"
    assert route_label("/") == "/" and route_label("/v1/me") == "/v1/me"


def test_saving_onto_a_full_disk_is_a_507_and_keeps_what_was_saved(session_store, smol, small_disk):
    disk = small_disk(256)  # the schema and one conversation fit; a conversation of 400 KB does not
    live = LiveServer(ServeConfig(tiny_chat_model(session_store, smol), port=free_port(),
                                  conversations=disk / "conversations.db",
                                  engine=EngineConfig(max_batch=1, max_len=256)), session_store)
    try:
        kept = create(live, None, "Small", "Hi?")
        big = [{"role": "user", "content": "x" * 400_000}]
        r = call(live, "POST", "/v1/conversations", None, json={"title": "Big", "messages": big})
        err = error(r, 507)
        assert err["code"] == "disk_full" and "disk is full" in err["message"] and r.headers["connection"] == "close"
        r = call(live, "PATCH", f"/v1/conversations/{kept['id']}", None, json={"messages": big})
        assert error(r, 507)["code"] == "disk_full"
        listed = call(live, "GET", "/v1/conversations", None).json()["data"]
        assert [c["title"] for c in listed] == ["Small"]
        assert call(live, "GET", f"/v1/conversations/{kept['id']}", None).json()["messages"] == kept["messages"]
    finally:
        live.close()
