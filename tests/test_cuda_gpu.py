"""The CUDA-only paths of the twin (side-stream streaming ordered by events, exactly page-locked
expert blocks and host arena, bitsandbytes NF4, the host-RAM embedding, the GPU's RNG in
checkpoints). They run only where a GPU is present: `benchmarks/gpu_check.py` runs them."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "nf4"])
def test_streamed_experts_on_the_gpu_equal_the_resident_block(tiny, quantize):
    """The same store read in place on the GPU and streamed from page-locked host memory
    through the two event-ordered buffers: equal outputs and input gradients."""
    from cuda_backend import assemble, moe

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny("llama4"),
                                                                      dtype=torch.float32)  # fmt: skip
    layer = next(m for m in model.modules() if m.__class__.__name__ == "Llama4TextMoe")
    host = moe.ExpertStore.from_tensors(layer.experts.gate_up_proj, layer.experts.down_proj, 2,
                                        quantize)  # fmt: skip
    streamed = moe.ExpertStore(assemble.PinnedBlock(host.block).tensor, host.layout, 1,
                               moe.Streamer(torch.device("cuda"), host.stride))  # fmt: skip
    resident = moe.ExpertStore(host.block.cuda(), host.layout, 2)
    assert streamed.block.is_pinned() and streamed.block.numel() == host.block.numel()
    x = torch.randn(2, 64, layer.hidden_dim, device="cuda", requires_grad=True)
    g = torch.randn(2, 64, layer.hidden_dim, device="cuda")
    results = []
    for store in (resident, streamed):
        out, _ = moe.SparseMoe(layer, store).cuda()(x)
        (dx,) = torch.autograd.grad(out, x, g)
        results.append((out, dx))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=0, rtol=0)
    assert streamed.streamer.copied == 2 * host.block.numel()  # forward and backward


def test_bitsandbytes_dequantizes_our_bytes_on_the_gpu_as_we_do_on_the_cpu():
    from cuda_backend import nf4

    w = torch.randn(512, 768, dtype=torch.bfloat16) * 0.02
    packed = nf4.quantize(w)
    on_gpu = nf4.dequantize(packed.to("cuda"))  # bitsandbytes' kernel
    torch.testing.assert_close(on_gpu.cpu(), nf4.dequantize(packed), atol=0, rtol=0)
    layer = nf4.linear4bit(packed.to("cuda"))
    assert type(layer).__name__ == "Linear4bit"
    x = torch.randn(3, 768, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(layer(x), x @ on_gpu.T, atol=2e-2, rtol=2e-2)


def _losses(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_the_24_gb_recipe_shape_trains_and_resumes_exactly_on_the_gpu(tiny, tmp_path):
    """Prepared copy, NF4 via bitsandbytes, streamed experts, offloaded checkpoints, dropout on
    the GPU: a run stopped at step 3 and resumed gives the same curve as a straight run (the
    GPU's RNG state is in the checkpoint)."""
    from conftest import run_overrides

    from cuda_backend import trainer
    from mlxtune.config import load_config

    sets = ("model.backend=cuda", "model.quantize=4", "model.offload_experts=true",
            "model.expert_chunk=2", "model.dtype=bfloat16", "train.grad_checkpoint=true",
            "train.offload_checkpoints=true", "lora.dropout=0.1", "train.save_every=3",
            "train.lr_schedule=constant", f"model.prepared_dir={tmp_path / 'p'}")  # fmt: skip
    straight = trainer.train(load_config(None, run_overrides(tiny("llama4"), tmp_path / "a",
                                                             *sets, "train.iters=6")),
                             echo=lambda line: None)  # fmt: skip
    stopped = trainer.train(load_config(None, run_overrides(tiny("llama4"), tmp_path / "b",
                                                            *sets, "train.iters=3")),
                            echo=lambda line: None)  # fmt: skip
    resumed = load_config(stopped / "config.yaml", [f"output.dir={stopped}", "train.iters=6"])
    trainer.train(resumed, resume=True, echo=lambda line: None)
    assert _losses(stopped) == pytest.approx(_losses(straight), rel=1e-5)
    assert (straight / "adapter_model.safetensors").is_file()
