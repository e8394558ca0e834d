"""CUDA-graph decode path of the engine on CPU: ReplayedForward stands in for a captured graph (replay() reruns the
forward on the runner's static buffers: full-width block tables, padding rows with slot -1, the context bucket's
split plan, the padded shared-prefix buffers), which is what a captured decode graph reads."""

import torch


class ReplayedForward:
    def __init__(self, runner, key):
        self.runner, self.meta = runner, runner.static_meta(*key)
        self.out = torch.empty(key[0], runner.model.config.vocab_size)

    def replay(self):
        self.out.copy_(self.runner.model.forward_paged(self.meta, self.runner.kv_cache))


def install_replayed_graphs(runner, max_num_seqs: int) -> None:
    """ModelRunner.capture's bookkeeping (sizes, static buffers, one graph per distinct plan) with ReplayedForward
    in place of CUDA graphs."""
    runner.sizes = runner.graph_sizes(max_num_seqs)
    runner.alloc_static(runner.sizes[-1])
    made = {}
    for key, same in runner.graph_keys(max_num_seqs).items():
        g = made.setdefault(same, ReplayedForward(runner, same))
        runner.graphs[key] = (g, g.out)
