"""Engine on CUDA: decode captured in CUDA graphs gives the eager outputs, the cache is sized from a memory
fraction, and MLA / GQA tiny presets generate with graphs on (skipped without a GPU)."""

import pytest
import torch

from model.engine import LLM, SamplingParams
from model.modeling import MoEForCausalLM

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["tiny-v2", "tiny-qwen3"])
def model(request):
    torch.manual_seed(0)
    m = MoEForCausalLM.from_preset(request.param, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        for name, p in m.named_parameters():  # decisive routing and argmax
            if "norm" not in name:
                p.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.1)
    return m


def prompts(k=6, V=128):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (k,), generator=g)]


def test_cuda_graph_decode_matches_eager(model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    eager = LLM(model, num_blocks=128, block_size=16, max_num_seqs=8, enforce_eager=True)
    graph = LLM(model, num_blocks=128, block_size=16, max_num_seqs=8)
    assert eager.runner.graphs == {}
    sizes = sorted({k[0] for k in graph.runner.graphs})
    assert sizes == [1, 2, 4, 8], f"capture failed: {graph.runner.capture_error}"
    a = eager.generate(prompts(), params, use_tqdm=False)
    b = graph.generate(prompts(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.outputs[0].token_logprobs), torch.tensor(y.outputs[0].token_logprobs),
                                   atol=1e-4, rtol=1e-4)
    assert graph.block_manager.check_all_free()


def test_seeded_sampling_on_gpu_is_reproducible(model):
    llm = LLM(model, num_blocks=128, block_size=16, max_num_seqs=16)
    p = SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=20, max_tokens=16, seed=5, ignore_eos=True)
    one = llm.generate([[3, 4, 5]], p, use_tqdm=False)[0]
    two = llm.generate(prompts(3) + [[3, 4, 5]], [SamplingParams(max_tokens=8)] * 3 + [p], use_tqdm=False)[3]
    assert [c.token_ids for c in one.outputs] == [c.token_ids for c in two.outputs]


def test_memory_fraction_sizing(model):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.synchronize()
    frac = (torch.cuda.memory_allocated() + 2 * 2**30) / total       # leave the engine ~2 GiB
    llm = LLM(model, gpu_memory_fraction=frac, block_size=64, max_num_seqs=8, max_num_batched_tokens=512)
    assert 0 < llm.block_manager.num_blocks * model.kv_cache_bytes_per_block(64) <= 2 * 2**30
    out = llm.generate(prompts(2), SamplingParams(max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
