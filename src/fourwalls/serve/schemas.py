"""The request bodies of the OpenAI API that fourwalls serves, as pydantic models (unknown fields are ignored,
except in document uploads and retrieval options, where a misspelt ``groups`` or ``where`` must not silently widen
who reads a document or what a search returns)."""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

from fourwalls.errors import UsageError
from fourwalls.tools import BUILTINS, DEFAULT_ROUNDS, MAX_ROUNDS, ToolSpec
from fourwalls.tools.format import Function, ToolCall

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


class Extensions(BaseModel):
    """The ``fourwalls`` object of a request: what the OpenAI API has no field for."""

    model_config = ConfigDict(extra="ignore")

    profile: str | None = Field(None, description="the application profile (chat, rag, summarize, batch, or one "
                                "the server's profiles file defines): its priority, latency SLOs and max tokens; "
                                "default: the API key's, else the server's")


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
    fourwalls: Extensions = Field(default_factory=Extensions, description="fourwalls extensions")

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


FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
FunctionName = Annotated[str, StringConstraints(pattern=FUNCTION_NAME)]
ToolChoiceMode = Literal["none", "auto", "required"]


def _json_object(v: str) -> str:
    try:
        ok = isinstance(json.loads(v), dict)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("the arguments must be a JSON object, as text")
    return v


JsonObjectText = Annotated[str, AfterValidator(_json_object)]


class FunctionCall(BaseModel):
    name: str
    arguments: JsonObjectText = Field(..., description="a JSON object, as text")


class ToolCallIn(BaseModel):
    id: str = Field(..., min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall

    def internal(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant's calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")

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

    def internal(self) -> dict[str, Any]:
        """The message as a Turn reads it."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.role == "assistant" and self.tool_calls:
            out["tool_calls"] = [c.internal() for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(BaseModel):
    name: FunctionName
    description: str = ""
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema (an object's); none: no arguments")
    strict: bool | None = None

    def internal(self) -> Function:
        return Function(self.name, self.description, self.parameters)


class FunctionTool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class BuiltinTool(BaseModel):
    """fourwalls extension: a tool the server runs itself."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["fourwalls"]
    name: Literal[BUILTINS]  # type: ignore[valid-type]
    collection: str | None = Field(None, min_length=1, max_length=64, description="documents: search only this "
                                   "collection (default: every collection the API key may read)")

    @model_validator(mode="after")
    def _collection_for_documents_only(self) -> BuiltinTool:
        if self.collection and self.name != "documents":
            raise ValueError("only the documents tool takes a collection")
        return self

    def internal(self) -> ToolSpec:
        return ToolSpec(self.name, self.collection)


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ChatTool = Annotated[FunctionTool | BuiltinTool, Field(discriminator="type")]
MaxRounds = Field(DEFAULT_ROUNDS, ge=1, le=MAX_ROUNDS, description="fourwalls extension: most rounds of built-in "
                  "tool calls (model -> tools -> model) before the model must answer")


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
    tools: list[ChatTool] | None = Field(None, description='functions, and fourwalls\' built-in tools: '
                                         '{"type": "fourwalls", "name": "calculator"} (or "documents")')
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tool_rounds: int = MaxRounds


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
    tools: list[Literal[BUILTINS]] = Field(default_factory=list, max_length=len(BUILTINS),  # type: ignore[valid-type]
                                           description="built-in tools the model may call (fourwalls runs them)")


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


# --- the Responses API ------------------------------------------------------------------------------------------


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1, max_length=128)
    name: str
    arguments: JsonObjectText = Field(..., description="a JSON object, as text")


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1, max_length=128)
    output: str


class McpCallItem(BaseModel):
    """A built-in tool's call and result, as a previous response's output gives it back."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["mcp_call"]
    id: str = Field(..., min_length=1, max_length=128)
    name: str
    arguments: str
    output: str | None = None


def _item_type(v: Any) -> str | None:
    kind = (v.get("type") if isinstance(v, dict) else getattr(v, "type", None)) or "message"
    return kind if isinstance(kind, str) else None  # a type that is no string matches no tag: a 400


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[McpCallItem, Tag("mcp_call")], Discriminator(_item_type)]


class FlatFunctionTool(BaseModel):
    """The Responses API's function tool: the function's fields at the top."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def internal(self) -> Function:
        return Function(self.name, self.description or "", self.parameters)


class NamedFunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(BaseModel):
    format: TextFormat = Field(default_factory=TextFormat)


ResponsesTool = Annotated[FlatFunctionTool | BuiltinTool, Field(discriminator="type")]


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputItem] = Field(..., description="a user message, or a list of items (messages, "
                                         "function calls and their outputs)")
    instructions: str | None = Field(None, description="the system message (not carried over by "
                                     "previous_response_id)")
    previous_response_id: str | None = Field(None, max_length=128, description="continue that stored response's "
                                             "conversation")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    tools: list[ResponsesTool] | None = None
    tool_choice: ToolChoiceMode | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    stream: bool = False
    store: bool = Field(True, description="keep the response (per API key) for GET, DELETE and previous_response_id")
    metadata: dict[str, str] | None = None
    user: str | None = None
    max_tool_rounds: int = MaxRounds
    fourwalls: Extensions = Field(default_factory=Extensions, description="fourwalls extensions")
