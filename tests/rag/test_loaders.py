"""Loaders (text, Markdown, HTML, PDF, DOCX), chosen by suffix, and their errors naming the file and cause."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fourwalls.errors import FormatError, UsageError
from fourwalls.rag import loaders
from fourwalls.rag.loaders import Document, load, load_text
from tests.rag.docs import minimal_pdf


def check_spans(doc: Document) -> None:
    assert doc.sections
    for s in doc.sections:
        assert s.text and doc.text[s.start : s.start + len(s.text)] == s.text
        assert s.text == s.text.strip()


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


MARKDOWN = """\
# Guide

Intro   paragraph,\twith  spaces.

## Install

Run the installer.

### Linux

- apt install fourwalls
- or pip

```sh
pip install fourwalls

fourwalls --help
```

## Use #

Start it.
"""


def test_markdown_headings_paragraphs_and_code(tmp_path):
    doc = load(write(tmp_path / "guide.md", MARKDOWN))
    check_spans(doc)
    assert doc.title == "Guide" and doc.source == str(tmp_path / "guide.md")
    got = [(s.text, s.heading, s.page) for s in doc.sections]
    assert got == [
        ("Intro paragraph, with spaces.", "Guide", None),
        ("Run the installer.", "Guide > Install", None),
        ("- apt install fourwalls\n- or pip", "Guide > Install > Linux", None),
        ("```sh\npip install fourwalls\n\nfourwalls --help\n```", "Guide > Install > Linux", None),
        ("Start it.", "Guide > Use", None),
    ]
    assert "\n\n".join(s.text for s in doc.sections) == doc.text


def test_text_paragraphs_and_encodings(tmp_path):
    doc = load(write(tmp_path / "notes.txt", "\ufeffFirst  line\r\nstill first\r\n\r\n \t \r\nSecond café\n"))
    check_spans(doc)
    assert doc.title == "notes" and [s.text for s in doc.sections] == ["First line\nstill first", "Second café"]
    assert all(s.heading is None for s in doc.sections)
    utf16 = load(write(tmp_path / "wide.txt", "Grüße\n\nzwei".encode("utf-16")))
    assert [s.text for s in utf16.sections] == ["Grüße", "zwei"]


def test_the_suffix_chooses_the_loader_whatever_its_case(tmp_path):
    def read(name: str, text: str) -> tuple[str, list[tuple[str, str | None]]]:
        doc = load(write(tmp_path / name, text))
        return doc.title, [(s.text, s.heading) for s in doc.sections]

    headed = ("Title", [("Body text.", "Title")])
    for name in ("a.md", "b.MARKDOWN", "c.Md"):
        assert read(name, "# Title\n\nBody text.") == headed
    assert read("e.HTM", "<h1>Title</h1><p>Body text.</p>") == headed
    assert read("d.TXT", "# Title\n\nBody text.") == ("d", [("# Title", None), ("Body text.", None)])  # no headings
    assert loaders.SUFFIXES == tuple(loaders.LOADERS) and all(s == s.lower() for s in loaders.SUFFIXES)


def test_load_text_reads_markdown_in_memory():
    doc = load_text("doc-17", "# Zoo\n\nThe lions sleep.\n\n## Hours\nOpen at nine.")
    check_spans(doc)
    assert doc.title == "Zoo" and doc.sections[1].heading == "Zoo > Hours"
    assert load_text("doc-18", "plain words").title == "doc-18"
    assert load_text("doc-19", "# Zoo\n\nx", title="Given").title == "Given"
    with pytest.raises(FormatError, match="doc-20 has no text"):
        load_text("doc-20", " \n\n# \n")


HTML = """<!DOCTYPE html>
<html><head><title>Zoo handbook</title><style>body { color: red }</style>
<script>var secret = "SCRIPTTEXT";</script></head>
<body>
<nav><a href="/">NAVTEXT home</a></nav>
<h1>Animals</h1>
<p>The   lions <b>sleep</b>
all day.<br>They wake at dusk.</p>
<!-- COMMENTTEXT -->
<h2>Feeding</h2>
<ul><li>Meat at noon</li><li>Water always</li></ul>
<table><tr><th>Animal</th><th>Food</th></tr><tr><td>Lion</td><td>Meat</td></tr></table>
<div>Loose text in a div</div>
<h2>Staff</h2>
<blockquote>Keepers only.</blockquote>
<pre>  indented
    code</pre>
<script>alert("SCRIPTTWO")</script>
</body></html>
"""


def test_html_structure_without_noise(tmp_path):
    doc = load(write(tmp_path / "zoo.html", HTML))
    check_spans(doc)
    assert doc.title == "Zoo handbook"
    for noise in ("SCRIPTTEXT", "SCRIPTTWO", "NAVTEXT", "color: red", "COMMENTTEXT", "Zoo handbook"):
        assert noise not in doc.text
    got = [(s.text, s.heading) for s in doc.sections]
    assert got == [
        ("The lions sleep all day.\nThey wake at dusk.", "Animals"),
        ("Meat at noon", "Animals > Feeding"),
        ("Water always", "Animals > Feeding"),
        ("Animal | Food\nLion | Meat", "Animals > Feeding"),
        ("Loose text in a div", "Animals > Feeding"),
        ("Keepers only.", "Animals > Staff"),
        ("indented\n  code", "Animals > Staff"),
    ]


def test_html_declared_charset_first_h1_title_and_deep_nesting(tmp_path):
    page = '<html><head><meta charset="iso-8859-1"></head><body><h1>Caf\xe9</h1><p>na\xefve</p></body></html>'
    doc = load(write(tmp_path / "old.htm", page.encode("latin-1")))
    assert doc.title == "Café" and doc.text == "naïve"
    assert load(write(tmp_path / "deep.html", "<div>" * 5000 + "deep" + "</div>" * 5000)).text == "deep"


def test_pdf_pages_and_title(tmp_path):
    data = minimal_pdf([["Page one says hello.", "Second line (of one)."], ["Page two."]], title="Zoo Report")
    doc = load(write(tmp_path / "report.pdf", data))
    check_spans(doc)
    assert doc.title == "Zoo Report"
    assert [(s.text, s.page, s.heading) for s in doc.sections] == [
        ("Page one says hello.\nSecond line (of one).", 1, None),
        ("Page two.", 2, None),
    ]
    assert load(write(tmp_path / "untitled.pdf", minimal_pdf([["x"]]))).title == "untitled"


def encrypted_pdf(user: str, owner: str | None = None) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(minimal_pdf([["Private words."]]))))
    writer.encrypt(user, owner)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_encrypted_blank_and_corrupt(tmp_path):
    # An owner password alone restricts editing, not reading: such files load.
    assert load(write(tmp_path / "owner.pdf", encrypted_pdf("", "owner"))).text == "Private words."
    with pytest.raises(FormatError, match=r"locked\.pdf is an encrypted PDF; save a copy without a password"):
        load(write(tmp_path / "locked.pdf", encrypted_pdf("secret")))

    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.write(tmp_path / "scan.pdf")
    with pytest.raises(FormatError, match=r"scan\.pdf has no text layer .*OCR it first"):
        load(tmp_path / "scan.pdf")
    with pytest.raises(FormatError, match=r"broken\.pdf is not a readable PDF"):
        load(write(tmp_path / "broken.pdf", b"%PDF-1.4\n1 0 obj <<>> endobj\n"))
    with pytest.raises(FormatError, match=r"cut\.pdf is not a readable PDF"):
        load(write(tmp_path / "cut.pdf", minimal_pdf([["x"]])[:200]))


def test_docx_title_headings_and_tables(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("Zoo Manual", 0)
    d.add_paragraph("Welcome   to the zoo.")
    d.add_heading("Animals", 1)
    d.add_heading("Lions", 2)
    d.add_paragraph("Lions sleep.")
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([("Name", "Age"), ("Leo", "7")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.add_heading("Staff", 1)
    d.add_paragraph("Keepers only.")
    d.save(tmp_path / "manual.docx")

    doc = load(tmp_path / "manual.docx")
    check_spans(doc)
    assert doc.title == "Zoo Manual"
    assert [(s.text, s.heading) for s in doc.sections] == [
        ("Welcome to the zoo.", "Zoo Manual"),
        ("Lions sleep.", "Zoo Manual > Animals > Lions"),
        ("Name | Age\nLeo | 7", "Zoo Manual > Animals > Lions"),
        ("Keepers only.", "Zoo Manual > Staff"),
    ]
    with pytest.raises(FormatError, match=r"bad\.docx is not a readable DOCX file"):
        load(write(tmp_path / "bad.docx", b"PK\x03\x04 not really a zip"))


def test_bad_files_name_the_file_and_the_cause(tmp_path, monkeypatch):
    cases = [
        (write(tmp_path / "x.txt", b"ab\x00\x01\x02cd" * 10), FormatError, r"x\.txt looks binary, not text"),
        (write(tmp_path / "latin.txt", "caf\xe9".encode("latin-1")), FormatError, r"latin\.txt is not UTF-8.*iconv"),
        (write(tmp_path / "latin.html", "<p>caf\xe9</p>".encode("latin-1")), FormatError, r"latin\.html is not UTF"),
        (write(tmp_path / "empty.md", b""), FormatError, r"empty\.md is empty"),
        (write(tmp_path / "blank.md", b"  \n\n\t\n"), FormatError, r"blank\.md has no text"),
        (write(tmp_path / "sheet.xlsx", b"PK"), UsageError, r"sheet\.xlsx: unsupported file type '\.xlsx'; .*\.docx"),
        (tmp_path / "missing.md", UsageError, r"no such file: .*missing\.md"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            load(path)
    monkeypatch.setattr(loaders, "MAX_BYTES", 10)
    with pytest.raises(FormatError, match=r"big\.txt is 0\.0 MB, over the 0\.0 MB document limit"):
        load(write(tmp_path / "big.txt", "eleven byte"))
