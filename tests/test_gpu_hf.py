"""pymoe.hf on the GPU: MoELayer(device="gpu") built by from_hf against each transformers
block of tests/hf_cases.py (float32 and bfloat16), and a patched model on CUDA against the
unpatched one. Skipped where MAX sees no GPU or PyTorch has no CUDA."""

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, gpu_fp32_tol, rel_err, routing_near_ties
from hf_cases import CASES, hf_block, hf_lm
from max.driver import accelerator_count

from pymoe import MoELayer
from pymoe import reference as R
from pymoe.hf import PymoeBlock, from_hf, patch

pytestmark = pytest.mark.skipif(accelerator_count() == 0 or not torch.cuda.is_available(),
                                reason="needs a GPU seen by MAX and by PyTorch (CUDA)")


def _seed(rng) -> int:
    return int(rng.integers(2**31))


def _block_out(block, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x.shape[-1]).double().cpu().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_layer_float32_matches_block(rng, name):
    block = hf_block(name, seed=_seed(rng))
    config, weights = from_hf(block)
    layer = MoELayer(config, weights, device="gpu")
    for tokens in (1, 41, 300):
        x = torch.from_numpy(rng.standard_normal((1, tokens, config.d_model), dtype=np.float32))
        out = layer(x[0].numpy())
        ties = routing_near_ties(x[0].numpy(), weights, config)
        assert ties.mean() < 0.2
        assert rel_err(out[~ties], _block_out(block, x)[~ties]) < gpu_fp32_tol(config)
        ref = R.moe_layer(x[0].numpy(), weights, config).out
        assert rel_err(out[~ties], ref[~ties]) < gpu_fp32_tol(config)


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_layer_bfloat16_matches_block(rng, name):
    """bf16 layer (CUDA tensors in and out) against the bf16 block and the reference on
    the same bf16 weights and tokens; near-ties at bf16's resolution may route differently."""
    block = hf_block(name, seed=_seed(rng)).to(torch.bfloat16)
    config, weights = from_hf(block)  # exact: every bf16 value is a float32
    layer = MoELayer(config, weights, device="gpu", dtype="bfloat16")
    x = torch.from_numpy(rng.standard_normal((1, 300, config.d_model), dtype=np.float32)).bfloat16()
    out = layer(x[0].cuda())
    assert out.is_cuda and out.dtype == torch.bfloat16
    out = out.double().cpu().numpy()
    x32 = x[0].float().numpy()
    ties = routing_near_ties(x32, weights, config, gap=2e-3)
    assert ties.mean() < 0.3
    for expected in (R.moe_layer(x32, weights, config).out, _block_out(block, x)):
        per_token = np.linalg.norm(out - expected, axis=1) / np.linalg.norm(expected, axis=1)
        assert np.median(per_token) < BF16_TOL
        assert (per_token[~ties] < 2 * BF16_TOL).mean() > 0.99


@pytest.mark.parametrize("name", ["qwen3-moe", "deepseek-v3", "gpt-oss", "llama4"])
def test_gpu_patched_model_matches(name):
    """A float32 model on CUDA, patched (its blocks run on MAX's GPU), against itself
    unpatched: logits and greedy generation."""
    model = hf_lm(name, seed=1).cuda()
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected = model(ids).logits
    expected_tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert patch(model) == 2
    assert all(m.device_name == "gpu" and m.dtype_name == "float32"
               for m in model.modules() if isinstance(m, PymoeBlock))
    with torch.inference_mode():
        got = model(ids).logits
    assert got.is_cuda
    assert rel_err(got.cpu().numpy(), expected.cpu().numpy()) < 1e-4
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected_tokens)


def test_gpu_patched_bfloat16_model_runs_on_pymoe(rng):
    """A bf16 model on CUDA: the patched blocks run in bf16 on the GPU; logits agree with
    the unpatched model's to bf16 accuracy (routing near-ties aside, hence the median)."""
    model = hf_lm("qwen3-moe", seed=1).cuda().to(torch.bfloat16)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()
    assert patch(model) == 2
    assert all(m.dtype_name == "bfloat16" for m in model.modules() if isinstance(m, PymoeBlock))
    with torch.inference_mode():
        got = model(ids).logits.float()
    per_token = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert per_token.median().item() < 2 * BF16_TOL
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 14)

