"""Every graph the ``trt`` backend consumes, exported at ImageNet shapes, holds only what TensorRT 10's ONNX parser
accepts (checked on CPU: TensorRT itself is not installable here).

The allow-list is the set of operators marked supported in onnx-tensorrt's ``docs/operators.md`` for TensorRT 10
(the "ONNX-TensorRT 10.1 GA release" revision, which states opsets 9 to 20), with the restrictions that concern
these models: ``Resize`` only in ``nearest``/``linear`` mode, with a supported coordinate transformation and no
antialiasing.
"""

from __future__ import annotations

import onnx
import pytest
import torch

from cao2_fast.engines.onnx_ort import export_onnx
from cao2_fast.engines.specs import stage1_specs
from cao2_fast.models.dit import DiTConfig, random_dit
from cao2_fast.models.random import random_classifier
from cao2_fast.models.vae import VAE
from cao2_fast.generators.dit import DiTGenerator

TRT10_SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
OPSETS = range(9, 21)


def problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT 10's parser would refuse in ``model`` (nodes of the graph, its subgraphs and local functions)."""
    out = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in OPSETS:
        out.append(f"opset {opset} outside {OPSETS.start}..{OPSETS.stop - 1}")
    local = {(f.domain, f.name) for f in model.functions}

    def walk(nodes):
        for n in nodes:
            if (n.domain, n.op_type) in local:
                continue  # a local function: its body is walked below
            if n.domain not in ("", "ai.onnx"):
                out.append(f"{n.op_type} in custom domain {n.domain!r}")
            elif n.op_type not in TRT10_SUPPORTED:
                out.append(f"unsupported operator {n.op_type}")
            if n.op_type == "Resize":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                if attrs.get("antialias", 0):
                    out.append("Resize with antialias=1")
                mode = attrs.get("mode", b"nearest")
                mode = mode.decode() if isinstance(mode, bytes) else mode
                coord = attrs.get("coordinate_transformation_mode", b"half_pixel")
                coord = coord.decode() if isinstance(coord, bytes) else coord
                if mode not in RESIZE_MODES or coord not in RESIZE_COORDS:
                    out.append(f"Resize mode {mode}/{coord}")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return out


@pytest.fixture(scope="module")
def imagenet_specs():
    """Tiny random weights at the real shapes: latent 4×32×32, a ×8 VAE (→ 256 px), a classifier at 224."""
    from diffusers import AutoencoderKL

    dit = random_dit(DiTConfig(input_size=32, hidden_size=32, depth=1, num_heads=2, num_classes=10))
    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                       block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    ae.requires_grad_(False)
    vae = VAE(ae.eval(), 0.18215).eval()
    clf = random_classifier("test_resnet", num_classes=10, input_size=224)
    return stage1_specs(DiTGenerator(dit, vae), clf)


def test_the_specs_have_imagenet_shapes(imagenet_specs):
    assert imagenet_specs["dit"].inputs[0].shape == (4, 32, 32)
    assert imagenet_specs["vae_decode"].inputs[0].shape == (4, 32, 32)
    assert imagenet_specs["classifier"].inputs[0].shape == (3, 224, 224)  # its own size: 256 px is resized in torch


@pytest.mark.parametrize("name", ["dit", "vae_decode", "classifier"])
def test_exported_graphs_hold_only_what_tensorrt_10_parses(imagenet_specs, tmp_path, name):
    spec = imagenet_specs[name]
    export_onnx(spec, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert problems(model) == []


def test_the_checker_catches_an_antialiased_resize(tmp_path):
    """The construct that broke the ImageNet classifier engine: an antialiased 256 → 224 resize inside the graph."""
    from cao2_fast.engines.specs import ModelSpec, TensorSpec

    class Shrink(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)

    export_onnx(ModelSpec("shrink", Shrink(), (TensorSpec("x", (3, 256, 256)),), "y"), tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert "Resize with antialias=1" in problems(model)


def test_the_engine_resizes_in_torch_and_equals_the_classifier(imagenet_specs, tmp_path):
    from cao2_fast.engines import EngineCache, build_engine

    spec = imagenet_specs["classifier"]
    engine = build_engine("onnx", spec, "cpu", cache=EngineCache(tmp_path))
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        want = spec.module.classifier(images)  # the eager classifier: resize (antialiased) + network
    torch.testing.assert_close(engine(images), want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mar_base_specs():
    """MAR's two engines at mar_base's shapes (256 tokens of 16 channels, a 64-row buffer) with tiny widths."""
    from cao2_fast.generators.mar import head_spec, mae_spec
    from cao2_fast.models.mar import MARConfig, random_mar

    mar = random_mar(MARConfig(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, buffer_size=64,
                               encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2, diffloss_d=1, diffloss_w=16)).eval()
    return {"mar_mae": mae_spec(mar), "mar_head": head_spec(mar)}


@pytest.mark.parametrize("name", ["mar_mae", "mar_head"])
def test_mar_graphs_hold_only_what_tensorrt_10_parses(mar_base_specs, tmp_path, name):
    spec = mar_base_specs[name]
    assert spec.inputs[0].shape == ((256, 16) if name == "mar_mae" else (16,))
    export_onnx(spec, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert problems(model) == []
