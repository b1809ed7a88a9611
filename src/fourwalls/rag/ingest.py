"""Documents for retrieval: loaders for text, Markdown, HTML, PDF and DOCX files, structure-aware chunking, and
incremental ingestion into a store."""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import re
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from fourwalls.errors import FormatError, FourwallsError, NotFoundError, UsageError
from fourwalls.files import sha256_file
from fourwalls.rag.embed import Embedder, check_embedder
from fourwalls.rag.stores import ChunkRow, DocumentInfo, DocumentStore, indexed_text

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")
MAX_BYTES = 50 * 2**20  # refuse bigger files


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


@dataclass
class Chunk:
    """A span of Document.text to embed and cite: ``text == doc.text[start:end]``."""

    text: str
    start: int
    end: int
    heading: str | None
    page: int | None


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
    """A document from a file of one of SUFFIXES, chosen by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUFFIXES)}")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise FormatError(f"{path} is {size / 2**20:.1f} MiB, over the {MAX_BYTES // 2**20} MiB document limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise FormatError(f"{path} is empty")
    if suffix == ".pdf":
        return _pdf(path, data)
    if suffix == ".docx":
        return _docx(path, data)
    text = _decode(path, data, html=suffix in (".html", ".htm"))
    if suffix in (".html", ".htm"):
        return _html(path, text)
    if suffix == ".txt":
        return _document(str(path), path.stem, ((_clean(p), None, None) for p in _BLANK_LINE.split(text)))
    return _markdown(str(path), text, path.stem)


def load_text(source: str, text: str, title: str | None = None) -> Document:
    """A document from text in memory (an upload, a corpus record), read as Markdown-ish plain text."""
    doc = _markdown(source, text.replace("\r\n", "\n").replace("\r", "\n"), source)
    doc.title = doc.title if title is None else title
    return doc


def _decode(path: Path, data: bytes, html: bool) -> str:
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


def _html(path: Path, text: str) -> Document:
    """Headings make the heading path; every block element (p, li, pre, table, blockquote, ...) is a section."""
    from bs4 import BeautifulSoup, NavigableString
    from bs4.builder import HTMLTreeBuilder
    from bs4.element import PreformattedString

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


def _pdf(path: Path, data: bytes) -> Document:
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


def _docx(path: Path, data: bytes) -> Document:
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


def counting_tokenizer(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``tokenizer`` if it neither truncates nor pads, else such a copy of it (the caller's stays as it is)."""
    if tokenizer.truncation or tokenizer.padding:
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    return tokenizer


def chunk(doc: Document, tokenizer: tokenizers.Tokenizer, max_tokens: int = 192, overlap: int = 32) -> list[Chunk]:
    """Spans of at most ``max_tokens`` tokens: whole sections packed under one heading and page, long ones windowed.

    A section over the budget is cut into windows sharing ``overlap`` tokens (a few more or fewer, to open at a
    word), each ending after a sentence in its last fifth where there is one, else at a word boundary. Pass
    ``counting_tokenizer(t)``, made once, to spare a copy of a tokenizer that truncates or pads on every call.
    """
    if max_tokens <= 0 or not 0 <= overlap < max_tokens:
        raise UsageError(f"chunking needs max_tokens > 0 and 0 <= overlap < max_tokens, not {max_tokens} and {overlap}")
    tokenizer = counting_tokenizer(tokenizer)
    encodings = tokenizer.encode_batch([s.text for s in doc.sections], add_special_tokens=False)
    chunks: list[Chunk] = []
    group: list[Section] = []
    count = 0

    def emit(start: int, end: int, s: Section) -> None:
        chunks.append(Chunk(doc.text[start:end], start, end, s.heading, s.page))

    def flush() -> None:
        if group:
            emit(group[0].start, group[-1].start + len(group[-1].text), group[0])
            group.clear()

    for s, enc in zip(doc.sections, encodings):
        n = len(enc)
        if group and (count + n > max_tokens or (s.heading, s.page) != (group[0].heading, group[0].page)):
            flush()
        if n <= max_tokens:
            group.append(s)
            count = n if len(group) == 1 else count + n
            continue
        offsets = enc.offsets  # each read of an Encoding's attribute builds a new list
        for a, b in _windows(s.text, offsets, enc.word_ids, max_tokens, overlap):
            start, end = offsets[a][0] if a else 0, offsets[b - 1][1] if b < n else len(s.text)
            emit(s.start + start, s.start + end, s)
    flush()
    return chunks


def _windows(
    text: str, offsets: list[tuple[int, int]], words: list[int | None], size: int, overlap: int
) -> Iterator[tuple[int, int]]:
    """Token ranges [a, b) of at most ``size`` tokens covering a section, consecutive ones sharing ``overlap``.

    Windows open and close at word starts where they can: a window cut inside a word would re-tokenize into
    more tokens than it was counted as.
    """
    n, a, fifth = len(offsets), 0, max(1, size // 5)
    while True:
        b = min(a + size, n)
        if b < n:  # after a sentence end in the last fifth, else at the nearest word start
            cut = None
            for k in range(b, a + overlap, -1):
                if words[k] == words[k - 1]:
                    continue
                cut = cut or k
                if k < b - fifth:
                    break
                if text[offsets[k - 1][1] - 1] in ".?!" and offsets[k][0] > offsets[k - 1][1]:
                    cut = k
                    break
            b = cut or b
        yield a, b
        if b == n:
            return
        # The next window opens at a word start: a little before b - overlap, else after it (b at worst: no
        # overlap), else mid-word.
        back = range(b - overlap, max(a, b - overlap - fifth), -1)
        a = next((k for k in (*back, *range(b - overlap + 1, b + 1)) if words[k] != words[k - 1]), b - overlap)


# Ingestion: which files changed, load and chunk them, embed in batches across documents, one transaction each.


@dataclass
class Item:
    """Something to ingest: its source key, a digest of its content, and how to load it."""

    source: str
    digest: str
    load: Callable[[], Document]


@dataclass
class Report:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0

    def summary(self) -> str:
        rate = self.chunks / self.seconds if self.seconds else 0.0
        return (f"{self.added} added, {self.replaced} replaced, {self.unchanged} unchanged, {self.removed} removed, "
                f"{len(self.failed)} failed; {self.chunks} chunks in {self.seconds:.1f} s ({rate:.1f} chunks/s, "
                f"{self.embed_seconds:.1f} s embedding)")


def file_items(paths: list[Path]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Supported files under ``paths`` (folders walked, hidden entries skipped), and the paths refused outright."""
    items, refused = [], []
    for root in paths:
        if not root.exists():
            refused.append((str(root), f"no such file or folder: {root}"))
            continue
        found = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for p in found:
            source = str(p.resolve())
            try:
                items.append(Item(source, sha256_file(p), lambda p=p: load(p)))
            except OSError as e:
                refused.append((source, f"cannot read {p}: {e.strerror}"))
    return items, refused


def beir_items(path: Path) -> list[Item]:
    """The documents of a BEIR corpus (corpus.jsonl, or a folder holding one), keyed by their ``_id``."""
    from fourwalls.eval.retrieval import read_corpus

    corpus = path / "corpus.jsonl" if path.is_dir() else path
    return [Item(doc_id, "sha256-" + hashlib.sha256(f"{title}\0{text}".encode()).hexdigest(),
                 lambda i=doc_id, ti=title, te=text: load_text(i, te, title=ti or None))
            for doc_id, title, text in read_corpus(corpus)]


def ingest(store: DocumentStore, embedder: Embedder, items: list[Item], collection: str, *,
           groups: list[str] = (), meta: dict[str, str] | None = None, sync_roots: list[str] | None = None,
           max_tokens: int = 192, overlap: int = 32, batch_chunks: int = 256, progress: bool = True) -> Report:
    """Bring ``collection`` up to date with ``items``: new and changed ones (re)written, unchanged ones skipped,
    and with ``sync_roots`` the documents under those roots that are no longer among the items removed.

    A failing item is recorded in the report and the rest go on; the store keeps its old version of it."""
    groups, meta = sorted(set(groups)), dict(meta or {})
    try:
        check_embedder(store.collection(collection), embedder)
    except NotFoundError:
        store.create_collection(collection, embedder.name, embedder.dim)
    existing = {d.source: d for d in store.documents(collection)}
    report, pending, started = Report(), [], time.perf_counter()
    bar = tqdm(total=len(items), unit="doc", desc=f"ingest {collection}", disable=not progress)

    def flush() -> None:
        texts = [indexed_text(doc.title, c.heading, c.text) for _, doc, chunks in pending for c in chunks]
        t = time.perf_counter()
        vectors = embedder.embed(texts)
        report.embed_seconds += time.perf_counter() - t
        at = 0
        for item, doc, chunks in pending:
            info = DocumentInfo(item.source, item.digest, doc.title, groups, meta)
            store.put_document(collection, info, [ChunkRow(c.text, c.start, c.end, c.heading, c.page)
                                                  for c in chunks], vectors[at:at + len(chunks)])
            at += len(chunks)
            report.chunks += len(chunks)
            if item.source in existing:
                report.replaced += 1
            else:
                report.added += 1
        bar.update(len(pending))
        bar.set_postfix_str(f"{report.chunks / (time.perf_counter() - started):.1f} chunks/s")
        pending.clear()

    for item in items:
        old = existing.get(item.source)
        if old and (old.digest, old.groups, old.meta) == (item.digest, groups, meta):
            report.unchanged += 1
            bar.update(1)
            continue
        try:
            doc = item.load()
            chunks = chunk(doc, embedder.tokenizer, max_tokens, overlap)
        except FourwallsError as e:
            report.failed.append((item.source, str(e)))
            bar.update(1)
            continue
        pending.append((item, doc, chunks))
        if sum(len(c) for _, _, c in pending) >= batch_chunks:
            flush()
    if pending:
        flush()
    bar.close()
    if sync_roots is not None:
        seen = {item.source for item in items}
        for source in existing:
            if source not in seen and any(source == r or source.startswith(r.rstrip("/") + "/") for r in sync_roots):
                report.removed += store.delete_document(collection, source)
    report.seconds = time.perf_counter() - started
    return report


def reembed(store: DocumentStore, embedder: Embedder, collection: str, progress: bool = True) -> int:
    """Embed every chunk of ``collection`` again with ``embedder`` and swap the vectors in, in one transaction."""
    hits = store.all_chunks(collection)
    texts = [indexed_text(h.title, h.heading, h.text) for h in hits]
    step = 256
    vectors = np.concatenate([embedder.embed(texts[i:i + step])
                              for i in tqdm(range(0, len(texts), step), unit="batch", disable=not progress)]
                             or [np.zeros((0, embedder.dim), np.float32)])
    store.replace_vectors(collection, embedder.name, embedder.dim, [h.id for h in hits], vectors)
    return len(hits)
