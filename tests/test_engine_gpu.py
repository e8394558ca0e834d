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


def test_kv_cache_is_a_fraction_of_the_memory_free_for_it(model):
    """The budget comes from torch.cuda.mem_get_info after the weights and a profiling forward: memory held by
    ANOTHER process (invisible to torch.cuda.memory_allocated) is not handed to the cache."""
    import subprocess
    import sys

    code = ("import torch, sys; x = torch.empty(6 * 2**30, dtype=torch.uint8, device='cuda'); "
            "torch.cuda.synchronize(); print('ready', flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        llm = LLM(model, gpu_memory_fraction=0.5, block_size=64, max_num_seqs=8, max_num_batched_tokens=512)
        kv = llm.block_manager.num_blocks * model.kv_cache_bytes_per_block(64)
        assert 0.45 * free <= kv <= 0.5 * free, (kv / 2**30, free / 2**30)
        out = llm.generate(prompts(2), SamplingParams(max_tokens=4), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    finally:
        other.stdin.close()
        other.wait(timeout=60)


def test_sleep_frees_the_cache_graphs_and_weights_and_wake_up_restores_them(model):
    import copy

    own = copy.deepcopy(model)
    llm = LLM(own, num_blocks=256, block_size=16, max_num_seqs=8)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts(), p, use_tqdm=False)]
    weights = {k: v.clone() for k, v in own.state_dict().items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    llm.sleep(level=2)
    freed = before - torch.cuda.memory_allocated()
    kv = 256 * own.kv_cache_bytes_per_block(16)
    assert freed >= kv + sum(t.numel() * t.element_size() for t in weights.values()) * 0.9, freed
    assert not llm.runner.graphs
    llm.wake_up(["weights"])
    own.load_state_dict(weights)
    llm.wake_up(["kv_cache"])
    assert sorted({k[0] for k in llm.runner.graphs}) == [1, 2, 4, 8], llm.runner.capture_error  # captured again
    assert [o.outputs[0].token_ids for o in llm.generate(prompts(), p, use_tqdm=False)] == want
    llm.sleep(level=1)  # weights to host memory
    assert next(own.parameters()).device.type == "cpu"
    llm.wake_up()
    assert next(own.parameters()).device.type == "cuda"
    assert [o.outputs[0].token_ids for o in llm.generate(prompts(), p, use_tqdm=False)] == want
