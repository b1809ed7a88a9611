"""Prefill workers: prompts computed in other processes into the shared KV pool give the same tokens, and a worker
that dies is started again with its prompt sent once more."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from fourwalls.engine import Engine, EngineConfig
from fourwalls.engine.phases import ModelSource
from fourwalls.errors import InternalError
from tests.engine.test_engine import MIXED, Run, alone, idle

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a worker and the engine need 2 cores")


@pytest.fixture(scope="module")
def tiny(session_store, smol):
    from tests.serve.conftest import tiny_chat_model

    name = tiny_chat_model(session_store, smol)
    return name, session_store.load(name)


@pytest.fixture
def split(tiny, session_store):
    engines = []

    def make(**cfg) -> Engine:
        name, lm = tiny
        engine = Engine(lm.model, lm.tokenizer, [], EngineConfig(**({"max_len": 256} | cfg)),
                        ModelSource(str(session_store.root), name))
        engines.append(engine)
        engine.start()
        return engine

    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield make
    for e in engines:
        e.stop()
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads  # given back


def prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (k,), generator=gen).tolist() for k in lengths]


def test_prompts_computed_by_a_worker_give_the_tokens_of_one_request_alone(split, tiny):
    engine = split(max_batch=4, prefill_chunk=16, prefill_workers=1)
    model = tiny[1].model
    lengths = [n + 40 for n, _ in MIXED]  # over a chunk, most of them: the worker computes them in chunks too
    runs = [Run(engine, p, **kw) for p, (_, kw) in zip(prompts(len(MIXED), lengths), MIXED)]
    for run, (_, kw) in zip(runs, MIXED):
        assert run.tokens() == alone(model, run.request.prompt, **kw)
    assert idle(engine).kv_usage == 0
    assert torch.get_num_threads() == 1 and os.sched_getaffinity(0) == {sorted(os.sched_getaffinity(0))[0]}


def test_a_worker_that_dies_with_a_prompt_is_started_again_and_the_prompt_sent_once_more(split, tiny):
    engine = split(max_batch=2, prefill_workers=1)
    worker = engine.workers.workers[0]
    first = worker.proc.pid
    os.kill(first, signal.SIGSTOP)  # it takes the prompt and never answers...
    (prompt,) = prompts(1, [100], seed=3)
    run = Run(engine, prompt, max_new_tokens=8, temperature=0)
    deadline = time.monotonic() + 10
    while worker.job is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(first, signal.SIGKILL)  # ...then dies
    assert run.tokens() == alone(tiny[1].model, prompt, max_new_tokens=8, temperature=0)
    assert worker.proc.pid != first and run.request.resent
    assert idle(engine).kv_usage == 0


def test_a_prompt_whose_worker_died_twice_fails_with_a_clear_error(split):
    engine = split(max_batch=2, prefill_workers=1)
    failures = iter([[], []])

    def poll():
        out = [(r, "died") for r in list(sent)]
        sent.clear()
        return out or next(failures, [])

    sent = []
    engine.workers.poll = poll
    engine.workers.send = lambda r, *a: sent.append(r) or True
    (prompt,) = prompts(1, [50])
    run = Run(engine, prompt, max_new_tokens=4)
    assert run.done.wait(30)
    err = run.events[-1]
    assert isinstance(err, InternalError) and "its worker died twice" in str(err)
    assert run.request.resent and idle(engine).kv_usage == 0


def test_a_request_cancelled_while_its_worker_computes_keeps_its_blocks_until_the_worker_is_done(split):
    engine = split(max_batch=2, prefill_workers=1)
    worker = engine.workers.workers[0]
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        (prompt,) = prompts(1, [120], seed=5)
        run = Run(engine, prompt, max_new_tokens=4)
        deadline = time.monotonic() + 10
        while worker.job is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.cancel(run.request)
        time.sleep(0.3)
        assert engine.num_running == 0 and engine.pool.num_held > 0  # the stopped worker may still write them
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while engine.pool.num_held:
        assert time.monotonic() < deadline, "the blocks were never released"
        time.sleep(0.01)
    assert not engine.orphans


def test_more_workers_than_cores_to_spare_is_refused_in_one_line():
    from fourwalls.engine.phases import split_cores
    from fourwalls.errors import UsageError

    n = len(os.sched_getaffinity(0))
    with pytest.raises(UsageError, match=f"--prefill-workers {n} needs at least {n + 1} cores"):
        split_cores(n)
    engine_cores, workers = split_cores(n - 1)
    assert len(engine_cores) == 1 and len(workers) == n - 1 and not engine_cores & set().union(*workers)
