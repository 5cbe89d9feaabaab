"""``mlx-distill export``: fuse the adapter into a Hugging Face model folder, prove it, share it.

The order is chosen so a bad input costs nothing and a bad result ships nothing:

1. check flags, the adapter folder, ``--out`` and the Hub token (no compute yet);
2. load the base in fp32 (a quantized base is **dequantized first**: fusing into
   a quantized base re-quantizes the merged weights and can erase a small
   adapter, mlx-lm issue #1172), apply the adapter (layer count and shapes are
   checked here, before anything is written), keep its reference logits;
3. fuse with mlx-lm's ``LoRALinear.fuse`` and write a staging folder next to
   ``--out``: safetensors, ``config.json`` carrying the dtype actually stored,
   the base's tokenizer files normalised for transformers 4.57 and 5.x, and
   ``generation_config.json``;
4. verify (``mlx_distill.verify``), then GGUF / cast / PEFT, card, ``verify.json``;
5. only then rename the staging folder to ``--out`` (a previous export is
   replaced only with ``--overwrite``), and push to the Hub if asked.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, DataError, DistillError, cli_errors
from mlx_distill.export_hf import DTYPES, native_dtype, save_weights, write_config, write_hf_folder
from mlx_distill.files import write_json_atomic, write_text_atomic

MARKER = "export_config.json"  # marks a folder as an mlx-distill export (safe to --overwrite)


@dataclass
class ExportConfig:
    model: str | None = opt(None, "Base model the adapter was trained on: demo, a .gguf file, a directory or "
                            "a hub id [default: the model named in adapter_config.json].")
    adapter_path: str | None = opt(None, "Adapter folder (adapter_config.json + adapters.safetensors).")
    out: str | None = opt(None, "Output folder [default: RUN/export when the adapter is RUN/adapters].")
    dtype: str = opt("auto", "Stored weight dtype; auto keeps the base's float dtype.", choices=DTYPES)
    peft: bool = opt(False, "Also write the adapter in PEFT format (OUT/peft).")
    gguf: bool = opt(False, "Also write an F16 GGUF of the fused model (llama family).")
    verify: bool = opt(True, "Check the export against the adapter-applied model (MLX, transformers, PEFT).")
    push_to_hub: str | None = opt(None, "Upload OUT to this Hugging Face repo (user/name).")
    private: bool = opt(False, "Create the Hub repo as private.")
    dry_run: bool = opt(False, "With --push-to-hub: list what would be uploaded and send nothing.")
    overwrite: bool = opt(False, "Replace OUT when it holds a previous export.")
    teacher: str | None = opt(None, "Teacher name for the model card when the run folder does not record it.")
    license: str | None = opt(None, "License id for the model card [default: the base's].")


@dataclass
class ExportResult:
    out: Path
    files: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    url: str | None = None


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """The adapter folder's config, with errors naming the file and the fix."""
    if not adapter.is_dir():
        raise ConfigError(f"--adapter-path {adapter}: no such folder")
    missing = [n for n in ("adapter_config.json", "adapters.safetensors") if not (adapter / n).is_file()]
    if missing:
        raise ConfigError(f"--adapter-path {adapter}: missing {', '.join(missing)} (written by "
                          "`mlx-distill train` or `mlx_lm lora`)")
    path = adapter / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"not valid JSON ({e})", path, getattr(e, "lineno", None),
                        fix="restore the file the trainer wrote") from None
    if not isinstance(cfg, dict):
        raise DataError("expected a JSON object", path)
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise DataError(f"fine_tune_type {kind!r}: expected lora, dora or full", path)
    if kind != "full" and not isinstance(cfg.get("lora_parameters"), dict):
        raise DataError("lora_parameters (rank, scale, dropout) is missing", path,
                        fix="an mlx-lm adapter config carries lora_parameters")
    return cfg


def base_spec(model: str | None, acfg: dict[str, Any], adapter: Path) -> str:
    """--model, else the base the trainer recorded in adapter_config.json."""
    spec = model or acfg.get("model")
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--model is required: {adapter / 'adapter_config.json'} does not name the base model")
    return spec


def check_out(out: Path, overwrite: bool, keep: list[Path]) -> None:
    """Refuse a non-empty OUT unless --overwrite, and never one that holds inputs or non-exports."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    res = out.resolve()
    for p in keep:
        if p.resolve() == res or res in p.resolve().parents:
            raise ConfigError(f"--out {out} contains {p}, an input of this export; choose another folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace a previous export, "
                          "or choose a new folder")
    if not (out / MARKER).is_file():
        raise ConfigError(f"--out {out} holds files that are not an mlx-distill export ({MARKER} is "
                          "missing); --overwrite only replaces exports. Choose a new folder.")


def load_checked(spec: str, adapter: Path, kind: str) -> tuple[Any, Any, Any]:
    """Base (fp32, dequantized) + adapter; every adapter tensor must exist and be used."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_distill import models

    model, tok, info = models.load(spec, None, policy="float32")
    models.load_adapter(model, adapter)  # layer count and shape mismatches: ConfigError
    if kind != "full":
        saved = set(mx.load(str(adapter / "adapters.safetensors")))
        leaves = {"lora_a", "lora_b", "m"}
        wanted = {n for n, _ in tree_flatten(model.parameters()) if n.rsplit(".", 1)[-1] in leaves}
        if wanted - saved:
            raise ConfigError(
                f"--adapter-path {adapter}: adapter_config.json asks for {len(wanted)} LoRA tensors but "
                f"adapters.safetensors has only {len(wanted & saved)} of them (e.g. "
                f"{sorted(wanted - saved)[0]}); it does not belong to this config or model"
            )
    return model, tok, info


def fuse(model: Any) -> dict[str, Any]:
    """mlx-lm's fuse into the (already dequantized) fp32 base; returns the HF-named weights."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    left = [k for k in weights if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "scales")]
    if left:
        raise DistillError(f"fuse left adapter or quantized tensors behind: {left[:3]}")
    return weights


def base_weights(model: Any) -> dict[str, Any]:
    """The dequantized base inside an adapter-applied model (LoRA wrappers' inner layers)."""
    from mlx.utils import tree_flatten

    out = {}
    for k, v in tree_flatten(model.parameters()):
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m"):
            continue
        out[k.replace(".linear.", ".").replace(".embedding.", ".")] = v
    return out


def export_model(cfg: ExportConfig, echo: Callable[[str], None] = print) -> ExportResult:
    """Run the export described by ``cfg`` (see the module docstring); returns where it went."""
    from mlx_distill import hub, model_card

    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.dry_run and not cfg.push_to_hub:
        raise ConfigError("--dry-run applies to --push-to-hub; add --push-to-hub REPO")
    if cfg.push_to_hub:
        hub.check_can_push(cfg.push_to_hub, cfg.dry_run)
    if not cfg.adapter_path:
        out = Path(cfg.out or "")
        if cfg.push_to_hub and cfg.out and (out / MARKER).is_file():  # push an existing export
            return ExportResult(out, [n for n, _ in hub.plan(out)], url=_push(cfg, out, echo))
        raise ConfigError("--adapter-path is required (the folder `mlx-distill train` wrote)")
    adapter = Path(cfg.adapter_path)
    acfg = read_adapter_config(adapter)
    kind = acfg.get("fine_tune_type", "lora")
    if cfg.peft:
        from mlx_distill import export_peft

        export_peft.check_supported(acfg, adapter / "adapter_config.json")
    run = model_card.run_dir_of(adapter)
    if not cfg.out and run is None:
        raise ConfigError("--out is required (the adapter is not in a run folder's adapters/)")
    out = Path(cfg.out) if cfg.out else run.export  # type: ignore[union-attr]
    check_out(out, cfg.overwrite, [adapter])
    from mlx_distill import models

    spec = base_spec(cfg.model, acfg, adapter)
    info = models.resolve(spec, "float32")
    base_dir = Path(info.path)
    check_out(out, cfg.overwrite, [adapter, base_dir])
    base_config = json.loads((base_dir / "config.json").read_text())
    dtype = native_dtype(base_config) if cfg.dtype == "auto" else cfg.dtype
    if cfg.gguf:
        from mlx_distill import export_gguf

        export_gguf.require_gguf()
        export_gguf.check_supported(base_dir, base_config)

    echo(f"export: loading {spec} (fp32, dequantized) + {adapter}")
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    # e.g. run "runs/sql-helper" -> "sql-helper-f16.gguf"; --push-to-hub me/x -> "x-f16.gguf"
    name = (cfg.push_to_hub or "").split("/")[-1] or (out.resolve().parent.name if run else out.name)
    try:
        # The loaded model is passed on without a local name, so _build can free it after the fuse.
        result = _build(cfg, *load_checked(spec, adapter, kind), acfg, adapter, base_dir, base_config,
                        dtype, staging, name, echo)
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.out = out
    echo(f"export: wrote {out} ({len(result.files)} files)")
    if cfg.push_to_hub:
        result.url = _push(cfg, out, echo)
    return result


def _build(cfg: ExportConfig, model: Any, tok: Any, info: Any, acfg: dict[str, Any], adapter: Path,
           base_dir: Path, base_config: dict[str, Any], dtype: str, staging: Path, name: str,
           echo: Callable[[str], None]) -> ExportResult:
    from mlx_distill import export_gguf, export_peft, hub, model_card, verify

    report: dict[str, Any] | None = None
    full = verify.chat_ids(tok, True)
    ref = base = None
    if cfg.verify:
        ref, base = verify.mlx_logits(model, full), verify.base_logits(model, full)
        report = {"prompts": len(full), "bounds": verify.bounds()}
        if base is not None:
            report["adapter_effect"] = verify.compare(ref, base)
    base_name = info.hub_id or base_dir.name
    staging.mkdir(parents=True)
    peft_cfg = peft_base = None
    if cfg.peft:
        # PEFT resolves the base by hub id, else by path: a local base without a hub id keeps its path.
        peft_cfg = export_peft.write_peft(staging / "peft", model, acfg, info.hub_id or str(base_dir.resolve()))
        peft_base = base_dir
        if "quantization" in base_config:  # PEFT needs a float base: the one that was trained on
            peft_base = staging / "peft" / "base"
            write_hf_folder(peft_base, base_weights(model), base_dir, base_config, dtype,
                            {"role": "dequantized base for peft/"})
    extra = {"base_model": base_name, "fine_tune_type": acfg.get("fine_tune_type", "lora")}
    weights = fuse(model)
    config = write_hf_folder(staging, weights, base_dir, base_config, "float32", extra)
    fused = None
    if cfg.verify:
        fused, _ = verify.load_mlx_folder(staging)
        cmp = verify.compare(verify.mlx_logits(fused, full), ref)
        report["mlx_fused_vs_adapter"] = verify.check_bounds(  # type: ignore[index]
            "fused MLX vs adapter-applied MLX (fp32)", cmp,
            "the fuse changed the model; nothing was written to --out. Report this with the numbers.")
        echo(f"verify: fused vs adapter max |Δlogit| {cmp['max_abs_logit_diff']:.2e}, argmax "
             f"{cmp['argmax_agreement']:.0%}")
    gguf_file = None
    if cfg.gguf:
        gguf_file = f"{name}-f16.gguf"
        license_id = cfg.license or model_card.base_license(base_dir)
        export_gguf.write_gguf(staging / gguf_file, weights, config, staging, name, license_id)
        summary = export_gguf.read_back(staging / gguf_file, staging)
        if report is not None:
            report["gguf"] = [summary]
        echo(f"export: {gguf_file}: read back {summary['tensors']} tensors, {summary['tokens']} tokens")
    del model, weights
    if dtype != "float32":  # cast after the fp32 checks; re-checked below on what is stored
        save_weights(staging, _reload(staging), dtype)
        config = write_config(staging, base_config, dtype, extra)
        if cfg.verify:
            fused, _ = verify.load_mlx_folder(staging)
            cmp = verify.compare(verify.mlx_logits(fused, full), ref)
            report["cast"] = verify.check_cast(cmp, report.get("adapter_effect"), dtype)  # type: ignore[index]
            echo(f"verify: {dtype} export vs adapter max |Δlogit| {cmp['max_abs_logit_diff']:.2e}")
    if cfg.verify:
        report["transformers_vs_mlx"] = verify.check_transformers(staging, fused, tok, echo)  # type: ignore[index]
        del fused
        if peft_cfg is not None:
            report["peft_vs_mlx_adapter"] = export_peft.check_peft(  # type: ignore[index]
                staging / "peft", peft_base, full, ref, echo)
        report.update(passed=True, versions=verify.versions(), checked_at=verify._now())  # type: ignore[union-attr]
        write_json_atomic(staging / "verify.json", report)

    def count_tokens(row: dict[str, Any]) -> int:
        if isinstance(row.get("messages"), list):
            return len(tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False))
        return len(tok.encode(str(row.get("text", ""))))

    peft_info = None
    if peft_cfg is not None:
        peft_info = {"r": peft_cfg["r"], "lora_alpha": peft_cfg["lora_alpha"], "base_hint": base_name,
                     "base_in_folder": peft_base != base_dir}
    note = None
    if info.source in ("demo", "gguf"):
        note = (f"The base weights are the dequantized GGUF ({base_config.get('mlx_distill_source', {}).get('gguf')}) "
                "the adapter was trained on, not the original full-precision checkpoint.")
    facts = model_card.gather(
        adapter, acfg, teacher=cfg.teacher, count_tokens=count_tokens, name=name, base_id=info.hub_id,
        base_name=base_name, dtype=dtype, license=cfg.license or model_card.base_license(base_dir),
        verify=report, peft=peft_info, gguf_file=gguf_file, repo_id=cfg.push_to_hub, base_note=note)
    write_text_atomic(staging / "README.md", model_card.render(facts))
    save_config(cfg, staging / MARKER)
    hub.assert_no_secrets(staging)
    return ExportResult(staging, [n for n, _ in hub.plan(staging)], report)


def _reload(folder: Path) -> dict[str, Any]:
    import mlx.core as mx

    weights: dict[str, Any] = {}
    for p in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(p)))
    mx.eval(list(weights.values()))  # read now: save_weights replaces these files
    return weights


def _install(staging: Path, out: Path) -> None:
    """Move the finished staging folder to OUT; a previous export is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _push(cfg: ExportConfig, out: Path, echo: Callable[[str], None]) -> str | None:
    from mlx_distill import hub

    if cfg.dry_run:
        hub.dry_run(out, cfg.push_to_hub or "", cfg.private, echo)
        return None
    try:
        return hub.push(out, cfg.push_to_hub or "", cfg.private, echo)
    except DistillError as e:
        retry = f"mlx-distill export --out {out} --push-to-hub {cfg.push_to_hub}"
        raise type(e)(f"{e}\n  the export itself is complete in {out}; retry the upload with: {retry}") from None


@click.command("export")
@click_options(ExportConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options.")
@cli_errors
def cli(config_file: str | None, **kwargs: Any) -> None:
    """Fuse the adapter into a verified Hugging Face folder (+ PEFT, GGUF, Hub upload)."""
    cfg = resolve(ExportConfig, kwargs, config_file, section="export")
    result = export_model(cfg, echo=lambda s: click.echo(s, err=True))
    click.echo(str(result.out))


if __name__ == "__main__":
    cli()
