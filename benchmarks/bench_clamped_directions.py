"""Which input directions does DataSVD's eigenvalue floor clamp on SmolLM2-135M, and why?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_clamped_directions.py

Covariances of every factorised layer's input (flexrank's own `collect_covariances`) on
32 and then 128 sequences of 256 tokens of the first 80 % of tinyshakespeare; for each
distinct input with eigenvalues below EIGEN_FLOOR x the largest (float64 eigh), the
clamped count, and for each clamped direction the input feature its
eigenvector lies on, that feature's variance relative to the largest, and the weight the
RMSNorm before it gives that feature (q_proj: input_layernorm, gate_proj:
post_attention_layernorm). A clamp that stays the same from 8k to 32k tokens and lies on
a feature its norm all but zeroes is the model's structure, not missing data
(`surgery.RANK_POOR_SHARE`, BENCHMARKS.md "Scale").
"""

import sys

import torch
from common import SHAKESPEARE

from flexrank.compress.calibration import pack, token_stream
from flexrank.compress.config import EIGEN_FLOOR
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.models import load_model


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    text = SHAKESPEARE.read_text()
    stream = token_stream(tokenizer, [text[: len(text) * 8 // 10]])
    norms = {}
    for i, block in enumerate(model.model.layers):
        norms[f"model.layers.{i}.self_attn.q_proj"] = block.input_layernorm.weight.detach()
        norms[f"model.layers.{i}.mlp.gate_proj"] = block.post_attention_layernorm.weight.detach()
    for samples in (32, 128):
        ids = pack(stream, samples, 256, seed=0)
        batches = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])}
                   for i in range(0, samples, 8)]
        stats = collect_covariances(model, batches, progress=False)
        clamped_inputs = 0
        for leader in sorted(set(stats.leader_of.values()), key=lambda s: (len(s), s)):
            cov = stats.sums[leader]
            lam, Q = torch.linalg.eigh(cov)
            low = (lam < EIGEN_FLOOR * lam.max()).nonzero().flatten()
            if len(low) == 0:
                continue
            clamped_inputs += 1
            diag = cov.diagonal()
            gain = norms.get(leader)
            info = []
            for j in low.tolist():
                v = Q[:, j]
                f = int(v.abs().argmax())
                info.append(f"λ/λmax={float(lam[j] / lam.max()):.1e} feature {f} "
                            f"|v_f|={float(v[f].abs()):.2f} "
                            f"var_f/max={float(diag[f] / diag.max()):.1e}"
                            + (f" norm weight={float(gain[f]):.2e}" if gain is not None else ""))
            print(samples * 256, leader, f"width {cov.shape[0]} clamped {len(low)}",
                  "; ".join(info[:4]), flush=True)
        print(f"== {samples * 256} tokens: {clamped_inputs} inputs with clamped eigenvalues",
              flush=True)


if __name__ == "__main__":
    main()
