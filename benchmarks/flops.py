"""The throughput formula of benchmarks/README.md, kept apart from the models package on purpose.

Every system is scored by the same closed form, so a ratio between two rows is a ratio of step times.
The formula counts the GPT blocks and the tied embedding/output projection (vocab · h), and leaves out
position embeddings, norms' contribution to FLOPs and the softmax, as that method does.
"""

BENCHMARK_VOCAB_SIZE = 50304


def gpt_num_params(hidden: int, layers: int, vocab_size: int = BENCHMARK_VOCAB_SIZE) -> int:
    """N = V·h + L·(12h² + 13h): the weights that take part in matmuls, plus the blocks' biases/norms."""
    return vocab_size * hidden + layers * (12 * hidden * hidden + 13 * hidden)


def train_flops_per_step(
    hidden: int,
    layers: int,
    seq_len: int,
    num_tokens: int,
    vocab_size: int = BENCHMARK_VOCAB_SIZE,
    recompute: bool = False,
    recompute_layers: int | None = None,
) -> int:
    """FLOPs of one training step over `num_tokens` tokens: 6·N·tokens + 12·L·h·s·tokens.

    Backward costs twice the forward, so a forward is a third of that; recomputing activations
    (activation checkpointing) runs the forward once more and adds that third, or the
    `recompute_layers / layers` part of it when only that many of the blocks are recomputed.
    """
    num_params = gpt_num_params(hidden, layers, vocab_size)
    flops = 6 * num_params * num_tokens + 12 * layers * hidden * seq_len * num_tokens
    if recompute:
        recomputed = layers if recompute_layers is None else recompute_layers
        flops += flops // 3 * recomputed // layers
    return flops


def tflops(flops_per_step: int, step_s: float) -> float:
    """Achieved TFLOPS (10¹² FLOP/s) of one step."""
    return flops_per_step / step_s / 1e12
