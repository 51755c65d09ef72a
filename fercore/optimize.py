"""Rewrites of a trained network for CPU inference: the same function, computed with fewer, faster ops.

Serving one 48x48 face through the compact CNN is ~95 % convolutions, BatchNorm and ReLU. On a
CPU, PyTorch runs each as a separate pass over the activations, and for a single small image
it picks its generic im2col convolution for the later layers and re-lays out the weights for
oneDNN on every call. :func:`optimize_for_inference` traces the network with ``torch.fx`` and:

1. folds each eval-mode ``BatchNorm2d`` into the convolution before it (exact up to float
   rounding: the BN is an affine map per channel, absorbed into the conv's weight and bias);
2. runs each ``Conv2d`` through oneDNN with its weight reordered once, at load, into oneDNN's
   own layout, with a ReLU that directly follows it fused into the same kernel.

The result is checked against the plain network on random input before it is returned; a
network that cannot be traced, a build without oneDNN, or any disagreement leaves the plain
network in place (in ``channels_last``, which is itself faster on a CPU). Nothing here changes
the checkpoint: the rewrite is redone each time a model is loaded.

Step 2 uses ``torch.ops.mkldnn._convolution_pointwise``, the op TorchInductor's CPU backend
emits for the same purpose: private, hence the check, which turns a change in a future torch
into a logged fallback rather than wrong answers. bf16 is deliberately not used: not every
CPU a container lands on has it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

# Largest difference in any class probability between the rewritten and the plain network that
# still counts as "the same model" when it is checked at load. Rounding alone gives ~1e-6.
CHECK_ATOL = 1e-4
_RELUS = (torch.relu, torch.nn.functional.relu)


@dataclass(frozen=True)
class Optimized:
    """The network to serve, and the rewrites applied to it (empty: the plain network)."""

    model: nn.Module
    applied: tuple[str, ...] = ()
    reason: str = ""  # why the plain network is served, when it is


class OneDNNConv2d(nn.Module):
    """A ``Conv2d`` (BatchNorm already folded in) run by oneDNN, its weight prepacked once,
    optionally with the ReLU that follows it fused. Inference only: the weight is not a parameter."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.padding = list(conv.padding)  # type: ignore[arg-type]  # a str padding is refused by supports_onednn
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.unary = "relu" if relu else "none"
        weight = conv.weight.detach().contiguous()
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, self.padding, self.stride, self.dilation, self.groups)
        # Not persistent: an opaque oneDNN tensor has no place in a state_dict.
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, self.unary, [], ""
        )

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding}, groups={self.groups}, fused={self.unary}"


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN convolution :class:`OneDNNConv2d` needs."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, op) for op in ("_convolution_pointwise", "_reorder_convolution_weight"))
    except RuntimeError:
        return False


def supports_onednn(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and conv.weight.dtype == torch.float32


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return isinstance(_module(gm, node), nn.ReLU)


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that only a ``Conv2d`` feeds into that conv; how many were folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None or bn.running_var is None:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            continue  # the conv's output is used elsewhere too, unnormalised
        conv = _module(gm, source)
        if not isinstance(conv, nn.Conv2d) or conv.training:
            continue
        _set_module(gm, str(source.target), fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def use_onednn_convolutions(gm: fx.GraphModule) -> int:
    """Replace each supported ``Conv2d`` by :class:`OneDNNConv2d`, fusing a ReLU that only it feeds; how many."""
    replaced = 0
    for node in list(gm.graph.nodes):
        conv = _module(gm, node)
        if not isinstance(conv, nn.Conv2d) or not supports_onednn(conv):
            continue
        users = list(node.users)
        relu = len(users) == 1 and _is_relu(gm, users[0])
        if relu:
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
        _set_module(gm, str(node.target), OneDNNConv2d(conv, relu))
        replaced += 1
    return replaced


def max_probability_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """The largest difference between the class probabilities ``a`` and ``b`` give for ``x``."""
    with torch.inference_mode():
        return float((torch.softmax(a(x).float(), dim=1) - torch.softmax(b(x).float(), dim=1)).abs().max())


def optimize_for_inference(model: nn.Module, input_shape: tuple[int, int, int]) -> Optimized:
    """The eval-mode ``model`` rewritten for CPU inference on ``(channels, height, width)`` input in
    ``channels_last``; the plain ``model`` (in ``channels_last``) if it cannot be, with the reason.

    The returned network is for inference only (no gradients, CPU, float32). ``model`` itself is
    left as it is, except for its memory format.
    """
    plain = model.eval().to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, *input_shape), generator=generator).contiguous(memory_format=torch.channels_last)
    try:
        gm = fx.symbolic_trace(copy.deepcopy(plain))
    except Exception as exc:  # data-dependent control flow and the like: fx cannot follow every network
        return Optimized(plain, reason=f"torch.fx cannot trace it ({type(exc).__name__}: {exc})")
    applied = []
    if folded := fold_batchnorm(gm):
        applied.append(f"{folded} BatchNorm folded")
    if onednn_available():
        try:
            if replaced := use_onednn_convolutions(gm):
                applied.append(f"{replaced} oneDNN convolutions")
        except RuntimeError as exc:  # a torch whose private op changed
            return Optimized(plain, reason=f"oneDNN convolutions failed ({exc})")
    if not applied:
        return Optimized(plain, reason="nothing to rewrite")
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms and fused ReLUs
    try:
        difference = max_probability_difference(plain, gm, probe)
    except RuntimeError as exc:
        return Optimized(plain, reason=f"the rewritten network fails ({exc})")
    if not difference <= CHECK_ATOL:  # also catches NaN
        return Optimized(plain, reason=f"the rewritten network differs from the plain one by {difference:.2e}")
    return Optimized(gm.eval(), tuple(applied))
