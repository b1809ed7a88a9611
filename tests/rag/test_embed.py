"""The embedder's int8 mode: per-token activation ranges on fbgemm's kernels, C and torch paths alike."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from fourwalls.model.native import native
from fourwalls.rag.embed import PerTokenInt8Linear, embedder

from .test_rag import LABELLED


def _layer(k: int = 384, n: int = 256) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n)


def _inputs(k: int = 384) -> torch.Tensor:
    x = torch.randn(2, 40, k)
    x[0, 3] *= 60  # one token with outliers, as LayerNorm outputs have
    x[1, 7, 11] = 90.0
    return x


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((y - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()


@pytest.mark.parametrize("gelu", [False, True])
@torch.no_grad()
def test_int8_linear_quantizes_each_token_over_its_own_range(gelu):
    lin, x = _layer(), _inputs()
    ref = lin(x)
    ref = nn.functional.gelu(ref) if gelu else ref
    err = _rel_err(PerTokenInt8Linear(lin, gelu=gelu)(x), ref)
    assert err.median() < 0.02 and err.max() < 0.06, (err.median(), err.max())  # 7-bit steps of each own range
    # torch's dynamic quantization, one range for the whole tensor: the outlier tokens coarsen everyone's steps
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = quantize_dynamic(nn.Sequential(lin), {nn.Linear: per_channel_dynamic_qconfig})
    plain = dyn(x)
    assert _rel_err(nn.functional.gelu(plain) if gelu else plain, ref).median() > 10 * err.median()


@pytest.mark.skipif(native() is None, reason="fourwalls' C kernels cannot be built here")
@pytest.mark.parametrize("gelu", [False, True])
@torch.no_grad()
def test_int8_linear_c_and_torch_paths_agree(monkeypatch, gelu):
    lin, x = _layer(k=200, n=60), _inputs(k=200)  # widths that are not multiples of 8: the scalar tails too
    layer = PerTokenInt8Linear(lin, gelu=gelu)
    fast = layer(x)
    monkeypatch.setattr("fourwalls.rag.embed.native", lambda: None)
    torch.testing.assert_close(fast, layer(x), atol=2e-4, rtol=1e-4)


def test_int8_embedder_stays_close_to_float32():
    texts = [json.loads(line)["text"] for line in (LABELLED / "corpus.jsonl").read_text().splitlines()]
    exact, quick = embedder(quantize=False).embed(texts), embedder().embed(texts)
    assert embedder().quantized and not embedder(quantize=False).quantized  # int8 is the default
    cosine = (exact * quick).sum(1)
    assert cosine.min() > 0.99, cosine.min()
    # each text's nearest neighbour among the others stays the same
    eye = 2 * torch.eye(len(texts)).numpy()
    assert ((exact @ exact.T - eye).argmax(1) == (quick @ quick.T - eye).argmax(1)).mean() > 0.95


def test_float32_embedder_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from fourwalls.rag.embed import default_folder

    texts = [json.loads(line)["text"] for line in (LABELLED / "corpus.jsonl").read_text().splitlines()][:24]
    texts += ["short", "a query with a few more words in it"]
    ref = SentenceTransformer(str(default_folder()), device="cpu").encode(texts, batch_size=8)
    ours = embedder(quantize=False).embed(texts)
    assert abs(ours - ref).max() < 1e-5


def test_int8_embedder_keeps_the_labelled_sets_ndcg(tmp_path):
    """The issue's bar for a faster embedder: retrieval quality within 0.5 nDCG@10 points of float32's."""
    from fourwalls.eval.retrieval import evaluate_retriever
    from fourwalls.rag.beir import read_qrels, read_queries
    from fourwalls.rag.ingest import beir_items, ingest
    from fourwalls.rag.retrieve import Retriever
    from fourwalls.rag.stores.sqlite import SqliteStore

    queries, qrels = read_queries(LABELLED / "queries.jsonl"), read_qrels(LABELLED / "qrels.tsv")
    ndcg = {}
    for quantize in (False, True):
        store = SqliteStore(tmp_path / f"{quantize}.db")
        emb = embedder(quantize=quantize)
        ingest(store, emb, beir_items(LABELLED / "corpus.jsonl"), "nw", progress=False)
        for mode in ("hybrid", "vector"):
            ndcg[mode, quantize] = evaluate_retriever(Retriever(store, emb), "nw", queries, qrels, mode)["ndcg@10"]
        store.close()
    for mode in ("hybrid", "vector"):
        assert ndcg[mode, True] > ndcg[mode, False] - 0.005, ndcg
