"""Application profiles: the TOML file, and the engine serving priorities and SLOs."""

from __future__ import annotations

import threading

import pytest
import torch

from fourwalls.engine import Request
from fourwalls.engine.profiles import BUILTIN, Profile, load_profiles
from fourwalls.errors import FourwallsError, OverloadedError, UsageError
from fourwalls.generate import SamplingParams
from tests.conftest import tiny_model
from tests.engine.test_engine import alone, idle

CHAT, RAG, BATCH = BUILTIN["chat"], BUILTIN["rag"], BUILTIN["batch"]


def test_a_toml_file_adds_profiles_and_changes_built_in_ones(tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text("[profiles.support]\npriority = 0\nttft_ms = 800\nitl_ms = 100\nmax_tokens = 512\n\n"
                    "[profiles.batch]\nmax_tokens = 8192\n")
    p = load_profiles(path)
    assert p["support"] == Profile("support", 0, 0.8, 0.1, 512)
    assert p["batch"] == Profile("batch", 3, None, None, 8192)  # only what the file names changes
    assert p["chat"] == CHAT and load_profiles(None) == BUILTIN


@pytest.mark.parametrize("text, message", [
    ("[profiles.x]\npriority = 1\nmax_tokens = 5\nttft = 3\n", "unknown field(s) ttft"),
    ("[profiles.x]\npriority = 1\n", "is new: it needs priority and max_tokens"),
    ("[profiles.chat]\nitl_ms = 0\n", "itl_ms must be an integer of at least 1"),
    ("[profiles.chat]\npriority = 1.5\n", "priority must be an integer of at least 0"),
    ("[profiles.Chat]\npriority = 1\n", "a name is lowercase letters"),
    ("[other]\na = 1\n", "expected only [profiles.NAME] tables"),
    ("[profiles.chat\n", "is not valid TOML"),
])
def test_a_wrong_profiles_file_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_profiles(path)


class Job:
    """A request for the engine, remembering when it finished relative to the others."""

    order: list[Job] = []

    def __init__(self, prompt: list[int], profile: Profile | None, tokens: int) -> None:
        self.prompt, self.tokens, self.done = prompt, [], threading.Event()
        self.request = Request(prompt, SamplingParams(max_new_tokens=tokens, temperature=0), self._emit,
                               profile=profile)

    def _emit(self, ev) -> None:
        assert not isinstance(ev, FourwallsError), ev
        self.tokens += [t.id for t in ev.tokens]
        if ev.finish_reason:
            Job.order.append(self)
            self.done.set()


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (length,), generator=gen).tolist() for _ in range(n)]


def test_the_best_priority_is_served_first_and_arrival_order_within_one(make_engine_stopped):
    model = tiny_model()
    engine = make_engine_stopped(model, max_batch=1, max_len=128, prefill_chunk=8)
    Job.order = []
    b1, b2, c, r = (Job(p, prof, 6) for p, prof in zip(prompts(4, 10), (BATCH, BATCH, CHAT, RAG)))
    engine.submit(b1.request, b2.request, c.request, r.request)
    engine.start()
    for j in (b1, b2, c, r):
        assert j.done.wait(60)
        assert j.tokens == alone(model, j.prompt, max_new_tokens=6, temperature=0)
    assert Job.order == [c, r, b1, b2]


def test_a_chat_request_preempts_a_batch_one_which_then_finishes_unchanged(make_engine):
    model = tiny_model()
    engine = make_engine(model, max_batch=1, max_len=256, prefill_chunk=8)
    Job.order = []
    long, short = prompts(2, 12, seed=1)
    batch = Job(long, BATCH, 200)
    engine.submit(batch.request)
    while len(batch.tokens) < 5:  # it is decoding, and holds the batch's only row
        assert not batch.done.is_set()
        threading.Event().wait(0.001)
    chat = Job(short, CHAT, 8)
    engine.submit(chat.request)
    assert chat.done.wait(60) and batch.done.wait(60)
    assert Job.order == [chat, batch] and engine.preemptions >= 1
    assert batch.tokens == alone(model, long, max_new_tokens=200, temperature=0)
    assert chat.tokens == alone(model, short, max_new_tokens=8, temperature=0)
    assert idle(engine).kv_usage == 0


def test_a_better_priority_starts_its_prompt_while_a_worse_one_is_prefilling(make_engine_stopped):
    engine = make_engine_stopped(tiny_model(), max_batch=4, max_len=256, prefill_chunk=16)
    b1, b2, c = Job(prompts(1, 100)[0], BATCH, 4), Job(prompts(1, 100)[0], BATCH, 4), Job(prompts(1, 20)[0], CHAT, 4)
    with torch.inference_mode():
        engine.submit(b1.request)
        engine._admit()
        engine._prefill()
        assert engine.running == [b1.request] and b1.request.pos == 16
        engine.submit(b2.request, c.request)
        engine._admit()  # chat outranks the prompt being prefilled; the second batch waits its turn
        assert engine.running == [b1.request, c.request] and list(engine.waiting) == [b2.request]
        engine._prefill()
        assert c.request.decoding and b1.request.pos == 16  # chat's 19 tokens before batch's next chunk


def test_a_worse_prioritys_prompt_chunks_shrink_to_keep_a_better_streams_itl_slo(make_engine_stopped):
    engine = make_engine_stopped(tiny_model(), max_batch=4, max_len=256, prefill_chunk=256, block_size=16)
    chat, batch = Job(prompts(1, 1)[0], CHAT, 50), Job(prompts(1, 200)[0], BATCH, 4)
    with torch.inference_mode():
        engine.submit(chat.request)
        engine._admit()
        assert chat.request.decoding
        assert engine._chunk(batch.request) == 256  # nothing measured yet
        engine.step_seconds, engine.token_seconds = {1: 0.05}, 0.001
        # 0.15 s of chat's ITL SLO, less 0.05 s of decoding: 100 tokens' time, 96 in whole blocks
        assert engine._chunk(batch.request) == 96
        assert engine._chunk(Job(prompts(1, 200)[0], CHAT, 4).request) == 256  # equals are not held back
        engine.token_seconds = 1.0
        assert engine._chunk(batch.request) == 16  # at least a block: a prompt always advances
        engine.running[0].profile = BATCH
        assert engine._chunk(batch.request) == 256  # no SLO to keep
        engine.running[0].profile = CHAT
        engine.submit(batch.request)
        engine.token_seconds = 0.001
        engine._admit()
        engine._prefill()
        assert batch.request.pos == 96


def test_a_row_that_would_break_a_better_prioritys_itl_slo_waits(make_engine_stopped):
    engine = make_engine_stopped(tiny_model(), max_batch=4, max_len=256)
    chat, chat2, batch = (Job(p, prof, 50) for p, prof in zip(prompts(3, 1), (CHAT, CHAT, BATCH)))
    with torch.inference_mode():
        engine.submit(chat.request)
        engine._admit()
        engine.step_seconds = {1: 0.1}  # two rows: 0.2 s estimated, over chat's 0.15 s
        engine.submit(batch.request)
        engine._admit()
        assert list(engine.waiting) == [batch.request]
        engine.submit(chat2.request)
        engine._admit()  # an equal does not wait for chat's SLO: the batch request still does
        assert engine.running == [chat.request, chat2.request] and list(engine.waiting) == [batch.request]
        engine.step_seconds = {3: 0.12}
        engine._admit()
        assert engine.running[-1] is batch.request


def test_a_full_queue_sheds_its_latest_worst_request_for_a_better_one(make_engine_stopped):
    engine = make_engine_stopped(tiny_model(), max_batch=1, max_len=128, max_queue=2)
    events = []
    b1, b2, b3, c = (Request(p, SamplingParams(max_new_tokens=2), events.append, profile=prof)
                     for p, prof in zip(prompts(4, 5), (BATCH, BATCH, BATCH, CHAT)))
    engine.submit(b1, b2)
    engine.submit(c)
    assert list(engine.waiting) == [b1, c]
    assert len(events) == 1 and isinstance(events[0], OverloadedError) and "better priority" in str(events[0])
    with pytest.raises(OverloadedError, match="queue is full"):
        engine.submit(b3)  # nothing worse than batch to shed
    with pytest.raises(OverloadedError, match="queue is full"):
        engine.submit(Request(prompts(1, 5)[0], SamplingParams(max_new_tokens=2), events.append, profile=BATCH),
                      Request(prompts(1, 5)[0], SamplingParams(max_new_tokens=2), events.append, profile=CHAT))
    assert list(engine.waiting) == [b1, c]  # a call's requests are queued all or none
