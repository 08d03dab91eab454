"""ONNX export: one graph, dynamic batch and image size, same features as PyTorch under onnxruntime."""

from __future__ import annotations

import pytest
import torch

from components.model import build_backbone, export_onnx

ort = pytest.importorskip("onnxruntime")


def _check(model, path, sizes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    names = [o.name for o in session.get_outputs()]
    model.eval()
    for batch, (H, W) in sizes:
        x = torch.randn(batch, 3, H, W)
        outputs = dict(zip(names, session.run(None, {"images": x.numpy()}), strict=True))
        with torch.no_grad():
            ref = model.forward_features(x)
        for name in names:
            torch.testing.assert_close(torch.from_numpy(outputs[name]), ref[name], atol=1e-4, rtol=1e-4)
        assert outputs["x_norm_patchtokens"].shape == (batch, (H // 14) * (W // 14), model.embed_dim)


def test_onnx_parity_dynamic_batch_and_size(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_test", layerscale_init=0.5)  # a visible residual path
    path = export_onnx(model, tmp_path / "vit_test.onnx", example_size=(56, 70))
    assert model.training  # the caller's model is left as it was
    # the traced size, another batch and non-square size, and the learned 37 x 37 grid (no resize in PyTorch)
    _check(model, path, [(2, (56, 70)), (1, (224, 224)), (3, (98, 154)), (1, (518, 518))])


@pytest.mark.slow
def test_onnx_parity_register_model(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=4, ffn_layer="swiglu", layerscale_init=0.5)
    path = export_onnx(model, tmp_path / "vit_test_reg.onnx")
    _check(model, path, [(2, (224, 224)), (1, (112, 168)), (1, (518, 518))])
