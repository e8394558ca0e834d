"""The engine on real tiny checkpoints (MLA: deepseek_v2, deepseek_v3; GQA: qwen3_moe) written by transformers'
save_pretrained and loaded from disk: greedy outputs token-identical to transformers' `generate`, token_logprobs
equal to our model's own full-forward log-softmax, and the same outputs under chunked prefill, n-way forks and
preemption (a KV cache too small for all requests)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from replay import install_replayed_graphs  # noqa: E402
from tiny_models import randomize  # noqa: E402

from model.engine import LLM, SamplingParams  # noqa: E402
from model.presets import preset_dict  # noqa: E402

NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module", params=["tiny-v2", "tiny-v3", "tiny-qwen3"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    d = preset_dict(request.param)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
    randomize(hf)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, d["vocab_size"], (n,), generator=g).tolist() for n in (1, 5, 9, 16)]
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return path, prompts, want


def greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0)


def test_greedy_matches_transformers_generate(checkpoint):
    path, prompts, want = checkpoint
    llm = LLM(path, dtype=torch.float32, device="cpu", num_blocks=64, block_size=4, max_num_batched_tokens=12)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.stats.decode_steps > 0 and llm.block_manager.check_all_free()
    # token_logprobs are the model's own log-softmax at those positions (full forward, no cache)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p + o.outputs[0].token_ids])
        with torch.no_grad():
            logp = llm.model(ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)     # [NEW, V]
        ref = logp.gather(-1, torch.tensor(o.outputs[0].token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(o.outputs[0].token_logprobs), ref, atol=1e-4, rtol=1e-4)


def test_forks_and_preemption_keep_greedy_outputs(checkpoint):
    path, prompts, want = checkpoint
    llm = LLM(path, dtype=torch.float32, device="cpu", num_blocks=10, block_size=4)  # < the 4 x 2 samples' need
    outs = llm.generate(prompts, greedy(n=2), use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for o, w in zip(outs, want):
        assert [c.token_ids for c in o.outputs] == [w, w]
    assert llm.block_manager.check_all_free()


def test_graph_replay_buffers_keep_greedy_outputs(checkpoint):
    path, prompts, want = checkpoint
    llm = LLM(path, dtype=torch.float32, device="cpu", num_blocks=64, block_size=4, max_num_seqs=8)
    install_replayed_graphs(llm.runner, 8)
    outs = llm.generate(prompts[1:], greedy(), use_tqdm=False)             # 3 sequences: bucket 4, one pad row
    assert [o.outputs[0].token_ids for o in outs] == want[1:]


def test_checkpoint_dir_with_tokenizer(tmp_path):
    """LLM(dir) loads the tokenizer saved next to the weights: string prompts in, text out, EOS from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model.modeling import MoEForCausalLM

    MoEForCausalLM.from_preset("tiny-qwen3").save_pretrained(str(tmp_path))
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(str(tmp_path))
    llm = LLM(str(tmp_path), device="cpu", num_blocks=32, block_size=8)
    assert llm.tokenizer is not None and 1 in llm.eos_ids
    out = llm.generate("w5 w6 w7", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.prompt == "w5 w6 w7" and out.prompt_token_ids == [5, 6, 7]
    c = out.outputs[0]
    assert c.text.split() == [f"w{t}" for t in c.token_ids if t != 1]
