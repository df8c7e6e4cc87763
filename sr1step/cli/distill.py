"""`sr1step distill`: train a one-step student and export it for `sr1step upscale`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sr1step.cli._output import Output
from sr1step.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill(
        out: Annotated[
            Path,
            typer.Option(
                "--out", "-o", help="Run folder: checkpoints, logs, validation, student.safetensors."
            ),
        ],
        data: Annotated[
            list[str] | None,
            typer.Option("--data", help="Folder of HR training images (repeatable; searched recursively)."),
        ] = None,
        teacher: Annotated[str, typer.Option(help="Teacher family: resshift (RSD, TAD-SR).")] = "resshift",
        teacher_weights: Annotated[
            str | None,
            typer.Option(help="Teacher checkpoint: registry name, file or hf:// (default: resshift-v1)."),
        ] = None,
        method: Annotated[str, typer.Option(help="rsd | tad-sr | yonos-sr")] = "rsd",
        base: Annotated[
            str | None,
            typer.Option(help="YONOS-SR: the Stable Diffusion base (hf://repo or a local diffusers folder)."),
        ] = None,
        vae: Annotated[
            str | None, typer.Option(help="Autoencoder (ResShift methods; default vq-f4).")
        ] = None,
        config: Annotated[
            Path | None,
            typer.Option("--config", help="TOML/YAML/JSON file with [train], [data], [rsd], ... sections."),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override one setting: section.key=value (repeatable)."),
        ] = None,
        val_data: Annotated[
            str | None, typer.Option(help="Validation folder with lr/ and hr/ sub-folders.")
        ] = None,
        resume: Annotated[
            bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")
        ] = False,
        offline: Annotated[bool, typer.Option(help="Use cached weights only.")] = False,
        lpips_random_backbone: Annotated[
            bool,
            typer.Option(help="LPIPS with a random AlexNet (smoke tests without downloads).", hidden=True),
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    ) -> None:
        """Distil a one-step SR student (RSD by default) on one GPU, many (torchrun) or the CPU."""
        from sr1step.distill import method_for
        from sr1step.distill.config import resolve_config
        from sr1step.distill.trainer import Trainer, init_distributed

        output = Output(quiet=quiet)
        if method in ("rsd", "tad-sr") and teacher != "resshift":
            raise ConfigError(f"--teacher {teacher!r}: {method} distils ResShift; use --teacher resshift")
        saved = None
        if resume:
            saved_file = out / "config.json"
            if not saved_file.is_file():
                raise ConfigError(f"{out}: --resume needs a run folder with config.json (none found)")
            saved = json.loads(saved_file.read_text())
            if saved.get("method") != method:
                raise ConfigError(f"{out}: the run used --method {saved.get('method')}, not {method}")
        overrides = list(set_ or [])
        if data:
            overrides.append("data.dirs=" + json.dumps(list(data)))
        if teacher_weights:
            overrides.append(f"model.teacher_weights={teacher_weights}")
        if vae:
            overrides.append(f"model.vae={vae}")
        if base:
            overrides.append(f"yonos.base={base}")
        if val_data:
            overrides.append(f"data.val_dir={val_data}")
        resolved = resolve_config(method, config, overrides, base=saved)
        env = init_distributed(resolved.train.device)
        trainer = Trainer(
            resolved,
            method_for(method),
            out,
            env=env,
            offline=offline,
            lpips_pretrained=not lpips_random_backbone,
            progress=output.show_progress,
            log=output.info if env.is_main else (lambda message: None),
        )
        exported = trainer.run(resume=resume)
        if exported is not None:
            output.info(f"exported {exported} (use: sr1step upscale IMAGE --model {exported})")
