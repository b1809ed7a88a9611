"""The continuous-batching engine on tiny random models: batching must not change what a request generates."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from fourwalls.engine import Engine, EngineConfig, Request
from fourwalls.engine import engine as engine_module
from fourwalls.errors import ContextLengthError, FourwallsError, NotFoundError, OverloadedError, RequestTimeoutError
from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.model.lora import LoRAConfig, attach_lora, load_adapter, save_adapter
from tests.conftest import tiny_model


class Run:
    """A request submitted to an engine, with what came back."""

    def __init__(self, engine: Engine, prompt: list[int], adapter: str | None = None, mix=None, **params) -> None:
        self.events, self.done = [], threading.Event()
        self.request = Request(prompt, SamplingParams(**params), self._emit, adapter, mix=mix)
        engine.submit(self.request)

    def _emit(self, ev) -> None:
        self.events.append(ev)
        if isinstance(ev, FourwallsError) or ev.finish_reason:
            self.done.set()

    def tokens(self, timeout: float = 60) -> list[int]:
        assert self.done.wait(timeout), "the request did not finish"
        assert not isinstance(self.events[-1], FourwallsError), self.events[-1]
        return [t.id for ev in self.events for t in ev.tokens]


def idle(engine: Engine) -> Engine:
    """The engine once it has released the requests that finished (it emits their last token first)."""
    deadline = time.monotonic() + 10
    while engine.num_running:
        assert time.monotonic() < deadline, "a finished request kept its blocks"
        time.sleep(0.01)
    return engine


def alone(model, prompt, **params) -> list[int]:
    return [t.id for t in generate_tokens(model, prompt, SamplingParams(**params))]


MIXED = [  # prompt length, sampling: greedy and seeded sampling, finishing at different steps
    (1, dict(max_new_tokens=12, temperature=0)),
    (37, dict(max_new_tokens=5, temperature=0)),
    (9, dict(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1)),
    (20, dict(max_new_tokens=3, temperature=0)),
    (50, dict(max_new_tokens=15, temperature=1.0, top_k=20, seed=7)),
    (4, dict(max_new_tokens=9, temperature=0, repetition_penalty=1.3)),
    (16, dict(max_new_tokens=18, temperature=0.7, min_p=0.1, seed=3, presence_penalty=0.5)),
    (30, dict(max_new_tokens=7, temperature=0)),
]


def test_a_request_generates_the_same_tokens_alone_or_in_a_mixed_batch(make_engine):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n, _ in MIXED]
    # 4 rows for 8 requests: some wait for a row; prompts prefill in chunks of 8 while others decode.
    engine = make_engine(model, max_batch=4, max_len=128, prefill_chunk=8)
    runs = [Run(engine, p, **kw) for p, (_, kw) in zip(prompts, MIXED)]
    for run, prompt, (_, kw) in zip(runs, prompts, MIXED):
        assert run.tokens() == alone(model, prompt, **kw)
    assert idle(engine).kv_usage == 0


def _random_adapter(model, folder, seed, r):
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    cfg = LoRAConfig(r=r, alpha=2 * r, target_modules=("q_proj", "v_proj", "down_proj") if r == 4 else
                     ("o_proj", "gate_proj", "up_proj"))
    attach_lora(m, cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    save_adapter(folder, m, cfg)


def test_requests_for_different_adapters_share_a_batch_and_match_each_adapter_alone(make_engine, tmp_path):
    model = tiny_model()
    _random_adapter(model, tmp_path / "a1", 1, r=4)
    _random_adapter(model, tmp_path / "a2", 2, r=8)  # another rank and other layers: padded into one stack
    engine = make_engine(model, max_batch=8, max_len=64)
    engine.add_adapter("a1", tmp_path / "a1")
    engine.add_adapter("a2", tmp_path / "a2")
    prompt = [417, 23, 301, 77, 9, 250, 111, 480, 66, 3]
    names = [None, "a1", "a2", "a1", None, "a2"]
    runs = [Run(engine, prompt, name, max_new_tokens=10, temperature=0) for name in names]
    outs = [r.tokens() for r in runs]
    for name in ("a1", "a2"):
        with_adapter = copy.deepcopy(model)
        load_adapter(with_adapter, tmp_path / name)
        expected = alone(with_adapter, prompt, max_new_tokens=10, temperature=0)
        assert all(o == expected for o, n in zip(outs, names) if n == name)
    base = alone(model, prompt, max_new_tokens=10, temperature=0)
    assert outs[0] == outs[4] == base
    assert outs[1] != base and outs[2] != base and outs[1] != outs[2]


def test_unknown_and_removed_adapters_are_refused(make_engine, tmp_path):
    model = tiny_model()
    _random_adapter(model, tmp_path / "a1", 1, r=4)
    with_adapter = copy.deepcopy(model)
    load_adapter(with_adapter, tmp_path / "a1")
    expected = alone(with_adapter, [1, 2], max_new_tokens=4, temperature=0)
    assert expected != alone(model, [1, 2], max_new_tokens=4, temperature=0)
    engine = make_engine(model, max_len=64)
    with pytest.raises(NotFoundError):
        Run(engine, [1, 2], "a1", max_new_tokens=2)
    engine.add_adapter("a1", tmp_path / "a1")
    assert Run(engine, [1, 2], "a1", max_new_tokens=4, temperature=0).tokens() == expected
    engine.remove_adapter("a1")
    with pytest.raises(NotFoundError):
        Run(engine, [1, 2], "a1", max_new_tokens=2)


def test_full_queue_is_refused_and_cancelling_frees_the_row(make_engine):
    model = tiny_model()
    expected = alone(model, [4, 5], max_new_tokens=3, temperature=0)
    engine = make_engine(model, max_batch=1, max_len=256, max_queue=1)
    long = Run(engine, [1, 2, 3], max_new_tokens=250, temperature=0)
    while engine.num_running == 0:
        time.sleep(0.01)
    queued = Run(engine, [4, 5], max_new_tokens=3, temperature=0)
    with pytest.raises(OverloadedError):
        Run(engine, [6], max_new_tokens=3)
    engine.cancel(long.request)
    assert queued.tokens(timeout=10) == expected  # it got the freed row
    assert not long.done.is_set() or long.events[-1].finish_reason is None


def test_a_request_past_its_timeout_ends_with_an_error(make_engine):
    engine = make_engine(tiny_model(), max_len=256, request_timeout=0.2)
    decode = engine._decode

    def slow():
        time.sleep(0.05)
        decode()

    engine._decode = slow
    run = Run(engine, [1, 2, 3], max_new_tokens=200, temperature=0)
    assert run.done.wait(10)
    assert isinstance(run.events[-1], RequestTimeoutError)
    assert engine.num_running == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, monkeypatch):
    model = tiny_model()
    expected = alone(model, [1, 2, 3], max_new_tokens=4, temperature=0)
    engine = make_engine(model, max_len=64)
    real = engine_module.fill_cache  # a prompt's chunk, by the fused step or the model
    calls = []

    def broken_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(engine_module, "fill_cache", broken_once)
    first = Run(engine, [1, 2, 3], max_new_tokens=4, temperature=0)
    assert first.done.wait(10) and isinstance(first.events[-1], FourwallsError)
    assert Run(engine, [1, 2, 3], max_new_tokens=4, temperature=0).tokens() == expected


def test_a_request_that_cannot_fit_is_refused_with_both_numbers(make_engine):
    engine = make_engine(tiny_model(), max_len=64)
    with pytest.raises(ContextLengthError, match="60 tokens and max_tokens is 10.*64"):
        Run(engine, list(range(1, 61)), max_new_tokens=10)


def test_outputs_are_identical_with_and_without_the_prefix_cache(make_engine):
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    system = torch.randint(3, 512, (40,), generator=gen).tolist()  # a shared "system prompt": 2 full blocks and more
    prompts = [system + torch.randint(3, 512, (n,), generator=gen).tolist() for n, _ in MIXED]
    prompts[3] = list(prompts[1])  # the same prompt twice
    prompts[5] = system[:33]  # a prefix of the others
    outs = {}
    for cached in (True, False):
        engine = make_engine(model, max_batch=4, max_len=128, prefill_chunk=8, prefix_cache=cached)
        runs = [Run(engine, p, **kw) for p, (_, kw) in zip(prompts, MIXED)]
        outs[cached] = [r.tokens() for r in runs]
        hits = [r.request.cached_tokens for r in runs]
        if cached:  # the first computes the system prompt's blocks, the others reuse them
            assert hits[0] == 0 and all(h >= 32 for h in hits[1:]) and hits[3] == 64
        else:
            assert hits == [0] * len(runs)
        assert idle(engine).kv_usage == 0
    assert outs[True] == outs[False] == [alone(model, p, **kw) for p, (_, kw) in zip(prompts, MIXED)]


@pytest.mark.slow
def test_the_default_model_gives_the_same_tokens_after_a_prefix_cache_hit(smol, session_store):
    """The bundled model in its GGUF blocks, prompts of ~860 tokens sharing a system prompt: a hit leaves a short
    last chunk where the uncached run has a long one, and the tokens must not change (greedy and seeded), nor differ
    from generate()'s."""
    system = (Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare.txt")
    text = system.read_text()[:3000] if system.is_file() else " ".join(f"line {i} of the rules." for i in range(400))
    smol = session_store.load(smol.name)  # its own copy: an engine wraps the model's layers for adapters
    tok = smol.tokenizer
    prompts = [tok.encode_chat([{"role": "system", "content": text}, {"role": "user", "content": q}])
               for q in ("Who speaks first?", "What is this text about?")]
    kinds = [dict(max_new_tokens=24, temperature=0), dict(max_new_tokens=24, temperature=0.7, seed=1)]
    outs = {}
    for cached in (True, False):
        engine = Engine(smol.model, tok, [], EngineConfig(max_batch=2, max_len=1024, prefix_cache=cached))
        engine.start()
        try:
            Run(engine, prompts[0], max_new_tokens=1).tokens()
            runs = [Run(engine, prompts[1], **kw) for kw in kinds]
            outs[cached] = [r.tokens(120) for r in runs]
        finally:
            engine.stop()
        assert all((r.request.cached_tokens > 800) == cached for r in runs)
    assert outs[True] == outs[False] == [alone(smol.model, prompts[1], **kw) for kw in kinds]


def test_a_chats_history_is_not_computed_again(make_engine):
    model = tiny_model("tiny-llama3")
    engine = make_engine(model, max_len=200)
    first = list(range(10, 47))
    reply = Run(engine, first, max_new_tokens=30, temperature=0).tokens()
    turn = first + reply + [5, 6, 7]  # the history, the model's reply, the next message
    second = Run(engine, turn, max_new_tokens=10, temperature=0)
    assert second.tokens() == alone(model, turn, max_new_tokens=10, temperature=0)
    # Every full block the first request left, its reply's included (all but the reply's last token were fed).
    assert second.request.cached_tokens == (len(first) + len(reply) - 1) // 16 * 16 == 64


def test_preemption_and_eviction_under_memory_pressure_never_corrupt_a_request(make_engine):
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(3, 512, (12,), generator=gen).tolist()
    prompts = [(shared if i % 2 else []) + torch.randint(3, 512, (n,), generator=gen).tolist()
               for i, (n, _) in enumerate(MIXED)]
    # 16 blocks of 4 positions for 8 requests of up to 70 tokens: requests are preempted and computed again, and
    # cached blocks are evicted while the requests that made them still run.
    engine = make_engine(model, max_batch=8, max_len=80, kv_tokens=64, block_size=4, prefill_chunk=8)
    runs = [Run(engine, p, **kw) for p, (_, kw) in zip(prompts, MIXED)]
    for run, prompt, (_, kw) in zip(runs, prompts, MIXED):
        assert run.tokens() == alone(model, prompt, **kw)
    assert engine.preemptions > 0
    assert idle(engine).kv_usage == 0 and engine.pool.num_free == engine.pool.num_blocks


def test_two_adapters_never_share_blocks(make_engine, tmp_path):
    model = tiny_model()
    _random_adapter(model, tmp_path / "a1", 1, r=4)
    _random_adapter(model, tmp_path / "a2", 2, r=8)
    engine = make_engine(model, max_len=64)
    engine.add_adapter("a1", tmp_path / "a1")
    engine.add_adapter("a2", tmp_path / "a2")
    prompt = list(range(100, 140))
    outs, hits = [], []
    for name in ("a1", "a2", None, "a1", "a2", None):  # one after the other: each finds what those before left
        run = Run(engine, prompt, name, max_new_tokens=6, temperature=0)
        outs.append(run.tokens())
        hits.append(run.request.cached_tokens)
    assert hits == [0, 0, 0, 32, 32, 32]  # each reuses its own adapter's blocks only
    assert outs[:3] == outs[3:] and len(set(map(tuple, outs[:3]))) == 3
    for name, out in zip(("a1", "a2"), outs):
        with_adapter = copy.deepcopy(model)
        load_adapter(with_adapter, tmp_path / name)
        assert out == alone(with_adapter, prompt, max_new_tokens=6, temperature=0)


def _scattered(pool, lengths, gen):
    """Each row's blocks for ``length`` + 1 positions, taken from the pool in a random order."""
    blocks = pool.allocate(pool.num_blocks)
    order = torch.randperm(len(blocks), generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        k = -(-(n + 1) // pool.block_size)
        tables.append([blocks[i] for i in order[used:used + k]])
        used += k
    return tables


@pytest.mark.parametrize("block_size", [3, 16])
def test_paged_attention_fused_and_in_torch_computes_what_a_contiguous_cache_does(tmp_path, block_size):
    from fourwalls.engine.cache import BlockPool, DecodeCache, PrefillCache
    from fourwalls.engine.multilora import AdapterSet
    from fourwalls.model.fused import decoder

    model = tiny_model()
    _random_adapter(model, tmp_path / "a1", 1, r=4)
    _random_adapter(model, tmp_path / "a2", 2, r=8)
    adapters = AdapterSet(model)
    adapters.install([adapters.read("a1", tmp_path / "a1"), adapters.read("a2", tmp_path / "a2")])
    fused = decoder(model)  # None without AVX2 or a C compiler: the torch path alone is checked
    names, lengths = [None, "a1", "a2", "a1", "a2", None], [3, 17, 9, 30, 1, 47]
    gen = torch.Generator().manual_seed(0)
    pools = [BlockPool(model.config, 60, block_size) for _ in range(2)]
    tables = [_scattered(pool, lengths, torch.Generator().manual_seed(1)) for pool in pools]
    assert tables[0] == tables[1]
    prompts = [torch.randint(3, 512, (1, n), generator=gen) for n in lengths]
    tokens = torch.randint(3, 512, (len(names), 1), generator=gen)
    expected = []
    with torch.inference_mode():
        for name, prompt, blocks, token in zip(names, prompts, tables[0], tokens):
            n = prompt.shape[1]
            with adapters.select([name]):
                for pool in pools:  # in chunks of 8, as the engine feeds prompts
                    for start in range(0, n, 8):
                        chunk = prompt[:, start:start + 8]
                        model(chunk, torch.arange(start, start + chunk.shape[1]), PrefillCache(pool, blocks))
                cache = model.new_cache(1, 64)  # the reference: one contiguous row
                model(prompt, torch.arange(n), cache)
                expected.append(model(token[None], torch.tensor([n]), cache)[0, -1])
        width = max(map(len, tables[0]))
        table = torch.tensor([t + t[:1] * (width - len(t)) for t in tables[0]], dtype=torch.int32)
        positions = torch.tensor(lengths)[:, None]
        with adapters.select(names):
            in_torch = model(tokens, positions, DecodeCache(pools[0], table))[:, -1]
            got = fused(tokens, positions, DecodeCache(pools[1], table)) if fused else in_torch
    expected = torch.stack(expected)
    assert (in_torch - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    for a, b in ((pools[0].k_all, pools[1].k_all), (pools[0].v_all, pools[1].v_all)):  # fp16: within one step
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)


def test_a_row_mixing_two_adapters_computes_the_weighted_sum_of_their_updates(tmp_path):
    """Top-2 routing's mix: the row's logits are those of the base with 0.7 of one adapter's update and 0.3 of the
    other's merged in, in the torch forward and in the fused decode step alike."""
    from fourwalls.engine.cache import BlockPool, DecodeCache, PrefillCache
    from fourwalls.engine.multilora import AdapterSet
    from fourwalls.model.fused import decoder

    model = tiny_model()
    _random_adapter(model, tmp_path / "a1", 1, r=4)
    _random_adapter(model, tmp_path / "a2", 2, r=8)
    merged = copy.deepcopy(model)
    adapters = AdapterSet(model)
    found = [adapters.read("a1", tmp_path / "a1"), adapters.read("a2", tmp_path / "a2")]
    adapters.install(found)
    mix = {"a1": 0.7, "a2": 0.3}
    with torch.no_grad():
        for a in found:
            for qual, (A, B) in a.layers.items():
                merged.get_submodule(qual).weight += mix[a.name] * (B @ A)
    prompt = torch.randint(3, 512, (1, 12))
    with torch.inference_mode():
        expected = merged(prompt)
        with adapters.select([mix]):
            got = model(prompt)
        with adapters.select(["a1"]):
            one = model(prompt)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (one - expected).abs().max() > 1e-2 * expected.abs().max()  # the mix is not one adapter alone

    fused = decoder(model)
    if fused is None:
        pytest.skip("no AVX2 or no C compiler here: decoding runs in torch")
    rows = [mix, None, "a2", {"a2": 0.4, "a1": 0.6}]
    pools = [BlockPool(model.config, len(rows), 16) for _ in range(2)]
    table = torch.arange(len(rows), dtype=torch.int32)[:, None]  # row i: block i (the prompt and the next token)
    with torch.inference_mode():
        for i, row in enumerate(rows):
            for pool in pools:
                with adapters.select([row]):
                    model(prompt, torch.arange(12), PrefillCache(pool, [i]))
        tokens, positions = torch.randint(3, 512, (len(rows), 1)), torch.full((len(rows), 1), 12)
        with adapters.select(rows):
            expected = model(tokens, positions, DecodeCache(pools[0], table))[:, -1]
            got = fused(tokens, positions, DecodeCache(pools[1], table))
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_a_request_mixing_adapters_runs_in_the_batch_and_unknown_names_are_refused(make_engine, tmp_path):
    model = tiny_model()
    _random_adapter(model, tmp_path / "a1", 1, r=4)
    _random_adapter(model, tmp_path / "a2", 2, r=8)
    engine = make_engine(model)
    engine.add_adapter("a1", tmp_path / "a1")
    engine.add_adapter("a2", tmp_path / "a2")
    with pytest.raises(NotFoundError, match="'a3'"):
        engine.submit(Request([1, 2], SamplingParams(max_new_tokens=2), lambda ev: None, mix={"a1": 0.5, "a3": 0.5}))
    mixed = Run(engine, [1, 2, 3], max_new_tokens=6, temperature=0, mix={"a1": 0.5, "a2": 0.5})
    plain = Run(engine, [1, 2, 3], "a1", max_new_tokens=6, temperature=0)
    assert len(mixed.tokens()) == 6 and len(plain.tokens()) == 6
    assert mixed.tokens() != plain.tokens()
