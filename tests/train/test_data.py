import json

import pytest
import torch

from fourwalls.errors import FormatError, UsageError
from fourwalls.train.data import IGNORE, batch_order, batches, load_jsonl, pack, split
from tests.test_tokenizer import byte_tokenizer

EOS = 256  # <|im_start|> in byte_tokenizer is 256, <|im_end|> 257; any id works as EOS here


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_chat_loss_is_on_assistant_tokens_only(tmp_path):
    tok = byte_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ds = load_jsonl(write(tmp_path, [{"messages": msgs}]), tok, EOS)
    assert ds.shape == "chat"
    ex = ds.examples[0]
    learned = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE], False)
    assert learned == "hello!<|im_end|>\nciao<|im_end|>\n"


def test_instruction_and_text_shapes(tmp_path):
    tok = byte_tokenizer()
    ds = load_jsonl(write(tmp_path, [{"instruction": "add", "input": "2+2", "output": "4"}]), tok, EOS)
    ex = ds.examples[0]
    assert ds.shape == "instruct"
    assert tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE], False) == "4<|im_end|>\n"
    ds = load_jsonl(write(tmp_path, [{"text": "abc"}]), tok, EOS)
    assert ds.examples[0].input_ids == ds.examples[0].labels == [*tok.encode("abc"), EOS]


def test_malformed_lines_name_file_and_line(tmp_path):
    tok = byte_tokenizer()
    path = write(tmp_path, [{"text": "ok"}, "{not json", {"text": ""}, {"text": "fine"}])
    with pytest.raises(FormatError, match=r"d\.jsonl:2: invalid JSON"):
        load_jsonl(path, tok, EOS)
    ds = load_jsonl(path, tok, EOS, skip_bad_lines=True)
    assert len(ds) == 2 and ds.stats["bad_lines"] == 2


def test_no_assistant_turn_empty_file_and_unknown_shape(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(FormatError, match="no assistant turn"):
        load_jsonl(write(tmp_path, [{"messages": [{"role": "user", "content": "x"}]}]), tok, EOS)
    with pytest.raises(UsageError, match="no usable examples"):
        load_jsonl(write(tmp_path, [""]), tok, EOS)
    with pytest.raises(FormatError, match="cannot tell the format"):
        load_jsonl(write(tmp_path, [{"prompt": "x"}]), tok, EOS)


def test_truncation_is_counted(tmp_path):
    ds = load_jsonl(write(tmp_path, [{"text": "x" * 50}, {"text": "y"}]), byte_tokenizer(), EOS, max_len=10)
    assert ds.stats["truncated"] == 1
    assert max(len(e.input_ids) for e in ds.examples) == 10


def test_split_pack_and_deterministic_order(tmp_path):
    ds = load_jsonl(write(tmp_path, [{"text": f"line {i}"} for i in range(20)]), byte_tokenizer(), EOS)
    train, val = split(ds, 0.25, seed=1)
    assert len(train) == 15 and len(val) == 5
    assert not {tuple(e.input_ids) for e in train.examples} & {tuple(e.input_ids) for e in val.examples}
    packed = pack(train, 16)
    assert all(len(e.input_ids) == 16 for e in packed.examples)
    assert batch_order(20, 4, seed=3, epoch=1) == batch_order(20, 4, seed=3, epoch=1) != batch_order(20, 4, 3, 2)
    stream = batches(train, 4, seed=0, pad_id=0)
    first = [next(stream)["input_ids"] for _ in range(5)]
    resumed = batches(train, 4, seed=0, pad_id=0, start=3)
    assert all(torch.equal(next(resumed)["input_ids"], first[i]) for i in (3, 4))
