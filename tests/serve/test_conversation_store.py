"""The saved conversations' store: each owner sees only its own, search, replace, delete, and what survives a
restart."""

from __future__ import annotations

import threading

import pytest

from fourwalls.errors import NotFoundError, UsageError
from fourwalls.serve.conversation_store import ConversationStore, to_markdown

SETTINGS = {"model": "smollm2-135m-instruct", "system": "Be brief.", "temperature": 0.2, "max_tokens": 64,
            "collection": "handbook"}


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "conversations.db")
    yield s
    s.close()


def turn(question: str, answer: str, **extra) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, **extra}]


def test_an_owner_sees_only_its_own_conversations(store):
    a = store.create("alice", "Holidays", SETTINGS, turn("How many days off?", "25."))
    b = store.create("bob", "Bonus", {}, turn("When is the bonus paid?", "In May."))
    assert [c.id for c in store.list("alice")] == [a.id]
    assert [c.id for c in store.list("bob")] == [b.id]
    assert store.list("") == []  # the local user of a server without keys is an owner of its own
    # Another owner's id is not found, by every call, exactly as an id that never existed.
    for call in (lambda: store.get("alice", b.id), lambda: store.update("alice", b.id, title="mine"),
                 lambda: store.delete("alice", b.id)):
        with pytest.raises(NotFoundError) as theirs:
            call()
        with pytest.raises(NotFoundError) as nobodys:
            store.get("alice", "conv_0000")
        assert str(theirs.value).replace(b.id, "X") == str(nobodys.value).replace("conv_0000", "X")
    assert store.get("bob", b.id).title == "Bonus"  # untouched by alice's attempts
    assert store.get("bob", b.id).messages[1]["content"] == "In May."


def test_the_list_is_last_updated_first_and_search_looks_in_titles_and_messages(store):
    first = store.create("alice", "Holidays", SETTINGS, turn("How many vacation days?", "Twenty-five."))
    second = store.create("alice", "Deploys", SETTINGS, turn("When do we deploy?", "On Tuesdays."))
    assert [c.id for c in store.list("alice")] == [second.id, first.id]
    store.update("alice", first.id, messages=turn("How many vacation days?", "Twenty-five, and they carry over."))
    listed = store.list("alice")
    assert [c.id for c in listed] == [first.id, second.id]
    assert listed[0].summary()["message_count"] == 2 and listed[0].summary()["model"] == SETTINGS["model"]
    assert "messages" not in listed[0].summary()
    assert [c.id for c in store.list("alice", "TUESDAYS")] == [second.id]  # in an answer, any case
    assert [c.id for c in store.list("alice", "holidays")] == [first.id]  # in a title
    assert [c.id for c in store.list("alice", "carry over")] == [first.id]  # in the replaced messages
    assert store.list("alice", "swordfish") == []
    assert store.list("alice", "%") == [] and store.list("alice", "_") == []  # no wildcards
    assert len(store.list("alice", "  ")) == 2  # a blank query lists everything
    assert store.list("bob", "Tuesdays") == []
    assert len(store.list("alice", limit=1)) == 1


def test_update_replaces_what_is_given_and_keeps_the_rest(store):
    c = store.create("alice", "Draft", SETTINGS, turn("Hi", "Hello!"))
    renamed = store.update("alice", c.id, title="Greetings")
    assert renamed.title == "Greetings" and renamed.settings == SETTINGS and len(renamed.messages) == 2
    assert renamed.updated >= c.updated and renamed.created == c.created
    longer = turn("Hi", "Hello!") + turn("Cite it", "See [1].", citations=[{"index": 1, "source": "a.md"}],
                                         usage={"prompt_tokens": 9, "completion_tokens": 3})
    store.update("alice", c.id, messages=longer)
    got = store.get("alice", c.id)
    assert got.messages == longer and got.title == "Greetings" and got.message_count == 4
    store.update("alice", c.id, settings={**SETTINGS, "collection": None})
    assert store.get("alice", c.id).settings["collection"] is None
    store.delete("alice", c.id)
    with pytest.raises(NotFoundError):
        store.get("alice", c.id)
    with pytest.raises(NotFoundError):
        store.delete("alice", c.id)


def test_conversations_survive_reopening_and_bad_text_changes_nothing(tmp_path):
    path = tmp_path / "home" / "conversations.db"
    store = ConversationStore(path)
    c = store.create("alice", "Ünïcode ✓", SETTINGS, turn("Grüße", "こんにちは"))
    with pytest.raises(UsageError, match="lone surrogate"):
        store.update("alice", c.id, messages=turn("\ud800", "broken"))
    with pytest.raises(UsageError, match="not finite"):
        store.update("alice", c.id, messages=turn("How fast?", "Very.", usage={"seconds": float("inf")}))
    store.close()
    again = ConversationStore(path)
    got = again.get("alice", c.id)
    assert got.title == "Ünïcode ✓" and got.messages == turn("Grüße", "こんにちは")
    assert [x.id for x in again.list("alice", "GRÜSSE")] == [c.id]  # Unicode case folding: ß is ss
    assert [x.id for x in again.list("alice", "こんにちは")] == [c.id]
    again.close()


def test_concurrent_writers_lose_no_conversation(store):
    def work(i: int) -> None:
        c = store.create(f"owner{i % 2}", f"c{i}", {}, [])
        for n in range(5):
            store.update(f"owner{i % 2}", c.id, messages=turn(f"q{n}", f"a{n}"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list("owner0")) == len(store.list("owner1")) == 4
    assert all(c.message_count == 2 for c in store.list("owner0") + store.list("owner1"))


def test_markdown_export_has_the_settings_the_messages_and_the_sources(store):
    c = store.create("alice", "Holidays", SETTINGS, [
        {"role": "user", "content": "How many days off?"},
        {"role": "assistant", "content": "25 days [1].", "citations": [
            {"index": 1, "source": "holidays.md", "heading": "Holidays", "page": None, "cited": True},
            {"index": 2, "source": "handbook.pdf", "heading": None, "page": 3, "cited": False}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"x": "2+2"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"}])
    md = to_markdown(store.get("alice", c.id))
    assert md.startswith("# Holidays\n")
    assert "- Model: smollm2-135m-instruct" in md and "- Documents: handbook" in md
    assert "## System\n\nBe brief." in md
    assert "## User\n\nHow many days off?" in md and "## Assistant\n\n25 days [1]." in md
    assert "- [1] holidays.md (Holidays)" in md and "- [2] handbook.pdf (page 3)" in md
    assert 'Tool call `calculator`: `{"x": "2+2"}`' in md and "## Tool\n\n4" in md
