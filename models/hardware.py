"""What the machine's hardware allows: bf16 on AMX CPUs, fp16/bf16 on GPUs, and the matching autocast."""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path
from typing import Literal

Amp = Literal["auto", "off", "bf16", "fp16"]


@cache
def cpu_has_amx() -> bool:
    """bf16 autocast pays off on CPUs with AMX (about 2× here, measured); elsewhere it can be slower."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast(device, amp: Amp = "auto"):
    """The autocast context for ``device`` (a ``torch.device`` or its type string) under ``amp``.

    ``auto``: bf16 on GPUs and on AMX CPUs, full precision on other CPUs. ``fp16`` needs a
    ``GradScaler`` when training (the training loop makes one).
    """
    import torch

    kind = getattr(device, "type", device)
    if amp == "off" or (kind == "cpu" and amp == "fp16"):
        return contextlib.nullcontext()
    if kind == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    if amp == "bf16" or (amp == "auto" and cpu_has_amx()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
