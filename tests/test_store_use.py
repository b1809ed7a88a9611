"""What the store holds and costs: `models list` reads only GGUF headers and aligns its columns, `models du` shows
the disk use by kind, `models prune-cache` frees the cache, and writing a cache or importing says what and where."""

from __future__ import annotations

import gguf
import pytest

from fourwalls.cli import main
from fourwalls.formats import read_checkpoint
from fourwalls.formats.gguf import describe_gguf, open_gguf, read_metadata
from fourwalls.model.lora import LoRAConfig, attach_lora, save_adapter
from fourwalls.store import Store, build_model, describe
from tests.gguf_fixture import write_tiny_gguf


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def run(capsys, *argv: str) -> tuple[str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_the_header_alone_describes_a_gguf_as_the_full_parse_does(tiny):
    cfg, types = describe_gguf(tiny, "t")
    full = read_checkpoint(tiny, "t")[0]
    assert cfg == full
    assert types == sorted({t.tensor_type.name for t in open_gguf(tiny).tensors})
    assert read_metadata(open_gguf(tiny))["general.name"] == "fourwalls-tiny-test"


def test_the_bundled_gguf_is_described_without_parsing_its_vocabulary(monkeypatch):
    store = Store()
    try:
        ref = store.resolve("smollm2-135m-instruct")
    except Exception:
        pytest.skip("the bundled model package is not installed")
    monkeypatch.setattr(gguf, "GGUFReader", None)  # any full parse would fail
    info = describe(ref)
    assert (info["parameters"], info["vocab_size"], info["dtype"]) == (134515008, 49152, "gguf F32/Q4_1/Q8_0")


def test_list_aligns_model_and_adapter_rows_and_sizes_are_megabytes(capsys, tiny):
    store = Store()
    cfg, state, tok = read_checkpoint(tiny, "t")
    base = store.add("tiny-base", cfg, state, tok)
    model = build_model(cfg, state)
    lora = LoRAConfig(r=2, target_modules=("q_proj", "v_proj"))
    attach_lora(model, lora)
    store.add_adapter("a-long-adapter-name-for-alignment", base, lambda d: save_adapter(d, model, lora, base.name))
    out, _ = run(capsys, "models", "list")
    lines = [line for line in out.splitlines() if "bundled" not in line]
    assert lines[0].split() == ["NAME", "DIGEST", "ARCH", "PARAMS", "DTYPE", "SIZE"]
    assert "a-long-adapter-name-for-alignment (on tiny-base)" in out
    ends = {len(line) for line in lines}
    assert len(ends) == 1, out  # the right-aligned SIZE column ends every row at the same place
    starts = {line.index("sha256-") for line in lines[1:]}
    assert len(starts) == 1, out
    size = describe(store.resolve("tiny-base"))["size_bytes"]
    assert f"{size / 1e6:.1f} MB" in out


def test_du_counts_each_kind_and_prune_cache_frees_the_cache(capsys, tiny):
    store = Store()
    capsys.readouterr()
    store.load(str(tiny))  # the first load of a GGUF writes it in fourwalls' format (blocks kept), and says so
    err = capsys.readouterr().err
    cached = store.root / "cache"
    size = sum(f.stat().st_size for f in cached.rglob("*") if f.is_file())
    assert err.startswith(f"fourwalls: wrote tiny.gguf in fourwalls' own format for faster loading: "
                          f"{size / 1e6:.1f} MB in {cached}/gguf-sha256-") and err.count("\n") == 1, err
    store.load(str(tiny))
    assert capsys.readouterr().err == ""  # said once
    cfg, state, tok = read_checkpoint(tiny, "t")
    ref = store.add("tiny-base", cfg, state, tok)
    model_bytes = sum(f.stat().st_size for f in ref.path.iterdir())
    usage = store.usage()
    assert usage["models"][:2] == (1, model_bytes) and usage["cache"][:2] == (1, size)
    out, _ = run(capsys, "models", "du")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line and not line.startswith("the ")}
    assert rows["models"][1:4] == ["1", f"{model_bytes / 1e6:.1f}", "MB"]
    assert rows["cache"][1:4] == ["1", f"{size / 1e6:.1f}", "MB"] and "prune-cache" in out
    assert rows["adapters"][1] == "0" and rows["runs"][1] == "0"
    out, _ = run(capsys, "models", "prune-cache")
    assert out == f"freed {size / 1e6:.1f} MB (1 cache entries)\n"
    assert not cached.exists() and store.usage()["cache"][:2] == (0, 0)
    assert store.resolve("tiny-base").path.is_dir()  # models are not cache


def test_import_says_what_it_stored_and_where(capsys, tiny):
    out, _ = run(capsys, "models", "import", str(tiny), "--name", "t32")
    ref = Store().resolve("t32")
    size = sum(f.stat().st_size for f in ref.path.iterdir())
    assert out == f"imported t32 ({ref.digest}): {size / 1e6:.1f} MB of float32 in {ref.path}\n"
