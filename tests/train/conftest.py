from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def corpus(tmp_path):
    """A small real text: the start of tinyshakespeare, or the English fixture where shared/ is absent."""
    path = tmp_path / "corpus.txt"
    if CORPUS.is_file():
        path.write_text(CORPUS.read_text()[:60_000])
    else:
        path.write_text((Path(__file__).parents[1] / "fixtures" / "english.txt").read_text() * 20)
    return path
