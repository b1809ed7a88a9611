"""Each preference loss equals TRL's own implementation on the same log-probabilities, to 1e-6.

TRL (1.x) writes its DPO and KTO losses inside its trainers' ``_compute_loss``, so that is what runs here: the
method itself, on an object holding the trainer settings it reads, with fourwalls' tiny model seen the way TRL calls
a causal LM with its fused head (per-token log-probabilities of the labels, from fourwalls' own head: both sides
then sum the same numbers). ORPO's loss is TRL's ``get_batch_loss_metrics``, which takes whole logits.
"""

import json
import types
from collections import defaultdict

import pytest
import torch
from torch import nn

from fourwalls.model.lora import LoRAConfig, adapters_off, attach_lora
from fourwalls.train.data import IGNORE, collate, load_preferences
from fourwalls.train.objectives import preference, reference_logps, with_paired
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer

trl = pytest.importorskip("trl")
accelerate = pytest.importorskip("accelerate")

PAIRS = [
    ("Where is the spare key?", "In the blue cabinet by the kitchen.", "Under the mat."),
    ("Who waters the plants?", "Priya, on Mondays.", "Nobody ever does, they are all plastic anyway."),
    ("What is the wifi called?", "fourwalls-guest", "I do not know."),
    ("When does the cafe open?", "At half past seven.", "Late."),
    ("Who fixes the printer?", "Tomasz does.", "The printer fixes itself."),
    ("What colour is the door?", "Teal.", "It is a sort of greenish blue, I think."),
]


class TRLView(nn.Module):
    """A fourwalls model as TRL's trainers call a causal LM with its fused head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=False, fused_lm_head=False, **_):
        logits = self.model(input_ids).float()
        if labels is None:
            return types.SimpleNamespace(logits=logits)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
        log_probs = self.model(input_ids, targets=targets, log_probs=True)[:, :-1]
        logp = logits[:, :-1].log_softmax(-1)
        return types.SimpleNamespace(log_probs=log_probs, entropy=-(logp.exp() * logp).sum(-1),
                                     mean_logits=logits[:, :-1].mean(-1),
                                     is_top1=logits[:, :-1].argmax(-1) == labels[:, 1:])


def _trainer(cls, **settings):
    """What a TRL trainer's loss method reads of ``self``: its settings, metric stores and accelerator."""
    ns = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerate.Accelerator(cpu=True),
                               aux_loss_enabled=False, precompute_ref_logps=True, _tp_size=1, _total_train_tokens=0,
                               _metrics=defaultdict(lambda: defaultdict(list)), **settings)
    for name in ("_compute_kl_logps", "odds_ratio_loss", "concatenated_forward"):
        if hasattr(cls, name):
            setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    return ns


@pytest.fixture
def setup(tmp_path):
    """A tiny model with a trained-looking LoRA adapter (the policy), its base's log-probabilities (the reference)
    and the pairs as fourwalls batches them."""
    tok = byte_tokenizer()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    kto_path = tmp_path / "kto.jsonl"
    kto_path.write_text("".join(json.dumps({"prompt": p, "completion": a, "label": good}) + "\n"
                                for p, c, r in PAIRS for a, good in ((c, True), (r, False)))
                        + json.dumps({"prompt": "Is it raining?", "completion": "Yes.", "label": True}) + "\n")
    model = tiny_model()
    attach_lora(model, LoRAConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model, load_preferences(path, tok), load_preferences(kto_path, tok)


def _with_reference(model, ds):
    """The batch of a whole dataset, with reference log-probabilities from the base (the adapter off)."""
    with adapters_off(model):
        refs = reference_logps(model, ds, 0)
    for e, (a, b) in zip(ds.examples, refs.tolist()):
        e.values.update(ref_logp=a, paired_ref_logp=b)
    return collate(ds.examples, 0)


@pytest.mark.parametrize("kind,loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_equal_trls_dpo_trainer(setup, kind, loss_type, beta):
    model, pairs, _ = setup
    batch = _with_reference(model, pairs)
    ours, metrics = preference(kind, beta)(model, batch)
    ids, labels = with_paired(batch)  # the chosen answers, then the rejected ones, at one width
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": (labels != IGNORE).long(),
              "ref_chosen_logps": batch["ref_logp"], "ref_rejected_logps": batch["paired_ref_logp"]}
    self = _trainer(trl.DPOTrainer, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
                    loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0)
    theirs = trl.DPOTrainer._compute_loss(self, TRLView(model), inputs, False)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    assert ours.item() > 0.01  # a loss with something left to learn: the comparison means something
    logged = {k: v[-1] for k, v in self._metrics["train"].items()}
    for mine, trls in [("reward_accuracy", "rewards/accuracies"), ("reward_chosen", "rewards/chosen"),
                       ("reward_rejected", "rewards/rejected"), ("reward_margin", "rewards/margins")]:
        assert metrics[mine] == pytest.approx(logged[trls], abs=1e-6)
    assert 0 < metrics["reward_accuracy"] < 1


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
@pytest.mark.parametrize("kl_shift", [0.0, 30.0])
def test_kto_equals_trls_kto_trainer(setup, weights, kl_shift):
    model, _, labelled = setup
    batch = _with_reference(model, labelled)
    batch["paired_ref_logp"] += kl_shift  # the KL estimate both ways: positive, and clamped to 0
    ours, metrics = preference("kto", 0.1, *weights)(model, batch)

    def rows(prefix):  # "": the answers; "paired_": the mismatched answers (the KL term's)
        ids = batch[f"{prefix}input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "completion_mask": (batch[f"{prefix}labels"] != IGNORE).long()}

    main, kl = rows(""), rows("paired_")
    inputs = {**main, **{f"KL_{k}": v for k, v in kl.items()}, "label": batch["desirable"].bool(),
              "ref_logps": batch["ref_logp"], "ref_KL_logps": batch["paired_ref_logp"]}
    self = _trainer(trl.KTOTrainer, calculate_KL=True, loss_type="kto", beta=0.1, desirable_weight=weights[0],
                    undesirable_weight=weights[1])
    theirs = trl.KTOTrainer._compute_loss(self, TRLView(model), inputs, False)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    logged = {k: v[-1] for k, v in self._metrics["train"].items()}
    assert metrics["kl"] == pytest.approx(logged["kl"], abs=1e-6) and (metrics["kl"] > 0) == (kl_shift == 0)
    for mine, trls in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                       ("reward_margin", "rewards/margins")]:
        assert metrics[mine] == pytest.approx(logged[trls], abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trls_orpo_trainer(setup, beta):
    from trl.experimental.orpo import ORPOTrainer

    model, pairs, _ = setup
    batch = collate(pairs.examples, 0)
    ours, metrics = preference("orpo", beta)(model, batch)
    # TRL takes ORPO's NLL over the prompt and the answer (its attention mask); the paper, and fourwalls, over the
    # answer. So TRL gets the answer as the attention mask: the model ignores it (causal, right-padded), and the rest
    # of the computation is TRL's.
    inputs = {}
    for side, prefix in (("chosen", ""), ("rejected", "paired_")):
        labels = batch[f"{prefix}labels"]
        inputs |= {f"{side}_input_ids": batch[f"{prefix}input_ids"], f"{side}_labels": labels,
                   f"{side}_attention_mask": (labels != IGNORE).long()}
    self = _trainer(ORPOTrainer, beta=beta, is_encoder_decoder=False, padding_value=0,
                    concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps)
    theirs, logged = ORPOTrainer.get_batch_loss_metrics(self, TRLView(model), inputs)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    assert metrics["nll"] == pytest.approx(logged["nll_loss"], abs=1e-6)
    assert metrics["log_odds_ratio"] == pytest.approx(logged["log_odds_ratio"], abs=1e-6)
    for mine, trls in [("reward_accuracy", "rewards/accuracies"), ("reward_chosen", "rewards/chosen"),
                       ("reward_rejected", "rewards/rejected"), ("reward_margin", "rewards/margins")]:
        assert metrics[mine] == pytest.approx(logged[trls], abs=1e-6)
