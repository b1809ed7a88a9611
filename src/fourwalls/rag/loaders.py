"""Files to documents: one loader per format, chosen by the file's suffix, each turning the file's bytes into text in
sections under their headings and pages.

A new format is one function ``(path, data) -> Document`` and one line in LOADERS.
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import textwrap
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fourwalls.errors import FormatError, UsageError
from fourwalls.files import megabytes

MAX_BYTES = 50 * 10**6  # refuse bigger files


@dataclass
class Section:
    """A paragraph, list, table or code block under one heading, on one page."""

    text: str
    start: int  # offset of text in Document.text
    heading: str | None  # heading path, "Install > Linux"
    page: int | None  # 1-based, PDFs only


@dataclass
class Document:
    """A file's text: its sections joined by blank lines."""

    source: str
    title: str
    text: str
    sections: list[Section]


_Part = tuple[str, str | None, int | None]  # (text, heading, page) of a section before it has an offset

_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def _clean(text: str) -> str:
    """Runs of spaces and tabs collapsed, lines stripped, blank lines dropped."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _clean_code(text: str) -> str:
    """Code keeps its relative indentation: common indentation, trailing spaces and blank lines around it go."""
    return textwrap.dedent("\n".join(line.rstrip() for line in text.split("\n"))).strip("\n")


def _enter(stack: list[tuple[int, str]], level: int, title: str) -> str | None:
    """Open a heading of ``level`` on the stack of open headings; the new heading path."""
    while stack and stack[-1][0] >= level:
        stack.pop()
    if title:
        stack.append((level, title))
    return " > ".join(t for _, t in stack) or None


def _document(source: str, title: str, parts: Iterable[_Part]) -> Document:
    sections, texts, pos = [], [], 0
    for text, heading, page in parts:
        if text:
            sections.append(Section(text, pos, heading, page))
            texts.append(text)
            pos += len(text) + 2
    if not sections:
        raise FormatError(f"{source} has no text")
    return Document(source, title, "\n\n".join(texts), sections)


def load(path: Path) -> Document:
    """A document from a file of one of SUFFIXES, by the loader for its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise UsageError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUFFIXES)}")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise FormatError(f"{path} is {megabytes(size)}, over the {megabytes(MAX_BYTES)} document limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise FormatError(f"{path} is empty")
    return LOADERS[suffix](path, data)


def load_text(source: str, text: str, title: str | None = None) -> Document:
    """A document from text in memory (an upload, a corpus record), read as Markdown-ish plain text."""
    doc = _markdown(source, text.replace("\r\n", "\n").replace("\r", "\n"), source)
    doc.title = doc.title if title is None else title
    return doc


def _decode(path: Path, data: bytes, html: bool = False) -> str:
    """UTF-8, UTF-16 with a BOM, or an HTML file's declared charset; newlines as \\n."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings = ["utf-16"]
    elif b"\0" in data[:8192]:
        raise FormatError(f"{path} looks binary, not text")
    else:
        encodings = ["utf-8-sig"]
        if html:
            from bs4.dammit import EncodingDetector

            encodings.append(EncodingDetector.find_declared_encoding(data, is_html=True) or "utf-8")
    for encoding in encodings:
        try:
            return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")
        except (UnicodeDecodeError, LookupError):
            pass
    raise FormatError(f"{path} is not UTF-8 text; convert it, e.g. iconv -f LATIN1 -t UTF-8")


def load_plain(path: Path, data: bytes) -> Document:
    """Plain text: blank lines end paragraphs; no headings."""
    text = _decode(path, data)
    return _document(str(path), path.stem, ((_clean(p), None, None) for p in _BLANK_LINE.split(text)))


def load_markdown(path: Path, data: bytes) -> Document:
    """Markdown, by ``_markdown``; the first level-1 heading is the title, else the file's stem."""
    return _markdown(str(path), _decode(path, data), path.stem)


def _markdown(source: str, text: str, title: str) -> Document:
    """ATX headings make the heading path; blank lines end paragraphs; fenced code blocks stay whole."""
    parts: list[_Part] = []
    block: list[str] = []
    stack: list[tuple[int, str]] = []
    heading = h1 = fence = None

    def flush(code: bool = False) -> None:
        parts.append(((_clean_code if code else _clean)("\n".join(block)), heading, None))
        block.clear()

    for line in text.split("\n"):
        if fence:
            block.append(line)
            closing = line.strip()
            if closing.startswith(fence) and closing == closing[0] * len(closing):
                flush(code=True)
                fence = None
        elif m := _FENCE.match(line):
            flush()
            fence = m[1]
            block.append(line)
        elif m := _ATX.match(line):
            flush()
            name = _clean(m[2] or "")
            heading = _enter(stack, len(m[1]), name)
            if len(m[1]) == 1 and h1 is None and name:
                h1 = name
        elif line.strip():
            block.append(line)
        else:
            flush()
    flush(code=fence is not None)
    return _document(source, h1 or title, parts)


_DROP = ("script", "style", "noscript", "template", "nav", "head", "svg", "iframe", "object")
_HEADINGS = {f"h{n}": n for n in range(1, 7)}


def load_html(path: Path, data: bytes) -> Document:
    """Headings make the heading path; every block element (p, li, pre, table, blockquote, ...) is a section."""
    from bs4 import BeautifulSoup, NavigableString
    from bs4.builder import HTMLTreeBuilder
    from bs4.element import PreformattedString

    text = _decode(path, data, html=True)
    blocks = HTMLTreeBuilder.DEFAULT_BLOCK_ELEMENTS | {"caption", "details", "summary", "tr"}
    soup = BeautifulSoup(text, "html.parser")
    title = " ".join(soup.title.get_text(" ").split()) if soup.title else ""
    for tag in soup.find_all(list(_DROP)):
        tag.decompose()
    parts: list[_Part] = []
    pending: list[str] = []
    stack: list[tuple[int, str]] = []
    heading = None

    def flush() -> None:
        parts.append((_clean("".join(pending)), heading, None))
        pending.clear()

    todo = [(iter(soup.contents), False)]  # children still to visit, and whether their parent is a block
    while todo:
        child = next(todo[-1][0], None)
        if child is None:
            if todo.pop()[1]:
                flush()
        elif isinstance(child, NavigableString):
            if not isinstance(child, PreformattedString):  # comments, doctype, CDATA
                pending.append(re.sub(r"\s+", " ", child))
        elif child.name in _HEADINGS:
            flush()
            name = " ".join(child.get_text(" ").split())
            heading = _enter(stack, _HEADINGS[child.name], name)
            title = title or (name if child.name == "h1" else "")
        elif child.name == "pre":
            flush()
            parts.append((_clean_code(child.get_text()), heading, None))
        elif child.name == "table":
            flush()
            rows = (" | ".join(" ".join(c.get_text(" ").split()) for c in tr.find_all(("td", "th")))
                    for tr in child.find_all("tr"))
            parts.append((_clean("\n".join(rows)), heading, None))
        elif child.name == "br":
            pending.append("\n")
        else:
            if child.name in blocks:
                flush()
            todo.append((iter(child.contents), child.name in blocks))
    flush()
    return _document(str(path), title or path.stem, parts)


def load_pdf(path: Path, data: bytes) -> Document:
    """Each page's text layer (pypdf), split on blank lines; sections carry 1-based page numbers."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its repair warnings would reach the terminal unasked
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise FormatError(f"{path} is an encrypted PDF; save a copy without a password and load that")
        title = (reader.metadata.title if reader.metadata else None) or ""
        parts = [(_clean(p), None, i) for i, page in enumerate(reader.pages, 1)
                 for p in _BLANK_LINE.split(page.extract_text() or "")]
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise FormatError(f"{path} is not a readable PDF: {e}") from None
    if not any(text for text, _, _ in parts):
        raise FormatError(f"{path} has no text layer (a scan?); OCR it first, e.g. ocrmypdf")
    return _document(str(path), _clean(str(title)) or path.stem, parts)


def load_docx(path: Path, data: bytes) -> Document:
    """Paragraphs and tables in body order; "Title" and "Heading N" paragraphs make the heading path."""
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from lxml.etree import XMLSyntaxError

    try:
        document = docx.Document(io.BytesIO(data))
        parts: list[_Part] = []
        stack: list[tuple[int, str]] = []
        heading = title = None
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                rows = (" | ".join(cell.text for cell in row.cells) for row in item.rows)
                parts.append((_clean("\n".join(rows)), heading, None))
                continue
            style = item.style.name if item.style is not None else ""
            level = 0 if style == "Title" else int(style[8:]) if re.fullmatch(r"Heading \d", style) else None
            if level is None:
                parts.append((_clean(item.text), heading, None))
            else:
                heading = _enter(stack, level, _clean(item.text))
                title = title or (_clean(item.text) if level == 0 else None)
        title = title or _clean(document.core_properties.title or "")
    except (zipfile.BadZipFile, PackageNotFoundError, KeyError, ValueError, XMLSyntaxError) as e:
        raise FormatError(f"{path} is not a readable DOCX file: {e}") from None
    return _document(str(path), title or path.stem, parts)


LOADERS: dict[str, Callable[[Path, bytes], Document]] = {
    ".txt": load_plain,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
}
SUFFIXES = tuple(LOADERS)
