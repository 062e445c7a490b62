"""Which KL estimators give the gradient of the KL, and where: an exact check on a policy small enough to enumerate.

    python benchmark/kl_estimators.py

The policy writes sequences of `--length` tokens from a vocabulary of `--vocab` (every token's logits
a free parameter per prefix: 3^2 = 9 sequences by default); the reference is another such policy.
For each per-token estimator of log pi_t / ref_t (x = log ref_t - log pi_t):
    k1 = -x            k2 = x^2 / 2            k3 = exp(x) - x - 1
and each placement, the expected gradient over pi is computed exactly (a sum over every sequence)
and compared with the gradient of the exact sequence KL(pi || ref) = E_pi[sum_t log pi_t / ref_t]:
- in the reward (PPO, REBEL): the summed estimate is a penalty on the sampled sequence, its gradient
  comes through the score function, E_pi[grad log pi(y) * sum_t k_t(y)] (k_t held fixed);
- in the loss (GRPO): sum_t k_t(y) is differentiated directly on sequences sampled from pi,
  E_pi[grad sum_t k_t(y)] (sampling not differentiated).
An estimator-placement pair is unbiased when the two gradients agree; the table gives the cosine and
the relative error, and the value each estimator's expectation takes next to the KL.
"""
import itertools
from dataclasses import dataclass

import torch
import tyro


@dataclass
class Args:
    vocab: int = 3
    """tokens in the vocabulary"""
    length: int = 2
    """tokens per sequence"""
    seed: int = 0
    """the random policies' seed"""
    scale: float = 1.0
    """spread of the random logits (larger: policies further apart)"""


ESTIMATORS = {
    "k1": lambda x: -x,  # x = log ref - log pi
    "k2": lambda x: 0.5 * x ** 2,
    "k3": lambda x: torch.exp(x) - x - 1,
}


def token_logprobs(logits, seq):
    """log pi(y_t | y_<t) per position of `seq`: `logits` maps a prefix (a tuple) to (V,) logits."""
    return torch.stack([torch.log_softmax(logits[seq[:t]], -1)[seq[t]] for t in range(len(seq))])


def expected_gradients(args: Args):
    """Exact expected gradients of every estimator and placement, and of the true KL, over the policy's logits."""
    torch.manual_seed(args.seed)
    prefixes = [p for n in range(args.length) for p in itertools.product(range(args.vocab), repeat=n)]
    theta = {p: (args.scale * torch.randn(args.vocab)).requires_grad_() for p in prefixes}
    ref = {p: args.scale * torch.randn(args.vocab) for p in prefixes}
    params = [theta[p] for p in prefixes]
    sequences = list(itertools.product(range(args.vocab), repeat=args.length))

    def grad(value):
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params, retain_graph=True)])

    seq_lp = {y: token_logprobs(theta, y) for y in sequences}  # (L,) each, differentiable
    seq_ref = {y: token_logprobs(ref, y) for y in sequences}
    prob = {y: seq_lp[y].sum().exp() for y in sequences}
    true_kl = sum(prob[y] * (seq_lp[y] - seq_ref[y]).sum() for y in sequences)  # sum_y pi(y) log pi(y) / ref(y)
    rows = {"exact KL": (grad(true_kl), true_kl.item())}
    for name, k in ESTIMATORS.items():
        x = {y: seq_ref[y] - seq_lp[y] for y in sequences}  # (L,) per token
        # in the reward: the penalty sum_t k_t is a fixed number times the score function
        reward = sum(prob[y].detach() * seq_lp[y].sum() * k(x[y].detach()).sum() for y in sequences)
        # in the loss: sum_t k_t differentiated on sequences drawn from (a detached) pi
        loss = sum(prob[y].detach() * k(x[y]).sum() for y in sequences)
        value = sum(prob[y].detach() * k(x[y].detach()).sum() for y in sequences).item()
        rows[f"{name} in the reward"] = (grad(reward), value)
        rows[f"{name} in the loss"] = (grad(loss), value)
    return rows


def table(args: Args) -> str:
    rows = expected_gradients(args)
    exact, kl_value = rows.pop("exact KL")
    lines = [f"KL(pi || ref) = {kl_value:.4f} nats over {args.vocab}^{args.length} sequences; gradient norm "
             f"{exact.norm():.4f}.", "",
             "| estimator, placement | E[estimate] | gradient norm / the KL's | cosine to the KL's gradient | "
             "relative error | unbiased |", "|---|---|---|---|---|---|"]
    for name, (g, value) in rows.items():
        ratio = (g.norm() / exact.norm()).item()
        cos = torch.nn.functional.cosine_similarity(g, exact, dim=0).item() if ratio > 1e-6 else float("nan")
        err = ((g - exact).norm() / exact.norm()).item()
        lines.append(f"| {name} | {value:.4f} | {ratio:.3f} | {cos:+.3f} | {err:.3f} | "
                     f"{'yes' if err < 1e-4 else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    print(table(args))
