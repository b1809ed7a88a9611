import pytest
import torch

from fourwalls.errors import ContextLengthError, UsageError
from fourwalls.generate import SamplingParams, Session, apply_penalties, complete, generate_tokens, sample, stream
from tests.conftest import tiny_model


def _ids(model, prompt, **kw):
    return [t.id for t in generate_tokens(model, prompt, SamplingParams(**kw))]


def test_same_seed_same_tokens_different_seed_different_tokens():
    model = tiny_model()
    a = _ids(model, [5, 6, 7], max_new_tokens=24, temperature=1.0, seed=1)
    b = _ids(model, [5, 6, 7], max_new_tokens=24, temperature=1.0, seed=1)
    c = _ids(model, [5, 6, 7], max_new_tokens=24, temperature=1.0, seed=2)
    assert a == b and a != c


def test_filters_that_leave_one_token_equal_greedy():
    model = tiny_model()
    greedy = _ids(model, [1, 2, 3], max_new_tokens=12, temperature=0)
    assert _ids(model, [1, 2, 3], max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy
    assert _ids(model, [1, 2, 3], max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert _ids(model, [1, 2, 3], max_new_tokens=12, temperature=1.0, min_p=0.999999, seed=3) == greedy


def test_greedy_equals_argmax_of_full_forward():
    model = tiny_model()
    prompt = [4, 8, 15, 16]
    out = _ids(model, prompt, max_new_tokens=8, temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.tensor([5.0, 4.0, 3.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=5.0, top_k=2), gen) for _ in range(200)}
    assert picks == {0, 1}


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(top_p=0.7), gen) for _ in range(300)}
    assert picks == {0, 1}


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0])
    hist = torch.tensor([0, 1, 0])
    out = apply_penalties(logits, hist, SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0]
    out = apply_penalties(logits, hist, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0))
    assert out.tolist() == [0.0, -3.5, 1.0]


def test_logprobs_are_the_models_own():
    model = tiny_model()
    prompt = [3, 1, 4]
    infos = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=3, temperature=0, logprobs=2)))
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
    assert infos[0].logprob == pytest.approx(float(ref[infos[0].id]), abs=1e-5)
    assert [i for i, _ in infos[0].top] == ref.topk(2).indices.tolist()


def test_session_reuses_the_cache_and_gives_the_same_tokens():
    model = tiny_model()
    session = Session(model, max_len=128)
    p = SamplingParams(max_new_tokens=6, temperature=0)
    first = [t.id for t in generate_tokens(model, [1, 2, 3, 4], p, session=session)]
    turn2 = [1, 2, 3, 4, *first, 9, 9]
    cached = len(session.tokens)
    assert cached == 4 + len(first) - 1  # the last sampled token was never fed
    again = [t.id for t in generate_tokens(model, turn2, p, session=session)]
    assert again == [t.id for t in generate_tokens(model, turn2, p)]


def test_bad_params_and_context():
    model = tiny_model()
    with pytest.raises(UsageError):
        list(generate_tokens(model, [1], SamplingParams(top_p=0)))
    with pytest.raises(UsageError):
        list(generate_tokens(model, [], SamplingParams()))
    with pytest.raises(ContextLengthError, match="256"):
        list(generate_tokens(model, [1] * 300, SamplingParams()))


def test_stop_strings_and_streaming_on_real_text(smol):
    tok, model = smol.tokenizer, smol.model
    ids = tok.encode_chat([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    p = SamplingParams(max_new_tokens=40, temperature=0)
    full, _, reason = complete(model, tok, ids, p, smol.config.eos_token_ids)
    assert "5" in full and reason in ("stop", "length")
    cut = full.index("5")
    p.stop = ["5"]
    chunks = list(stream(model, tok, ids, p, smol.config.eos_token_ids))
    assert "".join(c.text for c in chunks) == full[:cut]
    assert chunks[-1].finish_reason == "stop"


def test_seeded_sampling_on_the_real_model(smol):
    ids = smol.tokenizer.encode("Once upon a time")

    def run(seed):
        params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed)
        return complete(smol.model, smol.tokenizer, ids, params)[0]

    assert run(7) == run(7)
    assert run(7) != run(8)
