"""The CUDA-only paths of the twin (side-stream double buffering, pinned expert stores,
bitsandbytes NF4, the host-RAM embedding). They run only where a GPU is present."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_streamed_experts_on_the_gpu_equal_the_in_model_layer(tiny):
    from cuda_backend import moe

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny("llama4"),
                                                                      dtype=torch.float32)  # fmt: skip
    layer = next(m for m in model.modules() if m.__class__.__name__ == "Llama4TextMoe")
    store = moe.ExpertStore(layer.experts.gate_up_proj, layer.experts.down_proj, 2, False)
    assert store.gate_up[0].is_pinned()
    inline, streamed = moe.SparseMoe(layer).cuda(), moe.SparseMoe(layer, store).cuda()
    x = torch.randn(2, 64, layer.hidden_dim, device="cuda", requires_grad=True)
    want, _ = inline(x)
    got, _ = streamed(x)
    g = torch.randn_like(want)
    (dx_want,) = torch.autograd.grad(want, x, g)
    (dx_got,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx_got, dx_want, atol=1e-5, rtol=0)


def test_the_24_gb_recipe_shape_trains_on_the_gpu(tiny, tmp_path):
    from conftest import run_overrides

    from cuda_backend import trainer
    from mlxtune.config import load_config

    cfg = load_config(None, run_overrides(tiny("llama4"), tmp_path / "run", "model.backend=cuda",
                                          "model.quantize=4", "model.offload_experts=true",
                                          "model.dtype=bfloat16", "train.grad_checkpoint=true",
                                          "train.offload_checkpoints=true"))  # fmt: skip
    run_dir = trainer.train(cfg, echo=lambda line: None)
    assert (run_dir / "adapter_model.safetensors").is_file()
