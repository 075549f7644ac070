"""Structured channel pruning to a MAC budget, on torch-pruning's dependency graph (DepGraph).

    pruned = prune_to_macs(net, (3, 32, 32), target_macs=macs(net, (3, 32, 32)) // 2)
    again = create_model(pruned.architecture, **pruned.kwargs)
    again.load_state_dict(pruned.net.state_dict())          # the same function as pruned.net

Whole output channels leave a convolution together with everything that depends on them (the BatchNorm
after it, the next layer's input channels): the result is a smaller dense net of the same architecture.
Channels are ranked by torch-pruning's group magnitude importance (the L2 norm of every weight a channel
touches, divided by the mean over its layer so that layers compare), across all layers at once. Each step
removes the `round_to` least important channels of the layer whose block ranks lowest, and pruning stops at
the first step within budget. The classifier's outputs and airbench's data-fitted whitening (PCA
directions) are never pruned.

torch-pruning's own BasePruner schedules channel ratios rather than MACs, and silently skips a layer it
would empty (DependencyGraph.check_pruning_group), so it could not say which layer a too-tight budget
breaks; this loop uses the same graph, groups and importance, one block of channels at a time.

A pruned net is only useful if it can be rebuilt from the registry (model.pth holds a state_dict, the card
its kwargs), so only architectures in REBUILD are accepted: adding one is one entry there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.airbench import AirbenchNet, ConvGroup

IMPORTANCE = "magnitude"


class PruneError(ValueError):
    """A budget or model the pruner refuses; the message is one line."""


@dataclass
class Pruned:
    architecture: str                      # the registry name
    net: nn.Module                         # the pruned net, in eval mode, built by the registry
    kwargs: dict                           # create_model(architecture, **kwargs) rebuilds it
    macs_before: int
    macs_after: int
    channels: dict[str, tuple[int, int]]   # prunable layer -> (output channels before, after)
    importance: str                        # what ranked the channels


@dataclass(frozen=True)
class Rebuild:
    """How to rebuild one architecture after pruning."""
    name: str                                                        # its registry name
    kwargs: Callable[[nn.Module, tuple[int, ...]], dict]             # (pruned net, input shape) -> kwargs
    fixed_outputs: Callable[[nn.Module], list[nn.Module]]            # layers whose outputs stay, besides the head


def _airbench_kwargs(net: AirbenchNet, input_shape: tuple[int, ...]) -> dict:
    groups = [m for m in net.features if isinstance(m, ConvGroup)]
    return {"num_classes": net.head.out_features, "in_channels": net.whiten.in_channels,
            "image_size": input_shape[1],
            "widths": [conv.out_channels for g in groups for conv in (g.conv1, g.conv2)],
            "whiten_kernel": net.whiten.kernel_size[0], "bn_momentum": groups[0].norm1.momentum,
            "logit_scale": net.logit_scale}  # the original's, so that the rebuilt net computes the same


REBUILD: dict[type, Rebuild] = {
    AirbenchNet: Rebuild("airbench", _airbench_kwargs, lambda net: [net.whiten]),
}


def macs(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image of shape (C, H, W), without TTA.

    torch's FlopCounterMode, halved: the same count as training.pipeline.count_flops (2 FLOPs a MAC);
    convolutions and matrix products only (no BatchNorm, activations or pooling)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros((1, *input_shape), device=_device(net)))
    finally:
        net.train(was_training)
    return int(counter.get_total_flops()) // 2


def prune_to_macs(net: nn.Module, input_shape: tuple[int, ...], target_macs: int, *, round_to: int = 8,
                  min_channels: int = 8, log: Callable[[str], None] = print) -> Pruned:
    """A copy of `net` with output channels removed until one image costs at most `target_macs` MACs.

    Layers are cut `round_to` channels at a time (the first cut of a layer whose width is not a multiple
    of round_to brings it to one). Raises PruneError, leaving `net` as it was, for a budget <= 0 or not
    below the net's MACs, for one that would leave a layer below `min_channels`, and for an architecture
    that cannot be rebuilt from its kwargs or traced."""
    rebuild = REBUILD.get(type(net))
    if rebuild is None:
        raise PruneError(f"cannot prune a {type(net).__name__}: only {', '.join(r.name for r in REBUILD.values())} "
                         f"can be rebuilt from its kwargs after pruning")
    if round_to < 1 or min_channels < 1:
        raise PruneError(f"round_to and min_channels must be >= 1, got {round_to} and {min_channels}")
    input_shape = tuple(input_shape)
    before = macs(net, input_shape)
    if target_macs <= 0:
        raise PruneError(f"target_macs must be positive, got {target_macs:,}")
    if target_macs >= before:
        raise PruneError(f"nothing to prune: {rebuild.name} already takes {before:,} MACs, within the "
                         f"target of {target_macs:,}")

    work = copy.deepcopy(net).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((1, *input_shape), generator=generator).to(_device(work))
    fixed = [_classifier(work), *rebuild.fixed_outputs(work)]
    try:
        graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)
    except Exception as e:  # torch-pruning's tracer raises whatever the model makes it raise
        raise PruneError(f"torch-pruning cannot trace {rebuild.name}: {_first_line(e)}") from None
    names = {m: n for n, m in work.named_modules()}
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    prunable = [g[0].dep.target.module for g in _groups(graph, fixed)]
    width_before = {m: graph.get_out_channels(m) for m in prunable}
    if not width_before:
        raise PruneError(f"{rebuild.name} has no prunable layer")

    now, steps = before, 0
    while now > target_macs:
        candidates = []   # (mean importance of the block, layer, its pruning function, block, channels kept)
        for group in _groups(graph, fixed):
            scores = importance(group)
            if scores is None:  # no weights in the group to rank by
                continue
            n = len(scores) % round_to or round_to
            lowest = torch.argsort(scores)[:n]
            dep = group[0].dep
            candidates.append((scores[lowest].mean().item(), dep.target.module, dep.handler,
                               lowest.tolist(), len(scores) - n))
        if not candidates:
            raise PruneError(f"torch-pruning found no channel of {rebuild.name} it can rank")
        _, layer, prune_fn, block, kept = min(candidates, key=lambda c: c[0])
        if kept < min_channels:
            raise PruneError(f"a budget of {target_macs:,} MACs would leave {names[layer]} with {kept} channels "
                             f"(min_channels {min_channels}); the pruner got to {now:,} MACs before that")
        graph.get_pruning_group(layer, prune_fn, block).prune()
        now, steps = macs(work, input_shape), steps + 1

    kwargs = rebuild.kwargs(work, input_shape)
    pruned = _rebuilt(rebuild.name, kwargs, work, input_shape)
    after = macs(pruned, input_shape)
    channels = {names[m]: (width, graph.get_out_channels(m)) for m, width in width_before.items()}
    log(f"pruned {rebuild.name}: {before:,} -> {after:,} MACs (target {target_macs:,}) in {steps} steps of "
        f"{round_to} channels by {IMPORTANCE}; "
        + ", ".join(f"{k} {a}->{b}" for k, (a, b) in channels.items() if a != b))
    return Pruned(rebuild.name, pruned, kwargs, before, after, channels, IMPORTANCE)


def _groups(graph: tp.DependencyGraph, fixed: list[nn.Module]) -> list:
    """Every group rooted at a layer's output channels, except the fixed layers' (the graph's current state)."""
    return list(graph.get_all_groups(ignored_layers=fixed, root_module_types=[nn.Conv2d, nn.Linear]))


def _rebuilt(name: str, kwargs: dict, work: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The registry's net with `work`'s weights, checked to compute what `work` computes."""
    net = create_model(name, seed=0, **kwargs).to(_device(work)).eval()  # seed: leave the global RNG alone
    try:
        net.load_state_dict(work.state_dict())
    except RuntimeError as e:
        raise PruneError(f"{name} rebuilt from {kwargs} does not take the pruned weights: "
                         f"{_first_line(e)}") from None
    x = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(1)).to(_device(work))
    with torch.no_grad():
        want, got = work(x), net(x)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise PruneError(f"{name} rebuilt from {kwargs} computes other logits than the pruned net "
                         f"(max |diff| {(got - want).abs().max().item():.3g})")
    return net


def _classifier(net: nn.Module) -> nn.Module:
    if hasattr(net, "get_classifier"):
        return net.get_classifier()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PruneError(f"{type(net).__name__} has no classifier (get_classifier() or an nn.Linear)")
    return linears[-1]


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
