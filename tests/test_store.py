"""The model store: content-addressed by everything that decides how a model behaves (issue 22.5)."""

from __future__ import annotations

import json
import shutil

from fourwalls.formats import read_checkpoint
from fourwalls.formats.hf import write_hf
from fourwalls.store import Store
from tests.gguf_fixture import write_tiny_gguf


def test_same_weights_with_another_template_or_config_are_another_model(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg, state, tok = read_checkpoint(tmp_path / "tiny.gguf")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_hf(a, cfg, state, tok)
    shutil.copytree(a, b)
    shutil.copytree(a, c)
    tc = json.loads((b / "tokenizer_config.json").read_text())
    (b / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": "B: {{ messages }}"}))
    gen = json.loads((c / "generation_config.json").read_text())
    (c / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 1}))

    store = Store(tmp_path / "home")
    refs = {name: store.import_model(folder, name) for name, folder in [("a", a), ("b", b), ("c", c)]}
    assert len({r.digest for r in refs.values()}) == 3  # one weights file, three models
    assert store.load("b").tokenizer.chat_template == "B: {{ messages }}"
    assert store.load("a").tokenizer.chat_template == tok.chat_template
    assert store.load("c").config.eos_token_ids == (1,) and store.load("a").config.eos_token_ids != (1,)
    assert refs["b"].manifest["lineage"]["imported_from"] == str(b.resolve())
    assert store.import_model(a, "a2").digest == refs["a"].digest  # the same model again: the same entry

    # A model stored before digests covered the whole folder stays readable under its weights' digest.
    old = store.root / "models" / "sha256-0123"
    shutil.copytree(refs["b"].path, old)
    (store.root / "names" / "old.json").write_text(json.dumps({"digest": "sha256-0123"}))
    assert store.load("old").tokenizer.chat_template == "B: {{ messages }}"
