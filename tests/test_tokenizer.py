import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from fourwalls.errors import UsageError
from fourwalls.tokenizer import Tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """A 256-token byte-level tokenizer, enough for random-weight models (vocab 512)."""
    from tokenizers import decoders

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend, CHATML, None, "<|im_end|>")


def test_byte_tokenizer_round_trips_unicode():
    tok = byte_tokenizer()
    text = "naïve café — 東京 🦊\t\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_renders_and_special_tokens_stay_whole():
    tok = byte_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_id("<|im_start|>")


def test_chat_template_is_sandboxed():
    tok = byte_tokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(UsageError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception_is_a_clean_error():
    tok = byte_tokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UsageError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template_is_a_clean_error():
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(UsageError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


def test_the_sandbox_renders_as_this_process_does_and_fails_alike():
    from fourwalls.templates import BUDGET, TemplateSandbox

    tok = byte_tokenizer()
    tok.chat_template = CHATML + "{{ messages | tojson }}{{ strftime_now('%Y')[:2] }}"
    chat = [{"role": "user", "content": "naïve 東京 <b>"}, {"role": "assistant", "content": "ok"}]
    sandbox = TemplateSandbox(seconds=5)
    try:
        assert tok.apply_chat_template(chat, sandbox=sandbox) == tok.apply_chat_template(chat)
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(UsageError, match="roles must alternate") as e:
            tok.apply_chat_template(chat, sandbox=sandbox)
        assert e.value.code is None  # the template's own refusal, not a budget
        tok.chat_template = "{{ messages[0].content + 1 }}"  # a template bug on this input: an error, not a crash
        with pytest.raises(UsageError, match="TypeError"):
            tok.apply_chat_template(chat, sandbox=sandbox)
        tok.chat_template = "{{ 'x' * 4000 }}"
        with pytest.raises(UsageError, match="3000 characters") as e:
            tok.apply_chat_template(chat, sandbox=TemplateSandbox(max_chars=3000))
        assert e.value.code == BUDGET
    finally:
        sandbox.close()
