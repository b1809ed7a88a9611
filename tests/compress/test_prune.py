"""Pruning: exact per-row sparsity, N:M patterns, Wanda's activation-weighted scores, and refusals that write
nothing; on the bundled model, Wanda keeps far more of the language model than magnitude pruning at 50%."""

import math
from pathlib import Path

import pytest
import torch

from fourwalls.cli import main
from fourwalls.compress.calibrate import calibration_ids
from fourwalls.compress.prune import prune, prune_mask
from fourwalls.errors import NotFoundError, UsageError
from fourwalls.eval.perplexity import perplexity
from fourwalls.model.lora import LoRAConfig, attach_lora, save_adapter
from fourwalls.store import DEFAULT_MODEL, Store
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures"
CALIBRATION = FIXTURES / "calibration.txt"
ENGLISH = (FIXTURES / "english.txt").read_text()
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def tiny():
    """A private store holding a tiny random model under the name 'tiny'; returns (store, its weights)."""
    store = Store()
    model = tiny_model()
    store.add("tiny", model.config, model.state_dict(), byte_tokenizer())
    return store, {k: v.clone() for k, v in model.state_dict().items()}


def _pruned_weights(state):
    return {k: v for k, v in state.items() if k.startswith("layers.") and k.split(".")[-2] in LINEAR}


def _on_disk(store):
    files = sorted(p.name for d in ("models", "adapters", "tmp") for p in (store.root / d).iterdir())
    return store.names(), files


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_zeroes_exactly_the_same_share_of_every_row(tiny, method):
    store, before = tiny
    ref, report = prune("tiny", method, 0.3, "tiny-p", calibration=CALIBRATION if method == "wanda" else None,
                        samples=8, store=store)
    after = store.load("tiny-p").model.state_dict()
    pruned = _pruned_weights(after)
    assert len(pruned) == 2 * 7 == report["layers"]
    for key, w in pruned.items():
        expected = round(0.3 * w.shape[1])  # 19 of 64 inputs, 48 of 160
        assert ((w == 0).sum(1) == expected).all(), key
        kept = w != 0
        torch.testing.assert_close(w[kept], before[key][kept], rtol=0, atol=0)  # survivors keep their values
        if method == "magnitude":  # in each row, every weight kept is at least as large as every weight dropped
            mags = before[key].abs()
            assert (mags.masked_fill(~kept, math.inf).amin(1) >= mags.masked_fill(kept, -1).amax(1)).all(), key
    for key in after.keys() - pruned.keys():  # embeddings, norms, lm_head untouched
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    total = sum(w.numel() for w in pruned.values())
    achieved = sum(round(0.3 * w.shape[1]) * w.shape[0] for w in pruned.values()) / total
    assert report["sparsity_pruned_layers"] == pytest.approx(achieved)
    assert 0 < report["sparsity_all"] < report["sparsity_pruned_layers"]
    assert report["dense_storage"] is True
    lineage = ref.manifest["lineage"]
    assert lineage["method"] == "prune" and lineage["parent"] == "tiny"
    assert lineage["parent_digest"] == store.resolve("tiny").digest
    assert lineage["settings"]["method"] == method and lineage["settings"]["sparsity"] == 0.3
    assert lineage["sparsity_achieved"] == pytest.approx(achieved)
    assert (lineage["calibration_digest"].startswith("sha256-") if method == "wanda"
            else lineage["calibration"] is None)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_n_m_pattern_holds_in_every_group(tiny, method, pattern):
    store, _ = tiny
    keep, group = map(int, pattern.split(":"))
    _, report = prune("tiny", method, None, "tiny-nm", pattern=pattern,
                      calibration=CALIBRATION if method == "wanda" else None, samples=4, store=store)
    for key, w in _pruned_weights(store.load("tiny-nm").model.state_dict()).items():
        nonzero = (w.reshape(w.shape[0], -1, group) != 0).sum(-1)
        assert (nonzero == keep).all(), key
    assert report["sparsity_pruned_layers"] == pytest.approx(1 - keep / group)
    assert store.resolve("tiny-nm").manifest["lineage"]["settings"]["pattern"] == pattern


def test_wanda_weighs_weights_by_their_inputs_norm(tiny):
    """In the first block, q_proj's input is the normed embeddings of the calibration text: recompute the score."""
    store, _ = tiny
    lm = store.load("tiny")
    ids = calibration_ids(CALIBRATION, lm.tokenizer, 8, 256)
    with torch.no_grad():
        block = lm.model.layers[0]
        x = block.input_layernorm(lm.model.embed_tokens(ids)).reshape(-1, lm.config.dim)
        w = block.self_attn.q_proj.weight
        expected = prune_mask(w.abs() * x.norm(dim=0), 0.5)
        by_magnitude = prune_mask(w.abs(), 0.5)
    prune("tiny", "wanda", 0.5, "tiny-w", calibration=CALIBRATION, samples=8, store=store)
    got = store.load("tiny-w").model.layers[0].self_attn.q_proj.weight == 0
    assert torch.equal(got, expected)
    assert not torch.equal(got, by_magnitude)  # the activations changed the choice


def test_bad_inputs_are_refused_and_write_nothing(tiny, tmp_path):
    store, _ = tiny
    base = store.load("tiny")
    attach_lora(base.model, LoRAConfig(r=2))
    store.add_adapter("tiny-lora", store.resolve("tiny"), lambda d: save_adapter(d, base.model, LoRAConfig(r=2)))
    store.add("tiny-q", base.config, tiny_model(seed=1).state_dict(), base.tokenizer,
              lineage={"method": "quantize", "parent": "tiny"})
    short = tmp_path / "short.txt"
    short.write_text("Too short to say anything about a layer.")
    before = _on_disk(store)
    cases = [
        dict(sparsity=0.0), dict(sparsity=1.0), dict(sparsity=1.5), dict(sparsity=-0.2), dict(sparsity=math.nan),
        dict(sparsity=None),
        dict(method="random"),
        dict(sparsity=None, pattern="2-4"), dict(sparsity=None, pattern="4:2"), dict(sparsity=None, pattern="0:4"),
        dict(sparsity=None, pattern="a:b"), dict(sparsity=None, pattern="4:4"),
        dict(sparsity=0.7, pattern="2:4"),  # 2:4 fixes the sparsity at 0.5
        dict(sparsity=None, pattern="1:3"),  # 64 inputs do not split into groups of 3
        dict(method="wanda"),  # no calibration
        dict(method="wanda", calibration=tmp_path / "missing.txt"),
        dict(method="wanda", calibration=short),
        dict(method="wanda", calibration=CALIBRATION, samples=0),
        dict(calibration=CALIBRATION),  # magnitude reads none
        dict(model="tiny-lora"), dict(model="tiny-q"),
        dict(name="tiny"), dict(name="bad name!"),
    ]
    for case in cases:
        kw = {"model_name": "tiny", "method": "magnitude", "sparsity": 0.5, "name": "tiny-new", "store": store}
        kw.update({("model_name" if k == "model" else k): v for k, v in case.items()})
        with pytest.raises(UsageError):
            prune(**kw)
            pytest.fail(f"accepted {case}")
    with pytest.raises(NotFoundError, match="not found"):
        prune("no-such-model", "magnitude", 0.5, "tiny-new", store=store)
    assert _on_disk(store) == before


def test_cli_prunes_and_says_the_file_is_not_smaller(tiny, capsys):
    assert main(["prune", "tiny", "--method", "wanda", "--pattern", "2:4", "--calibration", str(CALIBRATION),
                 "--samples", "4", "--name", "tiny-cli"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("stored tiny-cli (sha256-") and "50.00% of the weights of 14 linear layers" in out[0]
    assert "as large as the unpruned model in fp32" in out[1] and "no sparse kernels" in out[1]
    assert Store().resolve("tiny-cli").manifest["lineage"]["settings"]["samples"] == 4
    assert main(["prune", "tiny", "--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.6",
                 "--name", "tiny-cli2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sparsity of 0.5" in err
    assert "tiny-cli2" not in Store().names()


@pytest.mark.slow
def test_wanda_beats_magnitude_on_the_bundled_model(session_store, smol):
    """50% unstructured on SmolLM2-135M: magnitude wrecks it, Wanda keeps a usable model (perplexity on English)."""
    ids = smol.tokenizer.encode(ENGLISH)
    dense = perplexity(smol.model, ids).perplexity
    ppl = {}
    for method in ("magnitude", "wanda"):
        ref, report = prune(DEFAULT_MODEL, method, 0.5, f"smol-{method}-50", store=session_store,
                            calibration=CALIBRATION if method == "wanda" else None)
        assert report["sparsity_pruned_layers"] == 0.5 and ref.manifest["lineage"]["parent_digest"] == smol.digest
        ppl[method] = perplexity(session_store.load(ref.name).model, ids).perplexity
    print(f"perplexity on english.txt: dense {dense:.2f}, magnitude {ppl['magnitude']:.2f}, wanda {ppl['wanda']:.2f}")
    assert dense < ppl["wanda"] < ppl["magnitude"] / 2
