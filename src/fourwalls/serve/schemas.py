"""The request bodies of the OpenAI API that fourwalls serves, as pydantic models (unknown fields are ignored,
except in document uploads and retrieval options, where a misspelt ``groups`` or ``where`` must not silently widen
who reads a document or what a search returns)."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from fourwalls.errors import UsageError

MAX_N = 8  # choices per request
MAX_STOP = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class Sampling(BaseModel):
    """Fields shared by both completion endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 disables it")
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (as in vLLM)")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] = Field(..., description="text, several texts, or token ids")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    """A part of a message's content. Any type parses, so that a part the model cannot read (an image) gets an
    error that says so rather than a schema mismatch."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field("text", description="only text parts are supported")
    text: str | None = None


IMAGE_PARTS = ("image_url", "input_image", "image")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one text; UsageError for a part that is not text."""
        if not isinstance(self.content, list):
            return self.content or ""
        for p in self.content:
            if p.type in IMAGE_PARTS:
                raise UsageError("images are not supported by this model: send text content parts only",
                                 param="messages", code="unsupported_content")
            if p.type != "text":
                raise UsageError(f"content parts of type {p.type!r} are not supported: send text parts "
                                 '({"type": "text", "text": ...})', param="messages", code="unsupported_content")
            if p.text is None:
                raise UsageError("a text content part needs its text", param="messages")
        return "".join(p.text or "" for p in self.content)


MAX_TOP_K = 50  # chunks one retrieval may return
MAX_EMBED_INPUTS = 2048
META_KEY = r'^[^"\\\x00-\x1f]{1,128}$'  # metadata keys (and where filters) go into JSON paths: no quotes
Where = dict[Annotated[str, StringConstraints(pattern=META_KEY)], str]


class Retrieval(BaseModel):
    """What to retrieve: shared by /v1/collections/{name}/search and the ``rag`` field of chat completions."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="chunks to return, best first")
    mode: Literal["hybrid", "bm25", "vector"] = Field("hybrid", description="hybrid: BM25 and vectors fused by "
                                                      "reciprocal rank")
    where: Where | None = Field(None, description="document metadata that must match exactly")


class RagOptions(Retrieval):
    collection: str = Field(..., min_length=1, max_length=64, description="the collection to answer from")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="only chunks this similar to the "
                                         "question (cosine), or containing all of its words, become sources; if "
                                         "none does, the answer is 'I don't know' and no model runs (default 0.3)")


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    rag: RagOptions | None = Field(None, description="fourwalls extension: answer the last user message from a "
                                   "document collection, citing its sources (see the top-level citations field)")
    raw_control_tokens: bool = Field(False, description="fourwalls extension: true passes control-token strings "
                                     "typed in message content (<|im_start|>, </s>, ...) to the model as control "
                                     "tokens; by default each is broken apart and read as plain text, so that no "
                                     "message can open a turn of its own")


class AdapterLoad(BaseModel):
    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str = Field(..., min_length=1, description="a PEFT-format folder, or the name of an adapter in the store")


class CollectionCreate(BaseModel):
    name: str = Field(..., description="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")


class DocumentUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, max_length=1024,
                        description="the document's key in the collection, e.g. handbook.md; its suffix picks the "
                        "parser of content_base64 (.txt .md .markdown .html .htm .pdf .docx); no control or "
                        "format characters (newlines, bidirectional overrides, ...)")
    text: str | None = Field(None, description="the document as text (read as Markdown); or content_base64")
    content_base64: str | None = Field(None, description="the file's bytes, base64-encoded; or text")
    title: str | None = Field(None, max_length=1024, description="default: the document's own title (first "
                              "heading, PDF/DOCX metadata), else the source's file name")
    groups: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list, description="only API keys of these groups may read it (default: every key)")
    regroup: bool = Field(False, description="replace a stored document whose groups differ from these (without it "
                          "such an upload is refused: changing who may read a document must be explicit)")
    meta: dict[Annotated[str, StringConstraints(pattern=META_KEY)], str] = Field(
        default_factory=dict, description="metadata to filter searches on (where)")
    chunk_tokens: int = Field(192, ge=16, le=1024, description="largest chunk in embedder tokens")
    overlap: int = Field(32, ge=0, le=512, description="tokens shared by consecutive pieces of a long paragraph")


    @field_validator("source", "title")
    @classmethod
    def _visible(cls, value: str | None) -> str | None:
        # A newline, an RTL override, a zero-width space...: names that list as another, or that no URL deletes.
        bad = next((c for c in value or "" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
        if bad is not None:
            raise ValueError(f"control and format characters such as U+{ord(bad):04X} are not allowed")
        return value


class SearchRequest(Retrieval):
    query: str = Field(..., min_length=1, max_length=10_000)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(..., description=f"a text or up to {MAX_EMBED_INPUTS} texts; texts longer than "
                                   "the embedder's window (256 tokens for all-MiniLM-L6-v2) are truncated")
    model: str = Field(..., examples=["all-MiniLM-L6-v2"], description="the server's embedder")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: int | None = Field(None, ge=1, description="must be the embedder's dimension if given")
    user: str | None = None


MAX_MESSAGES = 10_000  # per saved conversation; the body limit (--max-body-bytes) bounds their size


class ConversationSettings(BaseModel):
    """What a conversation asks with: the web page's picker and settings, kept per conversation."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=256, description="the model or adapter (GET /v1/models)")
    system: str = Field("", max_length=100_000, description="the system prompt")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, description="per answer; null: up to the context window")
    collection: str | None = Field(None, max_length=64, description="answer from this document collection (RAG)")


class ConversationMessage(BaseModel):
    """An OpenAI chat message, plus whatever the client keeps beside it (``citations``, ``usage``, ``timings``,
    ``tool_calls``, ...), stored as sent."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field("", max_length=200)
    settings: ConversationSettings = Field(default_factory=ConversationSettings)
    messages: list[ConversationMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)


class ConversationUpdate(BaseModel):
    """The fields to replace; absent ones are kept (``messages`` replaces the whole list)."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=200)
    settings: ConversationSettings | None = None
    messages: list[ConversationMessage] | None = Field(None, max_length=MAX_MESSAGES)
