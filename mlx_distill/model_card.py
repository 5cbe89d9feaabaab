"""The export's ``README.md``: a Hub model card built from what the run left behind.

Inputs, all optional except the adapter config: the adapter folder's
``adapter_config.json`` (written by the trainer), and, when the adapter lives in
a run folder (``RUN/adapters``), ``teacher_data.jsonl`` (teacher, usage tokens),
``data/*.jsonl`` (dataset size), ``metrics.jsonl`` (final loss/accuracy),
``scores.json`` (the scorecard) and the verification report. Anything missing
or unreadable becomes a line saying so, never a crash.

Only whitelisted training settings are shown (no local paths), and the card is
scanned for secrets before it is written (see ``export.assert_no_secrets``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_distill.errors import DataError
from mlx_distill.files import iter_jsonl
from mlx_distill.rubric import DIMENSION_KEYS, LABELS, MODEL_LABELS, MODELS
from mlx_distill.runs import RunDir
from mlx_distill.terms import TERMS_NOTICE, is_claude_teacher

# adapter_config.json keys worth showing (paths and anything secret-looking are left out).
TRAINING_KEYS = (
    "fine_tune_type", "num_layers", "iters", "epochs", "batch_size", "learning_rate", "lr_schedule",
    "optimizer", "weight_decay", "warmup_steps", "max_seq_length", "grad_checkpoint",
    "grad_accumulation_steps", "mask_prompt", "seed",
    "loss", "kd_alpha", "kd_temperature",
)


def run_dir_of(adapter_path: Path) -> RunDir | None:
    """The run folder when the adapter is ``RUN/adapters`` of a real run, else None.

    A folder merely named ``adapters`` is not enough: the parent must also hold
    some other run file (prompts, teacher data, metrics, configs or run state).
    """
    p = Path(adapter_path).resolve()
    run = RunDir(p.parent)
    if run.adapters.resolve() != p:
        return None
    marks = (run.prompts, run.teacher_data, run.metrics, run.configs, run.state, run.data)
    return run if any(m.exists() for m in marks) else None


def _records(path: Path, notes: list[str], what: str) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [r for _, r in iter_jsonl(path, what=what)]
    except DataError as e:  # name the file, not its local path (the card may go to the Hub)
        notes.append(f"{path.name} skipped: unreadable at line {e.line}")
        return []


def teacher_facts(run: RunDir | None, notes: list[str]) -> dict[str, Any]:
    """Teacher model(s), answer count and usage token totals from teacher_data.jsonl."""
    if run is None:
        return {}
    rows = _records(run.teacher_data, notes, "teacher data")
    if not rows:
        return {}
    usage = {"input_tokens": 0, "output_tokens": 0}
    for r in rows:
        u = r.get("usage") if isinstance(r.get("usage"), dict) else {}
        for k in usage:
            v = u.get(k)
            usage[k] += int(v) if isinstance(v, (int, float)) else 0
    models = sorted({str(r["model"]) for r in rows if r.get("model")})
    return {"answers": len(rows), "models": models, **usage}


def dataset_facts(run: RunDir | None, adapter_cfg: dict[str, Any], notes: list[str],
                  count_tokens: Callable[[dict[str, Any]], int] | None) -> dict[str, Any]:
    """Examples (and tokens, when a counter is given) per split of the training data."""
    folder = run.data if run is not None else None
    if (folder is None or not folder.is_dir()) and isinstance(adapter_cfg.get("data"), str):
        folder = Path(adapter_cfg["data"])
    if folder is None or not folder.is_dir():
        return {}
    out: dict[str, Any] = {}
    for split in ("train", "valid", "test"):
        rows = _records(folder / f"{split}.jsonl", notes, f"{split} data")
        if rows:
            out[split] = {"examples": len(rows)}
            if count_tokens is not None:
                try:
                    out[split]["tokens"] = sum(count_tokens(r) for r in rows)
                except Exception as e:  # a row the chat template rejects: counts are optional
                    notes.append(f"token count of {split} data skipped ({type(e).__name__})")
    return out


def metric_facts(path: Path | None, notes: list[str]) -> dict[str, Any]:
    """First/final train loss and accuracy, final validation, best accuracy (from metrics.jsonl)."""
    if path is None:
        return {}
    rows = _records(path, notes, "metrics")
    train = [r for r in rows if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    val = [r for r in rows if r.get("type") == "val" and isinstance(r.get("loss"), (int, float))]
    out: dict[str, Any] = {}
    if train:
        out["steps"] = train[-1].get("step")
        out["first_train"] = {k: train[0].get(k) for k in ("step", "epoch", "loss", "acc")}
        out["final_train"] = {k: train[-1].get(k) for k in ("step", "epoch", "loss", "acc")}
        accs = [r for r in train if isinstance(r.get("acc"), (int, float))]
        if accs:
            best = max(accs, key=lambda r: r["acc"])
            out["best_train_acc"] = {k: best.get(k) for k in ("step", "epoch", "acc")}
    if val:
        out["final_val"] = {k: val[-1].get(k) for k in ("step", "epoch", "loss", "acc")}
    return out


def scorecard(run: RunDir | None, notes: list[str]) -> dict[str, dict[str, float]] | None:
    """{model: {dimension: average}} from scores.json, in any of the layouts it may take."""
    if run is None or not run.scores.is_file():
        return None
    try:
        data = json.loads(run.scores.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"scores.json skipped: unreadable ({type(e).__name__})")
        return None
    candidates = [data.get("averages"), (data.get("summary") or {}).get("averages"), data]
    for cand in candidates:
        if not isinstance(cand, dict):
            continue
        table = {}
        for m in MODELS:
            row = cand.get(m)
            if isinstance(row, dict):
                vals = {k: float(v) for k, v in row.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
                if vals:
                    table[m] = vals
        if table:
            return table
    notes.append("scores.json found, but without per-model averages; scorecard left out")
    return None


def base_license(base_dir: Path) -> str | None:
    """The base's license id: LICENSE.txt written by the GGUF import, else README front matter."""
    lic = base_dir / "LICENSE.txt"
    if lic.is_file():
        first = lic.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if first and len(first) == 1 and " " not in first[0]:
            return first[0]
    readme = base_dir / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            import yaml

            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                return None
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    return None


def find_teacher(run: RunDir | None, teacher_data: dict[str, Any]) -> str | None:
    """The teacher spec from the run's collect config, else the models in teacher_data.jsonl."""
    if run is not None and run.stage_config("collect").is_file():
        try:
            t = json.loads(run.stage_config("collect").read_text()).get("teacher")
            if isinstance(t, str) and t:
                return t
        except (OSError, ValueError):
            pass
    models = teacher_data.get("models") or []
    return ", ".join(models) if models else None


def method_text(adapter_cfg: dict[str, Any]) -> str:
    kind = adapter_cfg.get("fine_tune_type", "lora")
    layers = adapter_cfg.get("num_layers")
    where = "all layers" if layers in (None, -1) else f"the last {layers} layers"
    if kind == "full":
        return f"full fine-tune of {where}"
    lp = adapter_cfg.get("lora_parameters") or {}
    r, scale = lp.get("rank"), lp.get("scale")
    alpha = f", PEFT alpha {r * scale:g}" if isinstance(r, (int, float)) and isinstance(scale, (int, float)) else ""
    keys = f" ({', '.join(lp['keys'])})" if isinstance(lp.get("keys"), list) else ""
    return f"{'DoRA' if kind == 'dora' else 'LoRA'} rank {r}, scale {scale}{alpha}, on {where}{keys}"


def training_table(adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    lp = adapter_cfg.get("lora_parameters") or {}
    out = {k: adapter_cfg[k] for k in TRAINING_KEYS if k in adapter_cfg and not isinstance(adapter_cfg[k], (dict, list))}
    out.update({f"lora_{k}": lp[k] for k in ("rank", "scale", "dropout") if k in lp})
    return out


def gather(adapter_path: Path, adapter_cfg: dict[str, Any], *, teacher: str | None = None,
           count_tokens: Callable[[dict[str, Any]], int] | None = None, **known: Any) -> dict[str, Any]:
    """Everything the card shows; ``known`` carries what export already knows (name, base, dtype...)."""
    notes: list[str] = []
    run = run_dir_of(adapter_path)
    tdata = teacher_facts(run, notes)
    facts = dict(known)
    facts.update(
        teacher=teacher or find_teacher(run, tdata),
        teacher_data=tdata,
        dataset=dataset_facts(run, adapter_cfg, notes, count_tokens),
        # `mlx-distill train` alone writes metrics.jsonl beside the adapter; a run keeps it at RUN/.
        metrics=metric_facts(run.metrics if run else Path(adapter_path) / "metrics.jsonl", notes),
        result=adapter_cfg.get("result") if isinstance(adapter_cfg.get("result"), dict) else None,
        scores=scorecard(run, notes),
        training=training_table(adapter_cfg),
        method=method_text(adapter_cfg),
        fine_tune_type=adapter_cfg.get("fine_tune_type", "lora"),
        notes=notes,
    )
    return facts


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else f"{v:.4g}"
    return str(v)


def _front_matter(base_id: str | None, license_id: str, tags: list[str]) -> str:
    import yaml

    meta: dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
    meta.update(library_name="transformers", license=license_id, tags=tags, pipeline_tag="text-generation")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _verify_section(report: dict[str, Any] | None, dtype: str) -> list[str]:
    if not report:
        return ["Not verified (`--no-verify`). Run `mlx-distill verify` on this folder before relying on it.", ""]
    b = report.get("bounds", {})
    lines = [
        f"Checked by `mlx-distill verify` on {report.get('prompts', '?')} chat prompts, computed in fp32. "
        f"Bounds: max |Δlogit| ≤ {b.get('max_abs_logit_diff', 1e-3):g}, 100% argmax agreement, and an "
        f"identical {b.get('greedy_tokens', 32)}-token greedy continuation in transformers.",
        "",
        "| Check | max \\|Δlogit\\| | argmax agreement | result |",
        "| --- | ---: | ---: | --- |",
    ]
    rows = (("adapter_effect", "adapter effect (adapted vs base, for scale)"),
            ("mlx_fused_vs_adapter", "fused (fp32) vs adapter-applied, MLX"),
            ("cast", f"export ({dtype}) vs adapter-applied, MLX"),
            ("transformers_vs_mlx", "transformers vs MLX, same weights"),
            ("peft_vs_mlx_adapter", "PEFT adapter vs MLX adapter"))
    for key, label in rows:
        r = report.get(key)
        if not isinstance(r, dict):
            continue
        if "skipped" in r:
            lines.append(f"| {label} | – | – | {r['skipped']} |")
            continue
        result = "reference" if key == "adapter_effect" else ("pass" if r.get("passed") else "FAIL")
        lines.append(f"| {label} | {r['max_abs_logit_diff']:.2e} | {r['argmax_agreement']:.1%} | {result} |")
    if dtype != "float32":
        cast = (report.get("cast") or {}).get("bounds", "the adapter's effect must survive")
        lines += ["", f"The weights are stored as {dtype}. The fp32 bounds applied to the fused model "
                  f"before the cast; after it, against the adapter-applied model: {cast}. transformers "
                  "must match MLX on these same stored weights within the fp32 bounds."]
    for g in report.get("gguf") or []:
        lines += ["", f"GGUF `{g['file']}` read back: {g['tensors']} tensors, {g['tokens']} tokens, "
                  f"pre-tokenizer `{g['pre_tokenizer']}`; {g['checked']}."]
    return lines + [""]


def render(facts: dict[str, Any]) -> str:
    """The card's markdown from the facts gathered by ``export``."""
    f = facts
    base_id, teacher, dtype = f.get("base_id"), f.get("teacher"), f.get("dtype", "float32")
    repo = f.get("repo_id") or "path/to/this/folder"
    tags = ["mlx", "mlx-distill", "distillation", "text-generation"]
    tags += ["lora"] if f.get("fine_tune_type", "lora") in ("lora", "dora") else []
    tags += ["gguf"] if f.get("gguf_file") else []
    out = [_front_matter(base_id, f.get("license") or "other", tags)]
    out += [f"# {f.get('name', 'distilled-student')}", ""]
    out += [f"A small student model distilled from **{teacher or 'an unrecorded teacher'}** into "
            f"**{f.get('base_name')}** with mlx-distill (fine-tuned on MLX), then fused "
            f"and exported as a Hugging Face model ({dtype} safetensors).", ""]
    out += ["## Model", "", "| | |", "| --- | --- |", f"| Base model | {f.get('base_name')} |",
            f"| Teacher | {teacher or 'not recorded'} |", f"| Method | {f.get('method', '?')} |",
            f"| Stored dtype | {dtype} |", f"| License (of the base) | {f.get('license') or 'unknown: check the base model'} |", ""]
    if f.get("base_note"):
        out += [f["base_note"], ""]
    t, d = f.get("teacher_data") or {}, f.get("dataset") or {}
    out += ["## Data", ""]
    if t:
        out += [f"- Teacher answers: {t['answers']} from {', '.join(t['models']) or 'unrecorded models'}; "
                f"usage {t['input_tokens']:,} input + {t['output_tokens']:,} output tokens."]
    for split, v in d.items():
        tok = f", {v['tokens']:,} tokens (chat template applied)" if "tokens" in v else ""
        out += [f"- {split}: {v['examples']} examples{tok}."]
    if not t and not d:
        out += ["- Not recorded (the adapter was not exported from an mlx-distill run folder)."]
    out += ["", "## Training", "", "| Setting | Value |", "| --- | --- |"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in (f.get("training") or {}).items()]
    r = f.get("result") or {}
    if r:
        parts = [f"{r['steps']} steps" if "steps" in r else "",
                 f"{_fmt(r.get('epochs'))} epochs" if "epochs" in r else "",
                 f"{r['tokens']:,} tokens" if isinstance(r.get("tokens"), int) else ""]
        took = f" in {r['seconds'] / 60:.1f} min" if isinstance(r.get("seconds"), (int, float)) else ""
        out += ["", "Trained: " + ", ".join(p for p in parts if p) + took + "."]
    m = f.get("metrics") or {}
    if m:
        out += ["", "| Metric | First | Final |", "| --- | ---: | ---: |"]
        ft, lt = m.get("first_train") or {}, m.get("final_train") or {}
        out += [f"| train loss | {_fmt(ft.get('loss'))} | {_fmt(lt.get('loss'))} |",
                f"| train token accuracy | {_fmt(ft.get('acc'), True)} | {_fmt(lt.get('acc'), True)} |"]
        if m.get("final_val"):
            out += [f"| validation loss | – | {_fmt(m['final_val'].get('loss'))} |"]
        if m.get("best_train_acc"):
            b = m["best_train_acc"]
            out += ["", f"Best train token accuracy {_fmt(b.get('acc'), True)} at step {b.get('step')}"
                    + (f" (epoch {_fmt(b.get('epoch'))})" if b.get("epoch") is not None else "") + "."]
    else:
        out += ["", "Training metrics were not found (no run folder with metrics.jsonl)."]
    out += [""]
    s = f.get("scores")
    if s:
        out += ["## Scorecard", "", "Average scores (0-10) on the held-out prompts:", ""]
        dims = [k for k in DIMENSION_KEYS if any(k in row for row in s.values())]
        extra = sorted({k for row in s.values() for k in row} - set(dims) - {"n"})  # n: a count, not a score
        cols = dims + extra
        out += ["| Model | " + " | ".join(LABELS.get(c, c.capitalize()) for c in cols) + " |",
                "| --- |" + " ---: |" * len(cols)]
        for model, row in s.items():
            out += [f"| {MODEL_LABELS.get(model, model)} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |"]
        out += [""]
    out += ["## Verification", ""] + _verify_section(f.get("verify"), dtype)
    out += ["## Use it", "", "With transformers (PyTorch):", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "", f'tok = AutoTokenizer.from_pretrained("{repo}")',
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto")',
            'messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]',
            "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=False)",
            "out = model.generate(ids, max_new_tokens=256, do_sample=False)",
            "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```", "",
            "(`dtype=` is `torch_dtype=` in transformers 4.x.) With mlx-lm on Apple silicon:", "",
            "```python", "from mlx_lm import generate, load", "", f'model, tokenizer = load("{repo}")',
            'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Reverse a string in Python."}], add_generation_prompt=True)',
            "print(generate(model, tokenizer, prompt=prompt, max_tokens=256))", "```", ""]
    if f.get("peft"):
        p = f["peft"]
        out += [f"`peft/` holds the same adapter for PEFT (rank {p['r']}, lora_alpha {p['lora_alpha']}):", "",
                "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                (f'base = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="peft/base", dtype="auto")'
                 if p.get("base_in_folder") else
                 f'base = AutoModelForCausalLM.from_pretrained("{p["base_hint"]}", dtype="auto")'),
                (f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="peft")' if f.get("repo_id")
                 else f'model = PeftModel.from_pretrained(base, "{repo}/peft")'), "```", ""]
    if f.get("gguf_file"):
        out += [f"`{f['gguf_file']}` is an F16 GGUF for llama.cpp: `llama-cli -m {f['gguf_file']} -cnv`.", ""]
    out += ["## License and terms", "",
            f"The weights inherit the base model's license: {f.get('license') or 'unknown; check the base model'}."]
    if is_claude_teacher(teacher):
        out += ["", TERMS_NOTICE]
    for note in f.get("notes") or []:
        out += ["", f"_Note: {note}_"]
    return "\n".join(out).rstrip() + "\n"
