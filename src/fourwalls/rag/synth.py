"""Self-instruct from a collection: instruction data grounded in your own documents, for `fourwalls finetune`.

For a chunk the caller may read, the model writes a question or instruction the chunk answers (self-instruct, Wang
et al. 2023, with seed tasks as examples of the style), then answers it with the chunk as its only source, in the
same grounded prompt as `rag ask`. A pair is dropped when it is malformed (an empty, cut-off or refused answer, an
instruction that leans on "the passage"), when its instruction is too similar to one already kept (ROUGE-L, as
self-instruct does), or when the answer does not use its source (too few of its words come from the chunk). Each
kept example names its source (collection, document, span) and the digest of the model that wrote it.

Only documents the caller's groups may read are ever put in a prompt, so no example carries text from another's.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fourwalls.errors import ForbiddenError, UsageError
from fourwalls.files import atomic_write, read_text
from fourwalls.generate import SamplingParams, complete
from fourwalls.rag.answer import messages, neutralise
from fourwalls.rag.stores import STOPWORDS, DocumentStore, Hit

SEED_TASKS = [
    "What should I do if my laptop is stolen?",
    "Summarise the rules for booking a meeting room.",
    "Who approves travel expenses, and by when must they be filed?",
    "How many days of paid leave does a new employee get?",
    "Explain the steps to replace a worn part.",
    "List the requirements a password must meet.",
]
SIMILAR = 0.7  # ROUGE-L F1 at or above which an instruction repeats a kept one (self-instruct's threshold)
MIN_GROUNDING = 0.5  # share of an answer's content words that must occur in its source
MIN_CHUNK_WORDS = 25  # a shorter chunk holds too little to ask about
DROP_REASONS = ("malformed", "too_similar", "ungrounded")
INSTRUCT_SYSTEM = (
    "You write one question that a document answers. The question must make sense to someone who cannot see the "
    "document: name what it is about. Questions look like these:\n{examples}Reply with the question only.")
_LEANS_ON_SOURCE = re.compile(r"\b(passage|the text|this text|the source|the document|above|excerpt)\b", re.I)
_IMPERATIVE = re.compile(r"(explain|list|summari[sz]e|describe|give|name|compare|outline|define|tell)\b.*\.$",
                         re.I)
_REFUSAL = re.compile(r"\b(don'?t know|do not know|not (mentioned|provided|stated)|no information)\b", re.I)


@dataclass
class SynthReport:
    out: Path
    asked: int
    kept: int = 0
    attempts: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def drops(self) -> str:
        return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.dropped.items())

    def summary(self) -> str:
        return (f"wrote {self.kept} of {self.asked} examples to {self.out}; {self.attempts} tried, dropped "
                f"{self.drops()}; {self.prompt_tokens} prompt and {self.generated_tokens} generated tokens in "
                f"{self.seconds:.1f} s")


def readable_chunks(store: DocumentStore, collection: str, groups: set[str] | None) -> list[Hit]:
    """Every chunk of the documents ``groups`` may read (None: all), in document order."""
    store.collection(collection)  # NotFoundError names a missing collection
    docs = store.documents(collection)
    visible = [d for d in docs if d.readable(groups)]
    if docs and not visible:
        raise ForbiddenError(f"group(s) {', '.join(sorted(groups or ())) or '(none)'} may read no document of "
                             f"collection '{collection}'", code="collection_not_readable")
    return [h for d in visible for h in store.chunks(collection, d.source)]


def usable_chunks(store: DocumentStore, collection: str, groups: set[str] | None, count: int,
                  per_chunk: int) -> list[Hit]:
    """The readable chunks long enough to ask about; an error if they cannot support ``count`` examples."""
    if count < 1:
        raise UsageError(f"--count must be at least 1, not {count}")
    if per_chunk < 1:
        raise UsageError(f"--per-chunk must be at least 1, not {per_chunk}")
    chunks = [h for h in readable_chunks(store, collection, groups) if len(h.text.split()) >= MIN_CHUNK_WORDS]
    if count > len(chunks) * per_chunk:
        raise UsageError(f"collection '{collection}' supports at most {len(chunks) * per_chunk} examples: "
                         f"{len(chunks)} readable chunks of at least {MIN_CHUNK_WORDS} words, {per_chunk} per chunk "
                         "(--per-chunk); lower --count or add documents")
    return chunks


def load_seed_tasks(path: Path) -> list[str]:
    """Seed instructions: JSONL with an "instruction" per line (self-instruct's format) or one per line of text."""
    lines = [line.strip() for line in read_text(path, "seed-task file").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        tasks = []
        for n, line in enumerate(lines, 1):
            try:
                task = json.loads(line).get("instruction")
            except (ValueError, AttributeError):
                task = None
            if not isinstance(task, str) or not task.strip():
                raise UsageError(f"{path}:{n}: expected a JSON object with a non-empty \"instruction\"")
            tasks.append(task.strip())
        lines = tasks
    if not lines:
        raise UsageError(f"the seed-task file {path} holds no tasks")
    return lines


def words(text: str) -> list[str]:
    """Lower-cased content words (stopwords dropped)."""
    return [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]


def grounding(answer: str, source: str) -> float:
    """The share of the answer's content words that occur in its source (0 for an answer without any)."""
    said, known = words(answer), set(words(source))
    return sum(w in known for w in said) / len(said) if said else 0.0


def clean_instruction(text: str) -> str | None:
    """The first question (or imperative line) of the model's reply without labels, numbering or quotes; None if
    there is none, or it leans on a passage the reader of the final data will not see."""
    for line in text.splitlines():
        line = re.sub(r"^\W*(?:\d+[.)]\s*)?(?:(?:question|instruction|task|q)\s*:\s*)?", "", line.strip(), flags=re.I)
        line = line.strip().strip("\"'*").strip()
        if "?" in line:
            line = line[: line.index("?") + 1]
        elif not _IMPERATIVE.match(line):
            continue
        if 3 <= len(line.split()) <= 60 and not _LEANS_ON_SOURCE.search(line) and "<" not in line:
            return line
        return None
    return None


def clean_answer(text: str, finish_reason: str) -> str | None:
    """The answer without citation marks; None if it was cut off, refuses, or says next to nothing."""
    answer = re.sub(r"\s*\[\d+(?:\s*,\s*\d+)*\]", "", text).strip()
    if finish_reason != "stop" or len(answer.split()) < 2 or _REFUSAL.search(answer):
        return None
    return answer


def synthesize(lm: Any, store: DocumentStore, collection: str, count: int, out: Path,
               groups: set[str] | None = None, seed_tasks: list[str] | None = None, per_chunk: int = 2,
               max_tokens: int = 160, seed: int = 0, progress: bool = True) -> SynthReport:
    """Write up to ``count`` grounded instruction/answer pairs from ``collection`` to ``out`` (JSONL, atomically).

    ``lm``: a loaded model with its tokenizer. ``groups``: what the caller may read (None: everything).
    ``per_chunk``: instructions tried per chunk at most, which with the chunks bounds ``count``.
    """
    from rouge_score import rouge_scorer

    chunks = usable_chunks(store, collection, groups, count, per_chunk)
    seeds = seed_tasks or SEED_TASKS
    rng = random.Random(seed)
    order = rng.sample(chunks, len(chunks))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    control = lm.tokenizer.control_tokens
    eos = lm.config.eos_token_ids
    report, kept, asked_of = SynthReport(out, count), [], {}
    started = time.perf_counter()

    def generate(chat: list[dict], params: SamplingParams) -> tuple[str, str]:
        prompt = lm.tokenizer.encode_chat(chat)
        text, tokens, finish = complete(lm.model, lm.tokenizer, prompt, params, eos)
        report.prompt_tokens += len(prompt)
        report.generated_tokens += len(tokens)
        return text, finish

    bar = tqdm(total=count, desc="synth", unit="example", disable=not progress)
    for hit in (h for _ in range(per_chunk) for h in order):
        if len(kept) == count:
            break
        report.attempts += 1
        examples = rng.sample(seeds, min(3, len(seeds))) + rng.sample(
            [k["messages"][0]["content"] for k in kept], min(2, len(kept)))
        before = asked_of.setdefault(hit.id, [])
        system = INSTRUCT_SYSTEM.format(examples="".join(f"- {e}\n" for e in examples))
        user = (f"<source>\n{neutralise(hit.text, control)}\n</source>\n\n" +
                ("Already asked about it, so ask something else:\n" + "".join(f"- {b}\n" for b in before)
                 if before else "") + "Write one question that the text above answers.")
        text, _ = generate([{"role": "system", "content": system}, {"role": "user", "content": user}],
                           SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.95, seed=rng.getrandbits(31)))
        instruction = clean_instruction(text)
        if instruction is None:
            report.dropped["malformed"] += 1
            continue
        before.append(instruction)
        pool = seeds + [k["messages"][0]["content"] for k in kept]  # a copied seed task is no new task either
        if any(scorer.score(known, instruction)["rougeL"].fmeasure >= SIMILAR for known in pool):
            report.dropped["too_similar"] += 1
            continue
        text, finish = generate(messages(instruction, [hit], control),
                                SamplingParams(max_new_tokens=max_tokens, temperature=0.0, repetition_penalty=1.1))
        answer = clean_answer(text, finish)
        if answer is None:
            report.dropped["malformed"] += 1
            continue
        if grounding(answer, hit.text) < MIN_GROUNDING:
            report.dropped["ungrounded"] += 1
            continue
        kept.append({"messages": [{"role": "user", "content": instruction},
                                  {"role": "assistant", "content": answer}],
                     "source": {"collection": collection, "document": hit.source, "title": hit.title,
                                "span": [hit.start, hit.end]},
                     "model": lm.name, "model_digest": lm.digest})
        bar.update(1)
    bar.close()
    report.kept, report.seconds = len(kept), round(time.perf_counter() - started, 1)
    if not kept:
        raise UsageError(f"none of {report.attempts} examples passed the filters (dropped {report.drops()}); "
                         f"nothing was written to {out}")
    atomic_write(out, lambda p: p.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept)))
    return report
