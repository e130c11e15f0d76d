"""CNNs registered as exported programs (``torch.export``, MLflow's pickle-free "pt2" format), made explainable.

An exported program is a flat graph of ATen operations: its layers are not Python modules, so the forward hook
that reads the input of the final ``nn.Linear`` from an eager CNN never fires. The same features are read from
the graph itself: :class:`ExportedCNN` copies the program's graph and adds the input of its *last* ``linear``
operation as an extra output, which is exactly the tensor the eager CNN's final Linear receives (tested to
1e-5 against the eager model). The graph runs as-is: nothing is traced again and no Python code comes with it.

A program exported with a fixed batch size (e.g. from a one-image example) is run in chunks of that size, the
last chunk padded and the padding dropped, so the explainer can feed any number of images.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

LINEAR_OPS = (torch.ops.aten.linear.default,)


class ExportedCNN(nn.Module):
    """An exported program as an ``nn.Module``: ``forward(x)`` gives its outputs, ``final_linear_input(x)`` the
    input of its last linear operation (what :func:`models.features.extract_features` reads by default)."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        module = program.module()
        self.graph_module = _with_features_output(module)
        self.batch_size = _static_batch_size(module)           # None: any batch size

    @property
    def exported(self) -> bool:
        return True

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size
        if b is None or len(x) == b:
            return self._run_exact(x)
        parts = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            n = len(chunk)
            if n < b:                                       # pad with copies of the last image, dropped below
                chunk = torch.cat([chunk, chunk[-1:].expand(b - n, *chunk.shape[1:])])
            feats, out = self._run_exact(chunk)
            parts.append((feats[:n], out[:n]))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _run_exact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, outputs) of one batch the program accepts; several outputs are concatenated per image."""
        feats, *outs = self.graph_module(x)
        return feats, outs[0] if len(outs) == 1 else torch.cat([o.reshape(len(x), -1) for o in outs], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[1]

    def final_linear_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]

    def train(self, mode: bool = True) -> "ExportedCNN":
        """An exported program is frozen in the mode it was exported in (``torch.export`` refuses train/eval)."""
        self.training = mode
        return self


def _with_features_output(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the program's graph module that returns (input of the last linear op, *original outputs)."""
    gm = copy.deepcopy(module)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS]
    if not linears:
        raise ValueError("the exported program has no linear operation: FIGAN explains the input of a CNN's final "
                         "Linear layer, and this program has none")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0]
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    output.args = ((linears[-1].args[0], *outs),)
    gm.graph._codegen = fx.graph.CodeGen()          # flat inputs/outputs instead of the program's pytree specs
    gm.graph.eliminate_dead_code()
    return fx.GraphModule(gm, gm.graph)


def _static_batch_size(module: fx.GraphModule) -> int | None:
    """The batch size an exported program was specialised to, or None when its batch dimension is dynamic."""
    for node in module.graph.nodes:
        if node.op == "placeholder" and "val" in node.meta and hasattr(node.meta["val"], "shape"):
            dim = node.meta["val"].shape[0]
            return int(dim) if isinstance(dim, int) else None
    return None
