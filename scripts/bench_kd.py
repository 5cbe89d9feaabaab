#!/usr/bin/env python
"""Token-level KD vs SFT on the demo set: same data, steps and seeds; held-out effect.

The offline demo distils the embedded SmolLM2-135M *under its style prompt*
(the ``demo`` teacher) into the same model *without* it (context
distillation). Both methods train on the same teacher answers (collected once
with ``mlx-distill collect --teacher demo`` into ``--work``, reused on reruns):

* ``sft``: cross-entropy on the teacher's text (``--loss sft``);
* ``kd``: ``(1 - ratio) * CE + ratio * KL(teacher || student)`` with the demo
  teacher's top-K log-probs (``--loss kd --kd-top-k K``; the cache is built once
  and shared by every seed).

Each (method, seed) trains a LoRA adapter from scratch with the same steps,
batch and learning rate, then answers the held-out prompts of
``prompts/heldout.jsonl`` greedily. On those prompts it reports:

* ``kl_teacher_answers``: KL(teacher || student) per token, full vocabulary,
  teacher-forced on the teacher's own held-out answers (what KD minimises),
  and ``nll_teacher_answers``: the student's NLL of those answers (what SFT minimises);
* ``kl_student_answers`` and ``teacher_ll``: the same KL, and the teacher's
  mean log-likelihood per token, along the student's own greedy answers
  (teacher in its context, student in the plain one; answers scored as the chat
  template renders them);
* the comparison stage's style metrics (``mlx_distill.evaluate``): the share of
  answers that start with the style prompt's "## Overview", style sections,
  markdown headers, docstring and type-hint coverage, and the 0-10 proxy
  scorecard averaged over its dimensions;
* the execution pass rate of the prompts' tests (sandboxed).

The mean and the sample standard deviation over seeds go to the ``kd``
section of docs/benchmarks.md; the last line is one JSON object.

Usage: scripts/bench_kd.py [--seeds 0 1 2] [--steps 8] [--prompts 24] [--top-k 32] [--no-write]
       scripts/bench_kd.py --render RUN.json   (rebuild the docs section from a saved last line)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from _benchlib import emit, write_section  # noqa: E402

SECTIONS = ("## Overview", "## Implementation", "## Usage", "## Notes")
METRICS = ("kl_teacher_answers", "nll_teacher_answers", "kl_student_answers", "teacher_ll", "overview_first",
           "style_sections", "headers", "docstring_coverage", "type_hint_coverage", "proxy_score", "cut_off",
           "pass_rate", "train_ce", "train_s")


def collect_and_prepare(args: argparse.Namespace, work: Path) -> Path:
    """Teacher data for the first N prompts (resumable), then DATA/train.jsonl without held-out prompts.

    The demo teacher rambles: 22 of 24 answers ran into a 256-token limit, and
    most of them inside a code block, which ``prepare`` drops (and
    ``--keep-truncated`` too: an unclosed fence is cut away whole). Here the
    cut answers are kept as they are and ``--max-seq-length`` cuts every
    training row before the chat template's end-of-turn, so no run learns to
    stop where the teacher did not. Both methods see the same rows.
    """
    from mlx_distill.collect import CollectConfig, collect, read_records
    from mlx_distill.prompts import load_prompts

    prompts = [line for f in ("base.jsonl", "expanded.jsonl") for line in (ROOT / "prompts" / f).read_text().splitlines()
               if line.strip()][: args.prompts]
    pfile = work / "prompts.jsonl"
    pfile.write_text("\n".join(prompts) + "\n")
    teacher_data = work / f"teacher_data-{args.max_tokens}.jsonl"
    t0 = time.perf_counter()
    summary = collect(CollectConfig(prompts=str(pfile), out=str(teacher_data), teacher="demo",
                                    max_tokens=args.max_tokens, batch_size=8), echo=lambda _: None)
    print(f"teacher data: {summary.file_records} answers in {teacher_data} ({summary.done} new, "
          f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    held = {p.id for p in load_prompts(ROOT / "prompts" / "heldout.jsonl")}
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
             "id": r["id"]} for r in read_records(teacher_data) if r["id"] not in held and r["response"].strip()]
    data = work / f"data-{args.max_tokens}"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def generate(model: Any, tok: Any, prompts: list[Any], system: str | None, max_tokens: int) -> list[Any]:
    from mlx_distill.generate import generate_batch

    return generate_batch(model, tok, [p.prompt for p in prompts], system=system, max_tokens=max_tokens,
                          temperature=0.0, batch_size=len(prompts))


def score(student: Any, teacher: Any, tok: Any, system: str, prompts: list[Any], answers: list[str],
          finished: list[bool]) -> dict:
    """Per token along ``answers``: KL(teacher || student), the teacher's log-likelihood, the student's NLL.

    Only the tokens the model generated are scored: the answer's ids, plus the
    end-of-turn when it stopped by itself. (The chat template would also add
    an end-of-turn to an answer cut at the token limit: two tokens at ~-15
    nats each, which would swamp a 16-token answer's mean.)
    """
    import mlx.core as mx
    import numpy as np

    from mlx_distill.generate import chat_tokens
    from mlx_distill.training.kd import KDLoss, divergence, log_softmax
    from mlx_distill.training.kd_data import Aligned, KDSplit

    items, aligned = [], []
    for p, a, done in zip(prompts, answers, finished):
        ids = list(tok.encode(a, add_special_tokens=False)) + ([tok.eos_token_id] if done else [])
        s_pre, t_pre = chat_tokens(tok, p.prompt), chat_tokens(tok, p.prompt, system)
        items.append((s_pre + ids, len(s_pre)))
        aligned.append(Aligned(len(s_pre) + len(ids), len(s_pre), t_pre + ids, len(t_pre)))
    split = KDSplit(items, aligned)
    kl_sum = ll_sum = nll_sum = n_sum = 0.0
    for tokens, offset in items:
        arr = np.array([tokens], np.int32)
        t_tokens, t_pos, mask = split.online(arr, np.array([[offset, len(tokens)]], np.int32))
        z_t = KDLoss(teacher=teacher).teacher_logits(t_tokens, t_pos)
        z_s = student(mx.array(arr[:, :-1]))
        lt, ls = log_softmax(z_t), log_softmax(z_s)
        kl = divergence(lt, ls, "forward")
        targets = mx.array(arr[:, 1:, None])
        ll = mx.take_along_axis(lt, targets, axis=-1)[..., 0]
        nll = -mx.take_along_axis(ls, targets, axis=-1)[..., 0]
        mask_np = np.array(mask)
        kl_sum += float((np.array(kl) * mask_np).sum())
        ll_sum += float((np.array(ll) * mask_np).sum())
        nll_sum += float((np.array(nll) * mask_np).sum())
        n_sum += float(mask_np.sum())
    return {"kl": kl_sum / n_sum, "ll": ll_sum / n_sum, "nll": nll_sum / n_sum}


def style_and_exec(prompts: list[Any], completions: list[Any]) -> dict[str, float]:
    from mlx_distill.evaluate import evaluate_answer

    cells = [evaluate_answer(c.text, p.language or "python", p.tests, c.stop_reason)
             for p, c in zip(prompts, completions)]
    passed = sum(c["execution"].get("passed", 0) for c in cells)
    total = sum(c["execution"].get("total", 0) for c in cells)

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs) if xs else float("nan")

    proxy = [statistics.fmean(v for v in c["metric_scores"].values() if isinstance(v, (int, float)))
             for c in cells]
    return {
        "overview_first": mean([float(c.text.lstrip().startswith("## Overview")) for c in completions]),
        "style_sections": mean([sum(s in c.text for s in SECTIONS) for c in completions]),
        "headers": mean([x["style"]["text"]["headers"] for x in cells]),
        "docstring_coverage": mean([x["style"]["code"].get("docstring_coverage", 0.0) for x in cells]),
        "type_hint_coverage": mean([x["style"]["code"].get("type_hint_coverage", 0.0) for x in cells]),
        "proxy_score": mean(proxy),
        "cut_off": mean([float(x["style"]["text"]["cut_off"]) for x in cells]),
        "pass_rate": passed / total if total else float("nan"),
    }


def evaluate_model(student: Any, teacher: Any, tok: Any, system: str, prompts: list[Any],
                   teacher_answers: list[Any], max_tokens: int) -> tuple[dict[str, float], list[str]]:
    comps = generate(student, tok, prompts, None, max_tokens)
    out = style_and_exec(prompts, comps)
    on_teacher = score(student, teacher, tok, system, prompts, [c.text for c in teacher_answers],
                       [c.stop_reason == "eos" for c in teacher_answers])
    on_student = score(student, teacher, tok, system, prompts, [c.text for c in comps],
                       [c.stop_reason == "eos" for c in comps])
    out.update({"kl_teacher_answers": on_teacher["kl"], "nll_teacher_answers": on_teacher["nll"],
                "kl_student_answers": on_student["kl"], "teacher_ll": on_student["ll"]})
    return out, [c.text for c in comps]


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in METRICS:
        xs = [r[k] for r in runs if k in r and not math.isnan(r[k])]
        if xs:
            out[k] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    return out


def table(results: dict[str, Any]) -> str:
    rows = [("KL(teacher‖student), teacher's answers (nats/token, lower = closer)", "kl_teacher_answers", 3),
            ("student NLL of the teacher's answers (nats/token)", "nll_teacher_answers", 3),
            ("KL(teacher‖student), student's greedy answers", "kl_student_answers", 3),
            ("teacher log-likelihood of the student's answers (nats/token, higher = closer)", "teacher_ll", 3),
            ('answers starting with "## Overview" (share)', "overview_first", 2),
            ("style sections present (of 4)", "style_sections", 2),
            ("markdown headers", "headers", 2),
            ("docstring coverage", "docstring_coverage", 2),
            ("type-hint coverage", "type_hint_coverage", 2),
            ("proxy scorecard, mean of dimensions (0-10)", "proxy_score", 2),
            ("cut off at the token limit (share)", "cut_off", 2),
            ("execution pass rate (tests passed / run)", "pass_rate", 2),
            ("train CE at the last step (teacher's text, its batch)", "train_ce", 3),
            ("training time per run (s)", "train_s", 0)]
    head = "| held-out metric | base | SFT | KD | teacher |\n| --- | --- | --- | --- | --- |\n"
    lines = []
    for label, key, nd in rows:
        cells = []
        for who in ("base", "sft", "kd", "teacher"):
            m = results[who].get(key)
            if m is None:
                cells.append("–")
            elif who in ("sft", "kd"):
                cells.append(f"{m['mean']:.{nd}f} ± {m['std']:.{nd}f}")
            else:
                cells.append(f"{m['mean']:.{nd}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (same for both methods)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--num-layers", type=int, default=8, help="LoRA on the last N of the 30 layers")
    ap.add_argument("--max-seq-length", type=int, default=288,
                    help="rows are cut here: a ~70-token prompt + the first ~220 answer tokens")
    ap.add_argument("--prompts", type=int, default=24, help="teacher answers to collect (base, then expanded)")
    ap.add_argument("--max-tokens", type=int, default=256, help="teacher answer limit when collecting")
    ap.add_argument("--eval-max-tokens", type=int, default=128, help="held-out answer limit")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--work", default=None, help="cache folder (default: $MLX_DISTILL_HOME/bench-kd)")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--render", metavar="FILE", help="rebuild the docs section from a previous run's JSON line")
    args = ap.parse_args()
    if args.render:
        publish(json.loads(Path(args.render).read_text().strip().splitlines()[-1]), args)
        return

    import mlx_distill  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    from mlx_distill import models
    from mlx_distill.prompts import load_prompts
    from mlx_distill.runs import home
    from mlx_distill.teachers import style_prompt
    from mlx_distill.train import TrainConfig, train

    t_start = time.perf_counter()
    work = Path(args.work) if args.work else home() / "bench-kd"
    work.mkdir(parents=True, exist_ok=True)
    data = collect_and_prepare(args, work)
    heldout = load_prompts(ROOT / "prompts" / "heldout.jsonl")
    system = style_prompt()
    teacher, tok, _ = models.load("demo")

    t_answers_file = work / f"teacher_heldout-{args.eval_max_tokens}.json"
    if t_answers_file.is_file():
        t_comps = json.loads(t_answers_file.read_text())
    else:
        t_comps = [{"text": c.text, "stop_reason": c.stop_reason}
                   for c in generate(teacher, tok, heldout, system, args.eval_max_tokens)]
        t_answers_file.write_text(json.dumps(t_comps))

    class C:  # a Completion-like record
        def __init__(self, d: dict[str, Any]):
            self.text, self.stop_reason = d["text"], d["stop_reason"]

    t_answers = [C(c) for c in t_comps]
    results: dict[str, Any] = {"teacher": {k: {"mean": v} for k, v in style_and_exec(heldout, t_answers).items()}}
    results["teacher"]["teacher_ll"] = {"mean": score(teacher, teacher, tok, system, heldout,
                                                      [c.text for c in t_answers],
                                                      [c.stop_reason == "eos" for c in t_answers])["ll"]}
    base, _, _ = models.load("demo")
    metrics, _ = evaluate_model(base, teacher, tok, system, heldout, t_answers, args.eval_max_tokens)
    results["base"] = {k: {"mean": v} for k, v in metrics.items()}
    del base
    print(f"base: {json.dumps(metrics)}", file=sys.stderr)

    per_run: dict[str, list[dict[str, float]]] = {"sft": [], "kd": []}
    cache_s = 0.0
    samples: dict[str, str] = {}
    for seed in args.seeds:
        for method in ("sft", "kd"):
            adapter = work / "runs" / f"{method}-seed{seed}"
            kd = dict(loss="kd", teacher_model="demo", kd_top_k=args.top_k, kd_ratio=args.kd_ratio) \
                if method == "kd" else {}
            cfg = TrainConfig(model="demo", data=str(data), adapter_path=str(adapter), iters=args.steps,
                              batch_size=args.batch_size, learning_rate=args.learning_rate,
                              num_layers=args.num_layers, max_seq_length=args.max_seq_length, seed=seed,
                              save_every=0, overwrite=True, **kd)
            t0 = time.perf_counter()
            logs: list[str] = []
            last: list[dict[str, Any]] = []

            def echo(line: str, logs: list[str] = logs) -> None:
                logs.append(line)
                print("  " + line, file=sys.stderr)

            train(cfg, progress=False, echo=echo, on_step=last.append)
            train_s = time.perf_counter() - t0
            for line in logs:  # the one-time top-K cache build is not training time
                m = re.search(r"teacher cache .* written: .*, ([0-9.]+) s$", line)
                if m:
                    cache_s = float(m.group(1))
                    train_s -= cache_s
            student, _, _ = models.load("demo", adapter)
            metrics, texts = evaluate_model(student, teacher, tok, system, heldout, t_answers,
                                            args.eval_max_tokens)
            metrics["train_s"] = train_s
            metrics["train_ce"] = last[-1].get("ce", last[-1]["loss"])
            per_run[method].append(metrics)
            samples.setdefault(method, texts[0][:400])
            print(f"{method} seed {seed}: {json.dumps(metrics)}", file=sys.stderr)
            del student
    results["sft"], results["kd"] = summarize(per_run["sft"]), summarize(per_run["kd"])
    wall = time.perf_counter() - t_start
    figures = {"bench": "kd", "seeds": args.seeds, "steps": args.steps,
               "train_examples": sum(1 for _ in open(data / "train.jsonl")), "top_k": args.top_k,
               "kd_ratio": args.kd_ratio, "wall_s": round(wall, 1), "kd_cache_build_s": round(cache_s, 1),
               "settings": settings(args),
               **{who: {k: {s: round(v, 4) for s, v in m.items()} for k, m in results[who].items()}
                  for who in ("base", "sft", "kd", "teacher")},
               "runs": {m: [{k: round(v, 4) for k, v in r.items()} for r in rs] for m, rs in per_run.items()}}
    publish(figures, args)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("batch_size", "learning_rate", "num_layers", "max_seq_length", "prompts",
                                          "max_tokens", "eval_max_tokens")}


def reading(f: dict[str, Any]) -> str:
    """The result in words, computed from the figures (whichever way they went)."""
    def m(who: str, key: str) -> float:
        return f[who][key]["mean"]

    def sd(key: str) -> float:
        return f["sft"][key]["std"] + f["kd"][key]["std"]

    def versus(key: str, better: str) -> str:
        a, b = m("kd", key), m("sft", key)
        if abs(a - b) <= sd(key):
            return "within the seeds' spread of"
        closer = (a < b) if better == "lower" else (a > b)
        return ("better than" if closer else "worse than")

    kl, nll, ll = "kl_teacher_answers", "nll_teacher_answers", "teacher_ll"
    rel = (m("kd", kl) - m("sft", kl)) / m("sft", kl)
    return (
        f"What was measured: on the held-out prompts, KD's KL(teacher‖student) on the teacher's answers is "
        f"{m('kd', kl):.3f} against SFT's {m('sft', kl):.3f} ({rel:+.0%}; {versus(kl, 'lower')} SFT), and "
        f"{m('kd', 'kl_student_answers'):.3f} against {m('sft', 'kl_student_answers'):.3f} along the students' own "
        f"answers; the untrained student (the teacher without its prompt) starts at {m('base', kl):.3f}, so "
        f"{'both methods end further from the teacher than that' if min(m('kd', kl), m('sft', kl)) > m('base', kl) else 'training moved the student closer'}. "
        f"Both fit the teacher's text: student NLL {m('sft', nll):.3f} (SFT) and {m('kd', nll):.3f} (KD) from "
        f"{m('base', nll):.3f}. The teacher's log-likelihood of the students' greedy answers is "
        f"{m('sft', ll):.3f} (SFT) and {m('kd', ll):.3f} (KD): KD is {versus(ll, 'higher')} SFT there. "
        f"Style and execution: the 135M teacher itself starts {m('teacher', 'overview_first'):.0%} of its "
        f"held-out answers with \"## Overview\" (SFT {m('sft', 'overview_first'):.0%}, KD "
        f"{m('kd', 'overview_first'):.0%}) and passes {m('teacher', 'pass_rate'):.0%} of the tests (SFT "
        f"{m('sft', 'pass_rate'):.0%}, KD {m('kd', 'pass_rate'):.0%}); proxy scorecard {m('sft', 'proxy_score'):.2f} "
        f"(SFT) vs {m('kd', 'proxy_score'):.2f} (KD), {versus('proxy_score', 'higher')} SFT. "
        f"{f['steps']} steps x {len(f['seeds'])} seeds is a small sample.")


def publish(f: dict[str, Any], args: argparse.Namespace) -> None:
    st = {**settings(args), **f.get("settings", {})}
    seeds = ", ".join(map(str, f["seeds"]))
    cache = (f"built once ({f['kd_cache_build_s']:.0f} s, not in the training time)" if f.get("kd_cache_build_s")
             else "reused from an earlier run")
    body = f"""
`scripts/bench_kd.py`: the demo teacher (the embedded SmolLM2-135M under its style prompt) distilled
into the same model without the prompt. {f['train_examples']} teacher answers (the first {st['prompts']}
demo prompts, ≤ {st['max_tokens']} tokens; most are cut there, so training rows are cut at
--max-seq-length {st['max_seq_length']} before the end-of-turn); the 4 held-out prompts of
`prompts/heldout.jsonl` are never trained on. Each run: LoRA on the last {st['num_layers']} layers,
{f['steps']} steps of batch {st['batch_size']} at lr {st['learning_rate']}, seeds {seeds}, for both
methods. SFT = `--loss sft`; KD = `--loss kd --kd-ratio {f['kd_ratio']} --kd-top-k {f['top_k']}`
(forward KL, temperature 1); its top-K cache was {cache} and shared by every seed. Held-out answers:
greedy, ≤ {st['eval_max_tokens']} tokens. Mean ± sample std over seeds; base and teacher are single
deterministic runs. Total wall time {f['wall_s'] / 60:.1f} min.

{table(f)}

{reading(f)}
"""
    if not args.no_write:
        write_section("kd", "Token-level KD vs SFT (demo teacher, held-out prompts)", body)
    print(body, file=sys.stderr)
    emit(f)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
