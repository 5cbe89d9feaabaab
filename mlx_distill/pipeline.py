"""``mlx-distill run`` and ``mlx-distill demo``: the whole pipeline in one resumable command.

Stages, in order (each one's outputs are the next one's inputs; all in one run folder):

1. ``prompts``   training prompts (+ optional expansion) -> prompts.jsonl, heldout.jsonl
2. ``collect``   the teacher answers them                -> teacher_data.jsonl
3. ``prepare``   mlx-lm chat splits                      -> data/{train,valid,test}.jsonl
4. ``train``     LoRA on the student                     -> adapters/, metrics.jsonl
5. ``generate``  teacher, base and distilled on held-out -> generations/*.jsonl
6. ``compare``   execution, style, judge                 -> scores.json, report.html
7. ``visuals``   the charts                              -> visuals/
8. ``export``    fused HF model, verified                -> export/

``run_state.json`` records each stage's fingerprint: a hash of its resolved config
and of its input files. A stage whose fingerprint and outputs are unchanged is
skipped; a changed or ``--force``d stage runs again, and what it replaces is moved
to ``history/<time>/`` first (nothing written is lost). An interrupted stage
resumes: collection skips answered prompts, training continues from its last
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import resolve, save_config
from mlx_distill.errors import ConfigError, DistillError, cli_errors
from mlx_distill.files import write_json_atomic, write_jsonl_atomic
from mlx_distill.run_config import REPO, RunConfig, fingerprint, load_run_config, repo_path, spread
from mlx_distill.runs import RunDir

__all__ = ["REPO", "STAGES", "Pipeline", "RunConfig", "demo_cli", "fingerprint", "load_run_config", "run_cli",
           "run_pipeline", "spread"]

STAGES = ("prompts", "collect", "prepare", "train", "generate", "compare", "visuals", "export")


class Pipeline:
    """Runs the stages of one run folder with skip/resume/force bookkeeping."""

    def __init__(self, run: RunDir, cfg: RunConfig, force: tuple[str, ...] = (),
                 echo: Callable[[str], None] = print) -> None:
        self.run, self.cfg, self.force, self.echo = run, cfg, set(force), echo
        self.progress = True
        unknown = self.force - set(STAGES)
        if unknown:
            raise ConfigError(f"--force {', '.join(sorted(unknown))}: unknown stage; stages are {', '.join(STAGES)}")
        self.state = json.loads(run.state.read_text()) if run.state.exists() else {"stages": {}}
        self.history = run.root / "history" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    # ---- stage configs (CLI-independent; the run folder decides every path)

    def section(self, cls: type, name: str, **forced: Any) -> Any:
        base = resolve(cls, {}, dict(self.cfg.sections), section=name) if name in self.cfg.sections else cls()
        return replace(base, **forced)

    def _save_state(self) -> None:
        write_json_atomic(self.run.state, self.state)

    def _outputs(self, stage: str) -> list[Path]:
        r = self.run
        return {
            "prompts": [r.prompts, r.heldout], "collect": [r.teacher_data], "prepare": [r.data],
            "train": [r.adapters, r.metrics], "generate": [r.generations],
            "compare": [r.scores, r.report], "visuals": [r.visuals], "export": [r.export],
        }[stage]

    def _move_aside(self, stage: str, keep: tuple[Path, ...] = ()) -> None:
        for p in self._outputs(stage):
            if p.exists() and p not in keep:
                dest = self.history / p.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(p), str(dest))
                self.echo(f"  previous {p.name} kept in {dest.relative_to(self.run.root)}")

    def stage(self, name: str, config: Any, inputs: list[Path], fn: Callable[[bool], Any],
              keep: tuple[Path, ...] = ()) -> None:
        """Run ``fn(resume)`` unless done with the same fingerprint; record the outcome."""
        fp = fingerprint(config, inputs)
        prev = self.state["stages"].get(name, {})
        outputs_there = all(p.exists() for p in self._outputs(name) if p != self.run.heldout or name == "prompts")
        if name not in self.force and prev.get("fingerprint") == fp and prev.get("status") == "done" and outputs_there:
            self.echo(f"[{name}] up to date, skipped")
            return
        resume = prev.get("fingerprint") == fp and prev.get("status") == "running" and name not in self.force
        if prev and not resume:
            self._move_aside(name, keep)
        why = "resuming" if resume else ("forced" if name in self.force else ("inputs or config changed" if prev else "running"))
        self.echo(f"[{name}] {why}")
        if self.run.stage_config(name).parent:
            save_config(config, self.run.stage_config(name)) if hasattr(config, "__dataclass_fields__") \
                else write_json_atomic(self.run.stage_config(name), config)
        self.state["stages"][name] = {"fingerprint": fp, "status": "running",
                                      "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._save_state()
        t0 = time.perf_counter()
        fn(resume)
        self.state["stages"][name].update(status="done", seconds=round(time.perf_counter() - t0, 1),
                                          finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._save_state()
        self.echo(f"[{name}] done in {self.state['stages'][name]['seconds']:.0f}s")

    # ---- preflight: fail before spending anything

    def preflight(self) -> None:
        from mlx_distill.terms import TERMS_NOTICE, is_claude_teacher

        needs = []
        if is_claude_teacher(self.cfg.teacher):
            if self.cfg.expand_per_prompt:
                needs.append("prompts (expansion through the teacher)")
            needs += ["collect (the teacher answers the training prompts)",
                      "generate (the teacher answers the held-out prompts)"]
        if is_claude_teacher(self.cfg.judge):
            needs.append("compare (the LLM judge)")
        if needs and not os.environ.get("ANTHROPIC_API_KEY"):
            raise ConfigError(
                "ANTHROPIC_API_KEY is not set, and these stages need it:\n  - " + "\n  - ".join(needs)
                + "\nNothing was sent or spent. Set the key (export ANTHROPIC_API_KEY=sk-ant-...), or use "
                "teacher: demo / local:PATH and judge: none for an offline run."
            )
        if is_claude_teacher(self.cfg.teacher):
            self.echo(TERMS_NOTICE)
        for p in [*self.cfg.prompts, self.cfg.heldout]:
            if not repo_path(p).is_file():
                raise ConfigError(f"prompt file {p}: no such file (relative paths resolve against the cwd, then {REPO})")

    # ---- the stages

    def do_prompts(self) -> None:
        from mlx_distill.expand import ExpandConfig, expand
        from mlx_distill.prompts import load_prompts, near_duplicate

        files = [repo_path(p) for p in self.cfg.prompts]
        heldout_file = repo_path(self.cfg.heldout)
        config = {"prompts": [str(f) for f in files], "heldout": str(heldout_file), "limit": self.cfg.limit,
                  "expand_per_prompt": self.cfg.expand_per_prompt,
                  "teacher": self.cfg.teacher if self.cfg.expand_per_prompt else None}

        def work(resume: bool) -> None:
            heldout = load_prompts(heldout_file)
            rows, seen = [], {}
            extra_files = list(files)
            if self.cfg.expand_per_prompt:
                out = self.run.root / "expanded.jsonl"
                stats = expand(ExpandConfig(prompts=str(files[0]), out=str(out), teacher=self.cfg.teacher,
                                            per_prompt=self.cfg.expand_per_prompt, heldout=str(heldout_file)),
                               echo=self.echo)
                self.echo(f"  expansion: {stats}")
                extra_files.append(out)
            for f in extra_files:
                for p in load_prompts(f):
                    if p.id in seen:
                        raise ConfigError(f"prompt id {p.id!r} is in both {seen[p.id]} and {f}; ids must be unique")
                    seen[p.id] = f
                    rows.append(p)
            held_ids = {h.id for h in heldout}
            leaked = [p.id for p in rows if p.id in held_ids or near_duplicate(p.prompt, heldout, 0.6)]
            if leaked:
                raise ConfigError(f"training prompts {leaked[:5]} are (near-)duplicates of held-out prompts; "
                                  "held-out prompts must never reach training data")
            rows = spread(rows, self.cfg.limit)
            write_jsonl_atomic(self.run.prompts, [p.to_dict() for p in rows])
            write_jsonl_atomic(self.run.heldout, [h.to_dict() for h in heldout])
            self.echo(f"  {len(rows)} training prompts, {len(heldout)} held-out prompts")

        self.stage("prompts", config, [*files, heldout_file], lambda resume: work(resume))

    def teacher_settings(self, cls: type, name: str = "collect", **forced: Any) -> Any:
        return self.section(cls, name, teacher=self.cfg.teacher, **forced)

    def do_collect(self) -> None:
        from mlx_distill.collect import CollectConfig, collect

        cfg = self.teacher_settings(CollectConfig, prompts=str(self.run.prompts), out=str(self.run.teacher_data),
                                    dry_run=False)
        identity = {k: v for k, v in asdict(cfg).items() if k in ("teacher", "system", "max_tokens", "temperature", "top_p")}
        prev = self.state["stages"].get("collect", {})
        # Same teacher and sampling: keep the paid answers (a rerun only asks for missing prompts).
        keep = (self.run.teacher_data,) if prev.get("identity") == identity else ()

        def work(resume: bool) -> None:
            s = collect(cfg, echo=self.echo)
            self.echo(s.text())
            self.state["stages"]["collect"]["identity"] = identity
            if s.failed or s.not_sent:
                raise DistillError(f"collect: {s.failed} prompts failed, {s.not_sent} not sent; rerun to retry them")

        self.stage("collect", cfg, [self.run.prompts], work, keep=keep)

    def do_prepare(self) -> None:
        from mlx_distill.dataset import PrepareConfig, prepare
        from mlx_distill.train import TrainConfig

        cfg = self.section(PrepareConfig, "prepare", teacher_data=str(self.run.teacher_data), out=str(self.run.data),
                           held_out=str(self.run.heldout), student=self.cfg.student, overwrite=True)
        if "max_seq_length" not in (self.cfg.sections.get("prepare") or {}):  # report against train's limit
            cfg = replace(cfg, max_seq_length=self.section(TrainConfig, "train").max_seq_length)

        self.stage("prepare", cfg, [self.run.teacher_data, self.run.heldout], lambda resume: prepare(cfg, echo=self.echo))

    def do_train(self) -> None:
        from mlx_distill.train import TrainConfig, train

        cfg = self.section(TrainConfig, "train", model=self.cfg.student, data=str(self.run.data),
                           adapter_path=str(self.run.adapters), metrics_path=str(self.run.metrics))
        data = [self.run.data / f for f in ("train.jsonl", "valid.jsonl")]

        def work(resume: bool) -> None:
            from mlx_distill.training.checkpoint import list_checkpoints

            can_resume = resume and bool(list_checkpoints(self.run.adapters))
            r = train(replace(cfg, resume=can_resume, overwrite=not can_resume), echo=self.echo,
                      progress=self.progress)
            self.echo(f"  {r.steps} steps, {r.epochs:.2f} epochs, loss {r.train_loss}, val loss {r.val_loss}, "
                      f"val acc {r.val_acc}, {r.tokens:,} tokens in {r.seconds:.0f}s")

        self.stage("train", cfg, data, work)

    def do_generate(self) -> None:
        from mlx_distill.collect import CollectConfig, collect
        from mlx_distill.generate import GenerateConfig, generate_base_and_adapted
        from mlx_distill.prompts import load_prompts

        # The teacher answers the held-out prompts exactly as it answered the training ones.
        tcfg = self.teacher_settings(CollectConfig, prompts=str(self.run.heldout),
                                     out=str(self.run.generation("teacher")), dry_run=False)
        gcfg = self.section(GenerateConfig, "generate", model=self.cfg.student, adapter_path=None)
        adapter = [self.run.adapters / "adapters.safetensors", self.run.adapters / "adapter_config.json"]
        config = {"teacher": asdict(tcfg), "students": asdict(gcfg)}
        prev = self.state["stages"].get("generate", {})
        keep = (self.run.generations,) if prev.get("teacher_identity") == asdict(tcfg) else ()

        def work(resume: bool) -> None:
            self.run.generations.mkdir(parents=True, exist_ok=True)
            for stale in ("base", "distilled"):  # cheap to redo; the teacher's (paid) answers stay
                p = self.run.generation(stale)
                if p.exists() and keep:
                    dest = self.history / "generations" / p.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(p), str(dest))
            s = collect(tcfg, echo=self.echo)
            self.state["stages"]["generate"]["teacher_identity"] = asdict(tcfg)
            if s.failed or s.not_sent:
                raise DistillError(f"generate: the teacher failed on {s.failed + s.not_sent} held-out prompts; rerun")
            base, distilled = generate_base_and_adapted(gcfg, load_prompts(self.run.heldout), self.run.adapters)
            write_jsonl_atomic(self.run.generation("base"), base)
            write_jsonl_atomic(self.run.generation("distilled"), distilled)
            self.echo(f"  teacher, base and distilled answers for {len(base)} held-out prompts in {self.run.generations}")

        self.stage("generate", config, [self.run.heldout, *adapter], work, keep=keep)

    def do_compare(self) -> None:
        from mlx_distill.compare import CompareConfig, compare_run

        cfg = self.section(CompareConfig, "compare", run=str(self.run.root), judge=self.cfg.judge,
                           heldout=str(self.run.heldout))
        inputs = [self.run.heldout, self.run.metrics, *(self.run.generation(m) for m in ("teacher", "base", "distilled"))]

        def work(resume: bool) -> None:
            scores = compare_run(self.run.root, cfg, echo=self.echo)
            avgs = scores.get("averages", {})
            parts = [f"{m} {avgs[m]['average']:.1f}" for m in ("teacher", "base", "distilled")
                     if (avgs.get(m) or {}).get("average") is not None]
            self.echo(f"  scorecard ({scores.get('scorecard_source')}): " + ", ".join(parts))

        # A paid judge result is reused by compare itself when the answers are unchanged.
        self.stage("compare", cfg, inputs, work, keep=(self.run.scores,))

    def do_visuals(self) -> None:
        from mlx_distill.report import write_report
        from mlx_distill.visuals import render

        def work(resume: bool) -> None:
            render(self.run.root, echo=self.echo)
            if self.run.scores.exists():
                write_report(self.run.root)  # again, now with the charts embedded

        self.stage("visuals", {"visuals": 1}, [self.run.metrics, self.run.scores, self.run.teacher_data], work)

    def do_export(self) -> None:
        from mlx_distill.export import ExportConfig, export_model

        cfg = self.section(ExportConfig, "export", model=self.cfg.student, adapter_path=str(self.run.adapters),
                           out=str(self.run.export), overwrite=True, push_to_hub=None, dry_run=False,
                           teacher=self.cfg.teacher)
        adapter = [self.run.adapters / "adapters.safetensors", self.run.adapters / "adapter_config.json"]

        def work(resume: bool) -> None:
            r = export_model(cfg, echo=self.echo)
            self.echo(f"  exported to {r.out}" + (" (verified)" if r.verify else ""))

        self.stage("export", cfg, [*adapter, self.run.scores], work)

    def run_all(self) -> None:
        self.preflight()
        self.run.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.do_prompts()
        self.do_collect()
        self.do_prepare()
        self.do_train()
        self.do_generate()
        self.do_compare()
        self.do_visuals()
        if self.cfg.export:
            self.do_export()
        self.state["last_run_seconds"] = round(time.perf_counter() - t0, 1)
        self._save_state()
        self.where()

    def where(self) -> None:
        r = self.run
        rows = [("teacher answers", r.teacher_data), ("training data", r.data), ("adapter", r.adapters),
                ("training metrics", r.metrics), ("generations", r.generations), ("scores", r.scores),
                ("report (open in a browser)", r.report), ("charts", r.visuals), ("export (HF format)", r.export)]
        self.echo(f"\nDone in {self.state['last_run_seconds']:.0f}s. Everything is in {r.root}/:")
        for label, p in rows:
            if p.exists():
                self.echo(f"  {label:<28} {p}")


def run_pipeline(config: str | Path | None, out: str | Path, force: tuple[str, ...] = (),
                 overrides: dict[str, Any] | None = None, echo: Callable[[str], None] = print,
                 progress: bool = True) -> Pipeline:
    cfg = load_run_config(config, overrides)
    pipe = Pipeline(RunDir(Path(out)), cfg, force, echo)
    pipe.progress = progress
    pipe.run_all()
    return pipe


@click.command("run")
@click.option("--config", "config_file", type=click.Path(), required=True, help="Run config YAML (see configs/).")
@click.option("--out", default=None, help="Run folder [default: runs/<config name>].")
@click.option("--force", multiple=True, help=f"Rerun this stage even if it is up to date ({', '.join(STAGES)}).")
@cli_errors
def run_cli(config_file: str, out: str | None, force: tuple[str, ...]) -> None:
    """Run the whole pipeline from a YAML config; rerun the same command to resume."""
    out = out or str(Path("runs") / Path(config_file).stem)
    run_pipeline(config_file, out, force, echo=lambda s: click.echo(s, err=True))


DEMO_CONFIG = REPO / "configs" / "demo.yaml"


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Run folder.")
@click.option("--force", multiple=True, help=f"Rerun this stage even if it is up to date ({', '.join(STAGES)}).")
@cli_errors
def demo_cli(out: str, force: tuple[str, ...]) -> None:
    """Offline demo: every stage for real on the embedded SmolLM2-135M (no key, no hub, no network)."""
    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"{DEMO_CONFIG}: missing; run the demo from a checkout of the repository")
    click.echo("mlx-distill demo: context distillation of SmolLM2-135M-Instruct into itself, offline.\n"
               "Teacher = the student under a long style system prompt; the student learns to answer that way "
               "without it.", err=True)
    run_pipeline(DEMO_CONFIG, out, force, echo=lambda s: click.echo(s, err=True))


if __name__ == "__main__":
    run_cli()
