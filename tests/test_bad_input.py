"""Bad input to the CLI: exit code 2, one `fourwalls: error: ...` line naming the problem, no traceback, and the
model store left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from fourwalls.cli import main
from fourwalls.formats import read_checkpoint
from fourwalls.formats.hf import WEIGHTS, write_hf
from tests.gguf_fixture import write_tiny_gguf


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ggufs")
    write_tiny_gguf(d / "tiny.gguf")
    write_tiny_gguf(d / "tiny16.gguf", context_length=16)
    write_tiny_gguf(d / "gpt2.gguf", arch="gpt2")
    write_tiny_gguf(d / "i8.gguf", quantized=gguf.GGMLQuantizationType.I8)
    return d


@pytest.fixture
def tiny(ggufs: Path) -> Path:
    return ggufs / "tiny.gguf"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "fourwalls-home"
    monkeypatch.setenv("FOURWALLS_HOME", str(h))
    return h


def stored(home: Path) -> dict[str, bytes]:
    """Every file of the store's models/, names/ and tmp/ (work in progress), with its contents."""
    return {str(f.relative_to(home)): f.read_bytes()
            for sub in ("models", "names", "tmp") for f in sorted((home / sub).rglob("*")) if f.is_file()}


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def fails(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> str:
    """Run the CLI expecting a clean failure that changes nothing in the store; return the error line."""
    before = stored(home)
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fourwalls: error: ")
    assert stored(home) == before
    return lines[0]


def test_import_missing_file(capsys, home, tmp_path):
    line = fails(capsys, home, "models", "import", str(tmp_path / "nope.gguf"), "--name", "m")
    assert "no such file" in line and "nope.gguf" in line
    assert stored(home) == {}


def test_import_folder_without_config(capsys, home, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("hello")
    line = fails(capsys, home, "models", "import", str(folder), "--name", "m")
    assert "config.json" in line and "missing" in line
    assert stored(home) == {}


def test_generate_unknown_model(capsys, home):
    line = fails(capsys, home, "generate", "hello", "--model", "no-such-model")
    assert "'no-such-model' not found" in line


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_import_truncated_gguf(capsys, home, tiny, tmp_path, keep):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    line = fails(capsys, home, "models", "import", str(cut), "--name", "m")
    assert "cut.gguf" in line and ("truncated" in line or "corrupt" in line)
    assert stored(home) == {}


def test_import_hf_folder_with_malformed_safetensors(capsys, home, tiny, tmp_path):
    folder = tmp_path / "hf"
    cfg, state, tok = read_checkpoint(tiny)
    write_hf(folder, cfg, state, tok)  # config.json, model.safetensors, tokenizer.json ...
    assert read_checkpoint(folder)[0].dim == cfg.dim  # the folder is valid before its weights are spoiled
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json, no tensors}" + bytes(64))
    line = fails(capsys, home, "models", "import", str(folder), "--name", "m")
    assert WEIGHTS in line and "safetensors" in line
    assert stored(home) == {}


def test_import_unsupported_gguf_architecture(capsys, home, ggufs):
    line = fails(capsys, home, "models", "import", str(ggufs / "gpt2.gguf"), "--name", "m")
    assert "architecture 'gpt2' is not supported" in line
    assert stored(home) == {}


def test_import_unsupported_hf_model_type(capsys, home, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "vocab_size": 32}))
    line = fails(capsys, home, "models", "import", str(folder), "--name", "m")
    assert "model_type 'bert' is not supported" in line
    assert stored(home) == {}


def test_import_unsupported_quantization_type(capsys, home, ggufs):
    line = fails(capsys, home, "models", "import", str(ggufs / "i8.gguf"), "--name", "m")
    assert "quantization type I8" in line and "not supported" in line
    assert stored(home) == {}


def test_prompt_longer_than_context(capsys, home, ggufs):
    ok(capsys, "models", "import", str(ggufs / "tiny16.gguf"), "--name", "tiny16")
    ok(capsys, "generate", "ab", "--model", "tiny16", "--max-tokens", "2", "--seed", "0")  # a short prompt runs
    line = fails(capsys, home, "generate", "x " * 40, "--model", "tiny16", "--max-tokens", "2")
    assert "context window is 16" in line


@pytest.mark.parametrize(("flags", "problem"), [
    (["--system", "be brief"], "--system needs --chat"),
    (["--top-p", "2"], "top_p must be in (0, 1]"),
])
def test_generate_contradictory_flags(capsys, home, flags, problem):
    line = fails(capsys, home, "generate", "x", *flags)
    assert problem in line
    assert stored(home) == {}


def test_perplexity_missing_file(capsys, home, tmp_path):
    line = fails(capsys, home, "perplexity", str(tmp_path / "nope.txt"))
    assert "no such file" in line and "nope.txt" in line


def test_rm_unknown_name(capsys, home):
    line = fails(capsys, home, "models", "rm", "no-such-model")
    assert "'no-such-model' not found" in line


def test_import_existing_name_keeps_the_first(capsys, home, tiny, ggufs):
    ok(capsys, "models", "import", str(tiny), "--name", "tiny")
    first = stored(home)
    assert "names/tiny.json" in first
    line = fails(capsys, home, "models", "import", str(ggufs / "tiny16.gguf"), "--name", "tiny")
    assert "'tiny' already exists" in line
    assert stored(home) == first
    shown = json.loads(ok(capsys, "models", "show", "tiny", "--json"))
    assert shown["context_length"] == 64  # still the first model


def test_import_invalid_name(capsys, home, tiny):
    line = fails(capsys, home, "models", "import", str(tiny), "--name", "bad/name")
    assert "invalid model name 'bad/name'" in line
    assert stored(home) == {}


def test_text_files_are_read_with_one_clear_error(tmp_path):
    from fourwalls.errors import FormatError, UsageError
    from fourwalls.files import read_text

    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="no such calibration file: .*nope.txt"):
        read_text(tmp_path / "nope.txt", "calibration file")
    with pytest.raises(FormatError, match="latin1.txt is not UTF-8 text"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(UsageError, match="cannot read"):
        read_text(tmp_path)  # a folder
    (tmp_path / "ok.txt").write_text("héllo")
    assert read_text(tmp_path / "ok.txt") == "héllo"


# --- a full disk (issue 22.4): one line that says so, nothing half-written ---------------------------------------


def test_import_onto_a_full_disk_is_one_line_and_stores_nothing(capsys, small_disk, tiny, monkeypatch):
    home = small_disk.full()
    monkeypatch.setenv("FOURWALLS_HOME", str(home))
    line = fails(capsys, home, "models", "import", str(tiny), "--name", "m")
    assert "disk is full" in line and "needs about" in line and str(home) in line
    assert stored(home) == {}
    small_disk.grow(home, 1024)  # room again: the same import succeeds
    assert "imported m" in ok(capsys, "models", "import", str(tiny), "--name", "m")


def test_generate_from_a_gguf_with_a_full_disk_runs_without_caching(capsys, small_disk, tiny, monkeypatch):
    home = small_disk.full()
    monkeypatch.setenv("FOURWALLS_HOME", str(home))
    ok(capsys, "generate", "hello", "--model", str(tiny), "--max-tokens", "3", "--temperature", "0")
    assert [f.name for f in home.rglob("*") if f.is_file()] == [".filler"]  # no half-written cache left behind


@pytest.mark.parametrize("fmt,out", [("gguf", "m.gguf"), ("hf", "m-hf")])
def test_export_onto_a_full_disk_is_one_line_and_leaves_no_file(capsys, home, tiny, small_disk, fmt, out):
    ok(capsys, "models", "import", str(tiny), "--name", "m")
    disk = small_disk.full()
    line = fails(capsys, home, "export", "m", "--format", fmt, "--out", str(disk / out))
    assert "disk is full" in line and str(disk) in line
    assert [p.name for p in disk.iterdir()] == [".filler"]


def test_a_checkpoint_onto_a_full_disk_says_so_and_keeps_the_last_one(small_disk):
    import torch

    from fourwalls.errors import FourwallsError
    from fourwalls.train import checkpoint

    folder = small_disk(64) / "checkpoints"
    checkpoint.save(folder, 1, {"w": torch.zeros(100)}, {}, {})
    with pytest.raises(FourwallsError, match="disk is full.*step 1 is intact") as e:
        checkpoint.save(folder, 2, {"w": torch.zeros(100_000)}, {}, {})
    assert e.value.http_status == 507 and checkpoint.latest(folder)[1] == 1
    assert [p.name for p in folder.iterdir()] == ["step-00000001"]


# --- model files that lie (issue 22.8) ---------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tiny, tmp_path) -> Path:
    folder = tmp_path / "hf"
    cfg, state, tok = read_checkpoint(tiny)
    write_hf(folder, cfg, state, tok)
    return folder


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_import_with_a_tokenizer_config_that_is_not_a_json_object(capsys, home, hf_folder, text):
    (hf_folder / "tokenizer_config.json").write_text(text)
    line = fails(capsys, home, "models", "import", str(hf_folder), "--name", "m")
    assert "tokenizer_config.json" in line and "JSON" in line


@pytest.mark.parametrize("file,value", [("generation_config.json", "abc"), ("generation_config.json", [2, "x"]),
                                        ("generation_config.json", 10**9), ("generation_config.json", True),
                                        ("config.json", "abc")])
def test_import_with_an_eos_token_id_that_is_no_token(capsys, home, hf_folder, file, value):
    data = json.loads((hf_folder / file).read_text())
    data["eos_token_id"] = value
    (hf_folder / file).write_text(json.dumps(data))
    line = fails(capsys, home, "models", "import", str(hf_folder), "--name", "m")
    assert file in line and "eos_token_id" in line and repr(value)[:20] in line
