"""`scoretrain export --to FILE.onnx`: the subnetwork as a standard ONNX model (opset 17), built
from what export.arrays() writes (the masked weights, the layer list, the BatchNorm statistics
and the input standardization), so that onnxruntime, TensorRT or any other ONNX runtime runs it
without scoretrain.

The graph's input `images` is float32 [N, H, W, C], the pixels scaled to [0, 1] (pixels / 255),
channels last as scoretrain reads them; the standardization happens inside the graph, then a
transpose to ONNX's channels-first layout. Its output `logits` is float32 [N, classes]. Masked
weights are plain initializers (the pruned ones zeros); a Flatten goes back to channels last
first, so the linear layers see the order they were trained on. The layer list and the run's
info are in the model's metadata (`architecture`, `info`, `input`).

Needs the `onnx` package (`pip install 'scoretrain[onnx]'`, which also brings onnxruntime).
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import ScoretrainError

OPSET = 17
IR_VERSION = 8  # opset 17's: read by onnxruntime >= 1.13


def model_bytes(out: dict[str, np.ndarray]) -> bytes:
    """The serialized ModelProto of export.arrays()'s `out`."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ScoretrainError("export to .onnx needs the onnx package: pip install 'scoretrain[onnx]'") from None

    nodes, inits, names = [], [], iter(range(10**9))

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def op(kind: str, inputs: list[str], **attrs) -> str:
        name = f"{kind.lower()}_{next(names)}"
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def layer(spec: dict, x: str, layout: str) -> tuple[str, str]:
        kind = spec["type"]
        if kind == "linear":
            return op("Gemm", [x, const(spec["weight"], out[spec["weight"]])], transB=1), layout  # x @ W.T
        if kind == "conv":
            w = out[spec["weight"]]  # [out, kh, kw, in] -> ONNX's [out, in, kh, kw]
            p = w.shape[1] // 2 if spec["padding"] == "same" else int(spec["padding"])
            return op("Conv", [x, const(spec["weight"], w.transpose(0, 3, 1, 2))], kernel_shape=list(w.shape[1:3]),
                      pads=[p] * 4, strides=[spec["stride"]] * 2), layout
        if kind == "relu":
            return op("Relu", [x]), layout
        if kind == "batchnorm":
            state = out[spec["state"]]  # [mean, var] or [mean, var, gamma, beta]
            c = state.shape[1]
            gamma, beta = (state[2], state[3]) if spec["affine"] else (np.ones(c), np.zeros(c))
            s = spec["state"]
            return op("BatchNormalization", [x, const(f"{s}_gamma", gamma), const(f"{s}_beta", beta), const(f"{s}_mean", state[0]),
                                             const(f"{s}_var", state[1])], epsilon=float(spec["eps"])), layout
        if kind in ("maxpool", "avgpool"):
            pool = "MaxPool" if kind == "maxpool" else "AveragePool"
            return op(pool, [x], kernel_shape=[spec["size"]] * 2, strides=[spec["stride"]] * 2), layout
        if kind == "global_avg_pool":
            return op("Flatten", [op("GlobalAveragePool", [x])], axis=1), "flat"
        if kind == "flatten":  # in scoretrain's channels-last order
            return op("Flatten", [op("Transpose", [x], perm=[0, 2, 3, 1]) if layout == "nchw" else x], axis=1), "flat"
        if kind == "residual":
            main, _ = layers(spec["main"], x, layout)
            short = x if spec["shortcut"] == "identity" else layers(spec["shortcut"], x, layout)[0]
            return op("Relu", [op("Add", [main, short])]), layout
        raise ScoretrainError(f"export to .onnx: a layer of type {kind!r} has no ONNX form here")

    def layers(specs: list, x: str, layout: str) -> tuple[str, str]:
        for spec in specs:
            x, layout = layer(spec, x, layout)
        return x, layout

    h, w, c = (int(v) for v in out["image_shape"])
    x = op("Sub", ["images", const("input_mean", out["input_mean"].reshape(1, 1, 1, -1))])
    x = op("Div", [x, const("input_std", out["input_std"].reshape(1, 1, 1, -1))])
    x, _ = layers(json.loads(str(out["architecture"])), op("Transpose", [x], perm=[0, 3, 1, 2]), "nchw")
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(nodes, "scoretrain_subnetwork",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", h, w, c])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", int(out["n_classes"])])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="scoretrain")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"architecture": str(out["architecture"]), "info": str(out["info"]),
                                   "input": "images: float32 [N, H, W, C], pixels / 255; standardized inside the graph"})
    onnx.checker.check_model(model)
    return model.SerializeToString()
