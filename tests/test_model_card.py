"""The export's model card: what it states, and how it degrades when the run left little behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlx_distill import model_card
from mlx_distill.runs import RunDir
from mlx_distill.terms import TERMS_NOTICE

ADAPTER_CFG = {
    "model": "/Users/someone/private/models/smollm2",  # a local path: must not reach the card
    "fine_tune_type": "lora",
    "num_layers": 16,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.05},
    "iters": 130,
    "batch_size": 4,
    "learning_rate": 1e-4,
    "api_key": "sk-ant-should-never-appear",
    "result": {"steps": 130, "epochs": 5.0, "tokens": 412345, "seconds": 660.0},
}
VERIFY = {
    "prompts": 3,
    "bounds": {"max_abs_logit_diff": 1e-3, "argmax_agreement": 1.0, "greedy_tokens": 32},
    "adapter_effect": {"max_abs_logit_diff": 3.1, "argmax_agreement": 0.7},
    "mlx_fused_vs_adapter": {"max_abs_logit_diff": 8.3e-5, "argmax_agreement": 1.0, "passed": True},
    "transformers_vs_mlx": {"max_abs_logit_diff": 1.2e-4, "argmax_agreement": 1.0, "passed": True},
}


def make_run(root: Path, teacher: str = "anthropic:claude-sonnet-4-6") -> RunDir:
    run = RunDir(root)
    run.adapters.mkdir(parents=True)
    (run.adapters / "adapter_config.json").write_text(json.dumps(ADAPTER_CFG))
    rows = [{"id": f"p{i}", "prompt": "q", "response": "a", "model": "claude-sonnet-4-6",
             "usage": {"input_tokens": 100 + i, "output_tokens": 400, "cache_read_input_tokens": 0}}
            for i in range(3)]
    run.teacher_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.data.mkdir()
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (run.data / "train.jsonl").write_text((json.dumps(chat) + "\n") * 5)
    (run.data / "valid.jsonl").write_text(json.dumps(chat) + "\n")
    metrics = [
        {"type": "train", "step": 10, "epoch": 0.4, "loss": 0.9, "acc": 0.781},
        {"type": "train", "step": 20, "epoch": 0.8, "loss": 0.85, "acc": 0.822},
        {"type": "val", "step": 20, "epoch": 0.8, "loss": 0.88, "acc": 0.79},
        {"type": "train", "step": 30, "epoch": 1.2, "loss": 0.809, "acc": 0.796},
    ]
    run.metrics.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    # compare.py's schema 1: averages per model, with "average" and a count "n"; null = unmeasured
    run.scores.write_text(json.dumps({"schema": 1, "averages": {
        "teacher": {"correctness": 9.5, "structure": 9.0, "error_handling": None, "average": 9.1, "n": 4},
        "base": {"correctness": 6.0, "structure": 5.5, "error_handling": 4.0, "average": 5.6, "n": 4},
        "distilled": {"correctness": 7.5, "structure": 7.0, "error_handling": 5.0, "average": 7.2, "n": 4}}}))
    run.configs.mkdir()
    run.stage_config("collect").write_text(json.dumps({"teacher": teacher}))
    return run


def card(run_or_adapter: Path, **known) -> str:
    adapter = run_or_adapter
    facts = model_card.gather(adapter, ADAPTER_CFG, count_tokens=lambda row: 7, name="my-student",
                              base_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                              base_name="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32",
                              license="apache-2.0", verify=VERIFY, **known)
    return model_card.render(facts)


def test_full_run_card(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    text = card(run.adapters, repo_id="me/my-student")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and "lora" in meta["tags"]
    assert "anthropic:claude-sonnet-4-6" in text  # the teacher, from the run's collect config
    assert "Teacher answers: 3" in text and "303 input + 1,200 output tokens" in text
    assert "train: 5 examples, 35 tokens" in text and "valid: 1 examples" in text
    assert "| train loss | 0.9 | 0.809 |" in text and "79.6%" in text
    assert "Best train token accuracy 82.2% at step 20 (epoch 0.8)" in text
    assert "| validation loss | – | 0.88 |" in text
    assert "| Model | Code Correctness | Structure & Design | Error Handling | Average |" in text
    assert "| Teacher | 9.5 | 9 | – | 9.1 |" in text and "| Distilled Student | 7.5 | 7 | 5 | 7.2 |" in text
    assert "LoRA rank 8, scale 20.0, PEFT alpha 160, on the last 16 layers" in text
    assert "8.30e-05" in text and "| pass |" in text
    assert "Trained: 130 steps, 5 epochs, 412,345 tokens in 11.0 min." in text
    assert 'AutoModelForCausalLM.from_pretrained("me/my-student"' in text
    assert 'load("me/my-student")' in text
    assert TERMS_NOTICE in text
    assert "sk-ant" not in text and "/Users/someone" not in text


def test_card_degrades_without_a_run(tmp_path: Path) -> None:
    adapter = tmp_path / "adapters"  # no run files beside it: not a run folder
    adapter.mkdir()
    text = card(adapter, teacher="local:Qwen2.5-7B")
    assert "Not recorded" in text and "Training metrics were not found" in text
    assert "## Scorecard" not in text
    assert "local:Qwen2.5-7B" in text
    assert TERMS_NOTICE not in text  # not a Claude teacher
    assert "path/to/this/folder" in text


def test_card_survives_broken_run_files(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    run.metrics.write_text('{"type": "train", "step": 1, "loss": 1.0}\n{broken\n')
    run.scores.write_text("not json")
    text = card(run.adapters)
    assert "metrics.jsonl skipped: unreadable at line 2" in text
    assert "scores.json skipped" in text and "## Scorecard" not in text
    assert str(tmp_path) not in text  # notes name files, never local paths


@pytest.mark.parametrize("layout", [
    lambda t: {"averages": t},
    lambda t: {"summary": {"averages": t}},
    lambda t: t,
])
def test_scorecard_layouts(layout, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    table = {"teacher": {"correctness": 9.0}, "base": {"correctness": 5.0}, "distilled": {"correctness": 7.0}}
    run.scores.write_text(json.dumps(layout(table)))
    assert model_card.scorecard(run, []) == table


def test_half_precision_card_states_which_bounds_apply(tmp_path: Path) -> None:
    facts = model_card.gather(tmp_path, ADAPTER_CFG, name="s", base_id=None, base_name="local-base",
                              dtype="bfloat16", license=None, verify={**VERIFY, "cast": {
                                  "max_abs_logit_diff": 0.03, "argmax_agreement": 0.99, "passed": True}})
    text = model_card.render(facts)
    assert "stored as bfloat16" in text and "before the cast" in text
    assert "base_model" not in text.split("---")[1]  # no hub id: no invalid Hub metadata
    assert "license: other" in text


def test_metrics_beside_a_standalone_adapter(tmp_path: Path) -> None:
    """`mlx-distill train` without a run folder writes metrics.jsonl into the adapter folder."""
    adapter = tmp_path / "adapters"
    adapter.mkdir()
    (adapter / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 5, "loss": 1.25, "acc": 0.5}) + "\n")
    text = card(adapter)
    assert "| train loss | 1.25 | 1.25 |" in text
