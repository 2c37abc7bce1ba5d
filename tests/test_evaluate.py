"""The evaluation on the tiny model, checked against loss and accuracy computed by hand.

"By hand" is the plainest possible computation: one forward pass per sequence, a Python loop
over its answer tokens summing ``-log softmax(logits[t-1])[token t]``, and for each option the
same sum, the smallest winning. The evaluator batches, pads, deduplicates and shares one model
between base and adapter; the numbers must agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from runner.spec.model import DatasetSpec
from runner.train.backend import ModelSession, Precision
from runner.train.dataset import Row
from runner.train.eval_stats import GateRule
from runner.train.evaluate import build_items, evaluate
from runner.train.formatting import resolve_chat_template

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

QUESTIONS = [
    ("hot", "cold", ["warm", "cold"]),
    ("big", "small", ["small", "tall"]),
    ("up", "down", ["down", "left"]),
    ("day", "night", ["noon", "night"]),
]


def rows() -> list[Row]:
    out = []
    for i, (q, a, options) in enumerate(QUESTIONS, start=1):
        messages = [
            {"role": "user", "content": f"opposite of {q}?"},
            {"role": "assistant", "content": a},
        ]
        out.append(Row(f"test: row {i}", {"messages": messages, "choices": options}))
    return out


@pytest.fixture(scope="module")
def session(tiny_model_dir: Path, tiny_tokenizer: Any) -> ModelSession:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.eval()
    return ModelSession(model, tiny_tokenizer, Precision("16bit", "float32"), tiny_model_dir)


def hand_nll(model: Any, ids: list[int], mask: list[int]) -> tuple[float, int]:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if mask[t]:
            row = logits[t - 1]
            total -= float(row[ids[t]] - torch.logsumexp(row, dim=0))
            n += 1
    return total, n


def test_loss_and_choice_accuracy_match_hand_computation(
    session: ModelSession, tiny_tokenizer: Any
) -> None:
    spec = DatasetSpec(sources=["x.jsonl"], format="messages")
    template = resolve_chat_template(spec, tiny_tokenizer)
    items = build_items(rows(), spec, tiny_tokenizer, template, 64, scoring="choices")
    assert [it.gold for it in items] == [1, 0, 0, 1]
    report = evaluate(session, items, scoring="choices", rule=GateRule(), split="t", batch_size=3)

    with session.model.disable_adapter():
        total = count = correct = 0
        for it in items:
            nll, n = hand_nll(
                session.model, list(it.example.input_ids), list(it.example.completion_mask)
            )
            total, count = total + nll, count + n
            options = [
                hand_nll(session.model, list(c.input_ids), list(c.completion_mask))[0]
                for c in it.candidates
            ]
            correct += int(min(range(len(options)), key=options.__getitem__) == it.gold)
    assert report.base.tokens == count > 0
    assert report.base.loss == pytest.approx(total / count, rel=1e-5)
    assert report.base.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert report.base.correct == correct and report.base.scored_rows == 4
    # LoRA starts with B = 0: the adapter is the base, so the default gate must fail.
    assert report.adapter.loss == pytest.approx(report.base.loss, rel=1e-6)
    assert not report.gate_passed


def test_an_adapter_that_changes_the_model_is_measured_as_such(
    session: ModelSession, tiny_tokenizer: Any
) -> None:
    import torch

    spec = DatasetSpec(sources=["x.jsonl"], format="messages")
    template = resolve_chat_template(spec, tiny_tokenizer)
    items = build_items(rows(), spec, tiny_tokenizer, template, 64, scoring="exact-match")
    with torch.no_grad():
        for name, p in session.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    report = evaluate(session, items, scoring="exact-match", rule=GateRule(), split="t")
    ids = list(items[0].example.input_ids)
    nll, n = hand_nll(session.model, ids, list(items[0].example.completion_mask))
    assert report.adapter.loss != pytest.approx(report.base.loss)
    assert report.adapter.tokens == report.base.tokens
    assert report.adapter.accuracy is not None and report.adapter.scored_rows == 4
    assert n > 0 and math.isfinite(nll)


def test_scoring_runs_the_longest_batch_first() -> None:
    """Each later batch's logits are no larger than the first's, so the allocator reuses its
    blocks (shortest first grew reserved memory by every batch, bench/speed/run7-data)."""
    import torch

    from runner.train.backend import TokenizedExample
    from runner.train.evaluate import score_examples

    widths: list[int] = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            widths.append(int(input_ids.shape[1]))
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 16)})()

    lengths = [3, 9, 5, 12, 7, 4]
    examples = [TokenizedExample(list(range(n)), [1] * n) for n in lengths]
    scores = score_examples(Recorder(), examples, pad_id=0, batch_size=2)
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths)
    assert len(scores) == len(examples)
