"""``sr1step distill``: distil one-step students (RSD, TAD-SR) from ResShift, and YONOS-SR scale distillation.

* :mod:`config` — every hyper-parameter in one typed tree (method defaults, file, ``--set``);
* :mod:`data`, :mod:`degradations` — HR folders, Real-ESRGAN degradation on the device, resumable sampling;
* :mod:`trainer` — the shared loop (DDP, accumulation, checkpoints, validation, logging, export);
* :mod:`rsd`, :mod:`tadsr`, :mod:`yonos` — the methods, each a plug-in of the trainer;
* :mod:`losses`, :mod:`lpips` — loss terms.
"""

from __future__ import annotations


def method_for(name: str):  # noqa: ANN201 - a DistillMethod
    """A fresh method plug-in by name."""
    from sr1step.errors import ConfigError

    if name == "rsd":
        from sr1step.distill.rsd import RSDMethod

        return RSDMethod()
    if name == "tad-sr":
        from sr1step.distill.tadsr import TADSRMethod

        return TADSRMethod()
    if name == "yonos-sr":
        from sr1step.distill.yonos import YonosMethod

        return YonosMethod()
    raise ConfigError(f"unknown distillation method {name!r}; choose from rsd, tad-sr, yonos-sr")
