"""``model_update``: ||F(x, θ_t) − F(x, θ_0)|| on a fixed probe batch (DeepNet, Wang et al.
2022), and ``model_update_rel`` = that divided by ||F(x, θ_0)|| (module ``__run__``).

DeepNet bounds the model update of a well-initialised network; Post-LN's grows sharply in the
first steps. It costs one extra forward pass per recorded step, so it is on in the ``full``
preset and opt-in elsewhere. The probe forward runs in eval mode (no dropout, batch-norm
running statistics untouched) under ``no_grad``, every submodule's mode, the RNG states and
the buffers given back after it (``side_forward``), and the other probes are paused, so
training is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..record.collector import Collector
from ..record.config import RecorderConfig
from ..record.hooks import ListenerHooks, ModuleHooks, paused
from ..record.module_table import scripted
from ..record.side_forward import side_forward
from .base import BaseProbe, ProbeContext, switched
from .logits import output_logits


class ModelUpdateProbe(BaseProbe):
    structure_aware = False  # on with the full preset or model_update=True
    needs_forward = True

    @classmethod
    def wanted(cls, config: RecorderConfig, tier: str) -> bool:
        return switched(config.model_update, config, tier)

    @classmethod
    def build(cls, ctx: ProbeContext) -> ModelUpdateProbe | None:
        if ctx.forward is None:
            ctx.notes.append(
                "model_update needs a probe forward (Recorder(forward=...)); not recorded"
            )
            return None
        return cls(ctx.model, ctx.forward, ctx.run_code, [ctx.listeners, ctx.module_hooks])

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[nn.Module], Any],
        run_code: int,
        pause: list[ListenerHooks | ModuleHooks],
    ) -> None:
        self.model = model
        self.forward = forward
        self.run_code = run_code
        self.pause = pause
        self.reference: torch.Tensor | None = None

    def output(self) -> torch.Tensor | None:
        if scripted(self.model):
            return None  # a scripted root refuses the hook that reads its output
        captured: list[torch.Tensor] = []
        handle = self.model.register_forward_hook(
            lambda m, a, o: captured.append(output_logits(o) if output_logits(o) is not None else o)
        )
        try:
            with paused(*self.pause), side_forward(self.model), torch.no_grad():
                self.forward(self.model)
        finally:
            handle.remove()
        out = captured[0] if captured else None
        return out.detach().float() if isinstance(out, torch.Tensor) else None

    def start(self) -> None:
        """Keep F(x, θ_0); call before the first optimizer step."""
        self.reference = self.output()

    def end_step(self, collector: Collector) -> None:
        if self.reference is None:
            return
        current = self.output()
        if current is None or current.shape != self.reference.shape:
            return
        delta = torch.linalg.vector_norm(current - self.reference)
        base = torch.linalg.vector_norm(self.reference)
        code = self.run_code

        def decode(v, rows) -> None:  # type: ignore[no-untyped-def]
            rows.emit("train", code, 0, "model_update", v[0])
            rows.emit("train", code, 0, "model_update_rel", v[0] / v[1] if v[1] > 0 else 0.0)

        collector.add(torch.stack((delta, base)), decode)
