"""What the ResShift-family methods (RSD, TAD-SR) share: the student's EMA export as a self-describing checkpoint,
validation through the one pipeline, and the state plumbing for exact resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sr1step.checkpoints import InferenceSpec, export_safetensors
from sr1step.distill.trainer import TrainContext, unwrap


class ResShiftStudentMethod:
    """Base of a method whose product is a one-step ResShift student kept as an EMA (``self.ema``)."""

    name: str
    ema: nn.Module

    def state_parts(self) -> dict[str, Any]:
        """Everything an exact resume needs, by name: modules, optimizers, schedulers."""
        raise NotImplementedError

    def export_metadata(self) -> dict[str, str]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.state_parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.state_parts().items():
            part.load_state_dict(state[name])

    def inference_spec(self, ctx: TrainContext) -> InferenceSpec:
        """Official one-step semantics: t = T−1, z_T = z_y + κ·sqrt(η_T)·ε, LR tile as lq, quantized decode."""
        return InferenceSpec(
            family=self.name,
            steps=1,
            scale=ctx.config.model.scale,
            lq_mode="lr",
            prior_noise_scale="kappa_sqrt_eta",
            decode_quantize=True,
            vae=ctx.config.model.vae,
        )

    def eval_upscaler(self, ctx: TrainContext) -> Any:
        return ctx.upscaler_for(self.ema, self.inference_spec(ctx))

    def export(self, ctx: TrainContext, path: Path, step: int) -> Path:
        metadata = {"method": self.name, "step": str(step), "teacher": ctx.config.model.teacher_weights}
        metadata.update(self.export_metadata())
        return export_safetensors(unwrap(self.ema), path, self.inference_spec(ctx), metadata)
