"""What each budget of an `ElasticModel` costs per token (a `flexrank.planning.costs.BudgetCost`,
for the device model of `flexrank.device`).

Counting (DESIGN.md §3, §6): a factorised layer at rank r costs r(m+n−r) multiply-adds
and weights (gauge-fixed), never more than the dense m·n; everything else is counted as
the dense model has it. Per decoded token every weight is read once, except the input
embedding, of which one row is read; a tied embedding/lm_head is stored once. Encoders
and vision models also get the work of one inference, counted with forward hooks
(`flexrank.compress.inference_cost`), which the device model prices per inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexrank.compress.inference_cost import inference_fields
from flexrank.compress.models import model_kind
from flexrank.compress.select import model_embeddings, nested_layers
from flexrank.planning.costs import BudgetCost, gauge_fixed_params

# bits per stored weight after --quantize. int4 (MatMulNBits, symmetric, block 32): a 4-bit
# code per weight plus one float32 scale per block of 32 weights, 4 + 32/32 = 5 bits
# (an asymmetric zero point would add 4/32: 5.125).
# 8da4w (ExecuTorch/XNNPACK): a 4-bit code plus one bfloat16 scale per group of 32 (XNNPACK
# stores group-wise scales as bf16, no zero point): 4 + 16/32 = 4.5 bits.
BITS = {None: 32, "none": 32, "int8": 8, "int4": 5, "8da4w": 4.5}
# int4 exports (exporters/onnx/int4.py) store a tied embedding/lm_head table once, in
# `embedding_bits` (OnnxExportConfig.int4_embedding_bits, flexrank-export --embedding-bits):
# 4 or 8 bits in blocks of INT4_TABLE_BLOCK with a float32 scale each (GatherBlockQuantized),
# or float32; an untied input embedding stays a float32 Gather (only MatMuls are quantized)
INT4_TABLE_BLOCK = 32
# 8da4w programs lay the table out as ExecuTorch's LLM export does (exporters/executorch,
# ExecutorchExportConfig.embedding_bits = 8): the input embedding 8-bit with one float32
# scale per row, and a tied lm_head a second copy in 8da4w (BENCHMARKS.md, "Tied
# embedding/lm_head"): SmolLM2-135M's β 1 program is 100.3 MiB, counted so 99.3, as one
# 4.5-bit copy 72
EMBEDDING_8DA4W_BITS = 8
ACTIVATION_BYTES = 4  # activations and the KV cache stay float32 in every export


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of one budget (numbers, not bytes)."""

    factorised: int  # Σ r(m+n−r) (`gauge_fixed_params`) over the nested layers
    other: int  # non-factorised weights read per token: norms, biases, lm_head, position tables
    embedding: int  # input embedding table (one row read per token)
    embedding_row: int  # hidden size
    tied: bool  # the lm_head is the embedding table (stored once)
    factorised_dense: int = 0  # Σ m·n over the nested layers: their uncompressed size

    @property
    def resident(self) -> int:
        return self.factorised + self.other + (0 if self.tied else self.embedding)

    @property
    def dense_resident(self) -> int:
        """`resident` of the uncompressed model (every nested layer dense)."""
        return self.resident - self.factorised + self.factorised_dense


def budget_counts(elastic, beta: float) -> ModelCounts:
    model: nn.Module = elastic.model
    layers = nested_layers(model)
    ranks = elastic.layer_ranks(beta)
    factorised = dense = 0
    for name, layer in layers.items():
        m, n = layer.U.shape[0], layer.V.shape[0]
        factorised += gauge_fixed_params(m, n, ranks[name])
        dense += m * n
    # a nested layer's factors are counted above; its bias (kept at every rank) is not
    nested_ids = {id(layer.U) for layer in layers.values()} | {id(layer.V)
                                                                for layer in layers.values()}
    embed, head = model_embeddings(model)
    embed_weight = getattr(embed, "weight", None)
    tied = head is not None and embed_weight is not None and head.weight is embed_weight
    other = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) in nested_ids or p is embed_weight:
            continue
        other += p.numel()
    if tied:
        other += embed_weight.numel()  # the head reads the whole table every token
    embedding = 0 if embed_weight is None else embed_weight.numel()
    row = 0 if embed_weight is None else embed_weight.shape[-1]
    return ModelCounts(factorised, other, embedding, row, tied, dense)


def table_bits(quantize: str | None, tied: bool, embedding_bits: int | None = None) -> float:
    """Bits per stored weight of the input embedding table (tied: the lm_head too).

    int4 (see INT4_TABLE_BLOCK): a tied table in `embedding_bits` (None: the export's
    default, 4) plus a float32 scale per block of 32, or 32 when `embedding_bits` is 32; an
    untied table 32. int8 (onnxruntime's quantize_dynamic over MatMuls only,
    exporters/onnx/convert.py quantize_int8): 8 for a tied table (the lm_head's MatMul),
    32 for an untied one (a Gather, left float32: an encoder's word embedding). Other
    schemes: `BITS[quantize]`, as every weight. Raises ValueError for `embedding_bits`
    other than 4, 8, 32 or None."""
    if embedding_bits not in (None, 4, 8, 32):
        raise ValueError(f"embedding_bits {embedding_bits} is not one an int4 export stores; "
                         "choose 4, 8 or 32")
    if quantize == "int8" and not tied:
        return 32.0
    if quantize != "int4":
        return BITS[quantize]
    bits = 4 if embedding_bits is None else embedding_bits
    if not tied or bits == 32:
        return 32.0
    return bits + 32 / INT4_TABLE_BLOCK


def budget_cost(elastic, beta: float, quantize: str | None = None,
                embedding_bits: int | None = None) -> BudgetCost:
    """The `BudgetCost` of one budget: FLOPs and bytes from the plan's ranks (the embedding
    table's bytes by `table_bits(quantize, tied, embedding_bits)`, the export's setting),
    the KV cache from the model's config. Raises ValueError for an unknown `quantize`."""
    if quantize not in BITS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {list(BITS)[1:]}")
    weight_bytes = BITS[quantize] / 8
    counts = budget_counts(elastic, beta)
    table_bytes = table_bits(quantize, counts.tied, embedding_bits) / 8
    # the table's weights at its own width: a tied table is in `other` (the head reads it)
    table = counts.embedding if counts.tied else 0
    config = getattr(elastic.model, "config", None)
    encoder = model_kind(elastic.model) != "decoder"  # a plain module: one forward, no cache
    n_layers = int(getattr(config, "num_hidden_layers", 0) or len(nested_layers(elastic.model)))
    hidden = int(getattr(config, "hidden_size", counts.embedding_row) or 1)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    kv = 0.0
    if not encoder and config is not None:
        heads = int(getattr(config, "num_attention_heads", 1))
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv = n_layers * 2 * kv_heads * head_dim * ACTIVATION_BYTES
    # live per prompt token: residual, normed input, q/k/v/attention out, MLP pair, logits
    activations = (6 * hidden + 2 * intermediate + vocab) * ACTIVATION_BYTES
    matmul = counts.factorised + counts.other
    stored_once = counts.resident - counts.embedding  # every weight but the table
    # the table's bytes: (stored, read per decoded token: the head's whole table + one row)
    stored_table = counts.embedding * table_bytes
    read_table = (table + counts.embedding_row) * table_bytes
    if quantize == "8da4w":
        row_bits = EMBEDDING_8DA4W_BITS + 32 / max(counts.embedding_row, 1)
        head_bits = BITS["8da4w"] if counts.tied else 0  # a tied head: its own 8da4w copy
        stored_table = counts.embedding * (row_bits + head_bits) / 8
        read_table = (table * BITS["8da4w"] + counts.embedding_row * row_bits) / 8
    # encoders and vision models: one inference's work, counted by forward hooks
    per_inference = inference_fields(elastic, beta, BITS[quantize]) if encoder else {}
    return BudgetCost(
        beta=float(beta),
        flops_per_token=2.0 * matmul,
        weight_bytes_per_token=(matmul - table) * weight_bytes + read_table,
        weight_bytes_total=stored_once * weight_bytes + stored_table,
        kv_bytes_per_token=kv,
        n_layers=max(n_layers, 1),
        activation_bytes_per_token=float(activations),
        encoder=encoder,
        dense_weight_bytes_total=((counts.dense_resident - counts.embedding) * weight_bytes
                                  + stored_table),
        **per_inference)


def budget_costs(elastic, quantize: str | None = None, budgets=None,
                 embedding_bits: int | None = None) -> list[BudgetCost]:
    return [budget_cost(elastic, beta, quantize, embedding_bits)
            for beta in (budgets or elastic.budgets)]


def cost_to_dict(cost: BudgetCost) -> dict:
    from dataclasses import asdict

    return asdict(cost)


