"""Field failures reported by users of peer tools (issue 22 §2 training, §4, §5, §6), each
reproduced on a tiny model and asserted against an independent reference.

§2: a float16/bfloat16 student distils like the same run in float32 (it turned 28 weight
    tensors into NaN within 3 steps and raised nothing); a NaN loss, gradient or weight
    stops training with an error naming the step.
§4: a sequence longer than the model's positions (64 here) is refused in eval,
    calibration, export samples and the runtime.
§5: every table labels β and shows the whole-model fraction, equal to a hand count.
§6: one batch rule (dict or bare (B, T) ids) in every function that takes batches, with a
    clear error otherwise; honest warnings for rank-deficient covariances and few tokens.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer, tiny_bert, token_batches
from elastic_fixtures import tiny_elastic

from flexrank.compress.calibration import BatchError, calibration_data
from flexrank.compress.config import DistillConfig, ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.distill import NonFiniteError, distill, evaluate_budgets
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.evaluate import cosine_similarity, perplexity, teacher_agreement
from flexrank.compress.models import PositionLimitError, max_positions
from flexrank.compress.probe import probe
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.manifest import load_manifest
from flexrank.planning.planner import plan as make_plan

POSITIONS = 64
VOCAB = 100


def llama64(seed: int = 0):
    """A tiny Llama trained (declared) for 64 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=POSITIONS, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def factorised64():
    """(teacher, factorised student, plan at β 0.5 and 1) of the 64-position Llama."""
    teacher = llama64()
    student = copy.deepcopy(teacher)
    train = token_batches(VOCAB, num=8, batch=4, seq=32)
    factorize_(student, collect_covariances(student, train, progress=False), progress=False)
    sens = probe(student, teacher, train[:1], ProbeConfig(mode="exact", num_levels=4),
                 progress=False)
    return teacher, student, make_plan(sens, budgets=[0.5, 1.0])


# ---- §2 half-precision distillation ---------------------------------------------------

# full_budget="train": these tests are of training in half precision, not of the anchor
# (which returns layers the small budgets keep whole to the original weights afterwards)
DISTILL = DistillConfig(steps=20, lr=3e-4, warmup_steps=2, batch_size=8, full_budget="train")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_student_distils_like_float32(dtype):
    student, teacher, plan, train, held_out = tiny_elastic()
    half, half_teacher = copy.deepcopy(student).to(dtype), copy.deepcopy(teacher).to(dtype)
    # the float32 reference starts from the same (rounded) weights
    full, full_teacher = copy.deepcopy(half).float(), copy.deepcopy(half_teacher).float()
    before = evaluate_budgets(ElasticModel(half, plan), half_teacher, held_out)
    distill(half, half_teacher, plan, train, DISTILL, progress=False)
    distill(full, full_teacher, plan, train, DISTILL, progress=False)
    assert {p.dtype for p in half.parameters()} == {dtype}  # the student keeps its dtype
    assert all(torch.isfinite(p).all() for p in half.parameters())
    after = evaluate_budgets(ElasticModel(half, plan), half_teacher, held_out)
    reference = evaluate_budgets(ElasticModel(full, plan), full_teacher, held_out)
    assert after[0.6]["kl"] < 0.97 * before[0.6]["kl"]  # the loss went down
    assert after[0.8]["kl"] < 0.99 * before[0.8]["kl"]
    for beta in plan.budgets:  # and lands where float32 training does
        assert after[beta]["kl"] == pytest.approx(reference[beta]["kl"], rel=0.03), beta


def test_float16_without_master_weights_is_stopped_at_the_step(monkeypatch):
    """The reported failure itself: AdamW on float16 weights. With the float32 master
    weights switched off, the weight check stops the run at the step that broke them."""
    import flexrank.compress.distill as distill_module

    student, teacher, plan, train, _ = tiny_elastic()
    student.half()
    teacher.half()
    monkeypatch.setattr(distill_module, "_upcast_half_", lambda model: {})
    with pytest.raises(NonFiniteError, match=r"distillation step \d+: after the optimizer "
                                             r"step \d+ trained tensors hold NaN/inf"):
        distill(student, teacher, plan, train, DISTILL, progress=False)


def poison_call(module: torch.nn.Module, call: int):
    """Make `module`'s output NaN on its `call`-th forward (0-based)."""
    calls = []

    def hook(_module, _args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == call + 1 else output

    return module.register_forward_hook(hook)


def test_nan_loss_names_the_step_and_budget():
    student, teacher, plan, train, _ = tiny_elastic()
    layer = next(iter(nested_layers(student).values()))
    # the sandwich sampler runs 3 budgets per step, the largest first: call 6 is step 2, β 1
    poison_call(layer, 6)
    with pytest.raises(NonFiniteError, match=r"distillation step 2: the loss at budget 1 is "
                                             r"nan; the student's outputs are not finite"):
        distill(student, teacher, plan, train, DISTILL, progress=False)


def test_nan_weight_is_named():
    student, teacher, plan, train, _ = tiny_elastic()
    name, layer = next(iter(nested_layers(student).items()))
    calls: list[int] = []

    def poison(_module, _args):  # before forward 5: step 1's second budget, β 0.8
        calls.append(1)
        if len(calls) == 5:
            layer.U.data[0, 0] = float("nan")

    layer.register_forward_pre_hook(poison)
    with pytest.raises(NonFiniteError, match=rf"distillation step 1: the loss at budget "
                                             rf"0\.8 is nan; trained tensors hold NaN/inf: "
                                             rf"\['{name}\.U'\]"):
        distill(student, teacher, plan, train, DISTILL, progress=False)


def test_nan_gradient_stops_before_the_update():
    student, teacher, plan, train, _ = tiny_elastic()
    name, layer = next(iter(nested_layers(student).items()))
    backwards: list[int] = []

    def poison(grad):  # backward 4: step 1's first budget, after a finite loss
        backwards.append(1)
        return grad * float("nan") if len(backwards) == 4 else grad

    layer.V.register_hook(poison)
    with pytest.raises(NonFiniteError, match=rf"distillation step 1: the gradients of 1 "
                                             rf"tensors are NaN/inf \(first \['{name}\.V'\]\); "
                                             rf"the weights were not updated"):
        distill(student, teacher, plan, train, DISTILL, progress=False)
    assert all(torch.isfinite(p).all() for p in student.parameters())


# ---- §4 sequences longer than the model's positions ------------------------------------


def test_positions_of_each_family():
    from conftest import tiny_cnn
    from transformers import GPT2Config

    assert max_positions(llama64()) == POSITIONS  # max_position_embeddings
    assert max_positions(GPT2Config(n_positions=48)) == 48  # n_positions
    assert max_positions(tiny_cnn()) is None  # no limit declared


def test_eval_refuses_windows_beyond_the_positions():
    model = llama64()
    text = ids(1, 100)[0]
    with pytest.raises(PositionLimitError, match=r"evaluation windows of 100 tokens exceed "
                                                 r"the 64 positions LlamaForCausalLM was "
                                                 r"trained for .*seq_len"):
        perplexity(model, text, seq_len=256)
    with pytest.raises(PositionLimitError, match="windows of 65 tokens"):
        teacher_agreement(model, model, text, seq_len=65)
    # within the positions: windows [0, 64) and [63, 100), each token scored once
    with torch.no_grad():
        first = model(text[None, :64]).logits[0].float()
        second = model(text[None, 63:]).logits[0].float()
    nll = torch.cat([F.cross_entropy(first[:-1], text[1:64], reduction="none"),
                     F.cross_entropy(second[:-1], text[64:], reduction="none")])
    assert perplexity(model, text, seq_len=64) == pytest.approx(math.exp(float(nll.mean())),
                                                                 rel=1e-5)


def test_cli_eval_refuses_a_seq_len_beyond_the_positions(tmp_path, capsys, factorised64):
    from flexrank.cli import main

    _, student, plan = factorised64
    ElasticModel(student, plan, char_tokenizer(), model_id="x").save_pretrained(tmp_path / "e")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    assert main(["eval", str(tmp_path / "e"), "--text", str(text), "--seq-len", "256",
                 "--no-teacher"]) == 2
    assert "evaluation windows of 256 tokens exceed the 64 positions" in capsys.readouterr().err


def test_calibration_refuses_sequences_beyond_the_positions(factorised64):
    teacher, student, _ = factorised64
    with pytest.raises(PositionLimitError, match="calibration sequences of 65 tokens exceed "
                                                 "the 64 positions"):
        calibration_data(char_tokenizer(), "teacher", model=teacher, num_samples=2, seq_len=65)
    for function in (lambda b: collect_covariances(teacher, b, progress=False),
                     lambda b: probe(student, teacher, b, progress=False)):
        with pytest.raises(PositionLimitError, match="batches of 65 tokens exceed the 64"):
            function([ids(2, 65)])
    assert collect_covariances(teacher, [ids(2, 64)], progress=False).num_tokens == 128


def test_compress_refuses_a_seq_len_beyond_the_positions_before_any_stage(tmp_path):
    """Refused while calibrating, before the stage is finished: the corrected rerun can
    use the same folder (a finished calibration stage would have kept the old seq_len)."""
    import dataclasses

    from test_compress import config

    from flexrank.compress.pipeline import compress

    llama64().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    settings = config(text, steps=2)  # seq_len 32
    with pytest.raises(PositionLimitError, match="calibration sequences of 128 tokens exceed "
                                                 "the 64 positions"):
        compress(tmp_path / "model", tmp_path / "out", dataclasses.replace(settings,
                                                                           seq_len=128))
    elastic, _ = compress(tmp_path / "model", tmp_path / "out", settings)
    assert elastic.budgets == [0.7, 1.0]


def test_export_sample_refuses_inputs_beyond_the_positions():
    from flexrank.exporters.common.sample import sample_for
    from flexrank.exporters.executorch.export import ExecutorchExportConfig
    from flexrank.exporters.onnx.export import OnnxExportConfig

    model, onnx_config = llama64(), OnnxExportConfig()
    with pytest.raises(PositionLimitError, match="sample_inputs of 65 tokens exceed the 64"):
        sample_for("decoder", model, None, ids(2, 65), onnx_config)
    with pytest.raises(PositionLimitError, match=r"max_seq_len 128 \(the program's context\) "
                                                 r"exceed the 64 positions"):
        sample_for("decoder", model, None, None, ExecutorchExportConfig(max_seq_len=128))
    assert sample_for("decoder", model, None, None,
                      ExecutorchExportConfig(max_seq_len=64)).shape == (2, 12)
    # a model of 16 positions gets a built sample of 16 tokens, not the usual 24
    short = llama64()
    short.config.max_position_embeddings = 16
    text = "To be, or not to be, that is the question:"
    assert sample_for("decoder", short, char_tokenizer(), None,
                      OnnxExportConfig(sample_text=text)).shape == (2, 16)


def test_runtime_generate_refuses_beyond_the_positions(tmp_path, factorised64):
    from flexrank.exporters import export
    from flexrank.runtime.session import ElasticSession

    _, student, plan = factorised64
    export(ElasticModel(student, plan, model_id="tiny-64"), tmp_path, budgets=[1.0])
    session = ElasticSession(tmp_path)
    with pytest.raises(ValueError, match="a prompt of 60 tokens plus 5 new tokens exceeds the "
                                         "64 positions"):
        session.generate(ids(1, 60)[0].tolist(), max_new_tokens=5)
    with pytest.raises(ValueError, match="a prompt of 60 tokens"):  # the longest row counts
        session.generate([ids(1, 20)[0].tolist(), ids(1, 60)[0].tolist()], max_new_tokens=5)
    assert len(session.generate(ids(1, 59)[0].tolist(), max_new_tokens=5, stop_at_eos=False)
               .token_ids) == 5


def test_token_ids_outside_the_vocabulary_are_named(tmp_path, factorised64):
    """The same kind as positions: a tokenizer larger than the model's vocabulary made eval
    end in an IndexError and generate in onnxruntime's Gather error (found by a new user)."""
    from flexrank.exporters import export
    from flexrank.runtime.session import ElasticSession

    model = llama64()
    vocab = model.config.vocab_size
    text = torch.cat([ids(1, 30)[0], torch.tensor([vocab + 200])])
    with pytest.raises(ValueError, match=rf"token id {vocab + 200}, outside the model's "
                                         rf"vocabulary of {vocab}"):
        perplexity(model, text, seq_len=64)
    _, student, plan = factorised64
    export(ElasticModel(student, plan, model_id="tiny-64"), tmp_path, budgets=[1.0])
    session = ElasticSession(tmp_path)
    with pytest.raises(ValueError, match=rf"token id {vocab + 899} is outside the model's "
                                         rf"vocabulary of {vocab}"):
        session.generate([[1, 2], [3, vocab + 899]], max_new_tokens=3)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        session.generate([5, -1, 6], max_new_tokens=3)


def test_runtime_encode_refuses_inputs_beyond_positions_or_vocabulary(tmp_path):
    """encode() had neither check: an encoder bundle ran a too-long input through its
    position table and an unknown id into onnxruntime's Gather."""
    from elastic_fixtures import nested_plan

    from flexrank.compress.config import FactorizeConfig
    from flexrank.compress.surgery import factorize_
    from flexrank.exporters import export
    from flexrank.runtime.session import ElasticSession

    model = tiny_bert()  # 128 positions, vocabulary of 100
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    export(ElasticModel(model, nested_plan(model), model_id="tiny-bert"), tmp_path,
           budgets=[1.0])
    session = ElasticSession(tmp_path)
    ids = np.arange(128)[None] % 97 + 3  # 128 tokens: the whole position table
    ok = session.encode(ids)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(ok["last_hidden_state"], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="an input of 129 tokens exceeds the 128 positions"):
        session.encode(np.full((1, 129), 5))
    with pytest.raises(ValueError, match="token id 100 is outside the model's vocabulary of 100"):
        session.encode(np.array([[5, 100, 6]]))


# ---- §6 one batch rule ------------------------------------------------------------------


def bare(batches):
    return [b["input_ids"] for b in batches]


def test_bare_id_tensors_give_the_same_numbers_as_dicts(factorised64):
    teacher, student, plan = factorised64
    batches = token_batches(VOCAB, num=2, batch=4, seq=16, seed=3)
    as_dicts = collect_covariances(teacher, batches, progress=False)
    as_ids = collect_covariances(teacher, bare(batches), progress=False)
    assert as_dicts.counts == as_ids.counts and as_dicts.leader_of == as_ids.leader_of
    for leader, total in as_dicts.sums.items():
        assert torch.equal(total, as_ids.sums[leader]), leader

    config = ProbeConfig(mode="exact", num_levels=3)
    a = probe(student, teacher, batches, config, progress=False)
    b = probe(student, teacher, bare(batches), config, progress=False)
    assert (a.errors == b.errors).all()

    runs = []
    for form in (batches, bare(batches)):
        trained = copy.deepcopy(student)
        result = distill(trained, teacher, plan, form, DistillConfig(steps=3, batch_size=4,
                                                                      lr=1e-3, warmup_steps=1),
                         eval_batches=form, progress=False)
        runs.append((trained, result))
    (first, one), (second, two) = runs
    assert one.losses == two.losses and one.evals == two.evals and one.tokens_seen == 3 * 4 * 16
    for (name, x), y in zip(first.state_dict().items(), second.state_dict().values(),
                            strict=True):
        assert torch.equal(x, y), name
    elastic = ElasticModel(first, plan)
    assert evaluate_budgets(elastic, teacher, batches) == \
        evaluate_budgets(elastic, teacher, bare(batches))


def test_bare_id_tensors_for_an_encoder():
    bert = tiny_bert()
    batches = token_batches(VOCAB, num=2, batch=2, seq=8)
    other = copy.deepcopy(bert)
    torch.nn.init.normal_(other.encoder.layer[0].output.dense.weight)
    assert cosine_similarity(other, bert, batches) == cosine_similarity(other, bert, bare(batches))


@pytest.mark.parametrize("batch, given", [
    (["to be", "or not"], "a list of 2 str"),
    (torch.rand(2, 8), r"a float32 tensor of shape \(2, 8\)"),
    ({"input_ids": torch.rand(2, 8)}, r"a float32 tensor of shape \(2, 8\)"),
    (torch.arange(3, 11), r"an? int64 tensor of shape \(8,\) \(for one sequence, add a batch "
                          r"axis: ids\[None\]\)"),
])
def test_other_batches_are_refused_clearly(factorised64, batch, given):
    teacher, student, plan = factorised64
    accepted = (r"must be a dict with input_ids \(a \(B, T\) integer tensor\) and optionally "
                r"attention_mask \(B, T\), or a bare \(B, T\) integer tensor of token ids; got ")
    for function in (lambda: collect_covariances(teacher, [batch], progress=False),
                     lambda: probe(copy.deepcopy(student), teacher, [batch], progress=False),
                     lambda: distill(copy.deepcopy(student), teacher, plan, [batch],
                                     DistillConfig(steps=1), progress=False)):
        with pytest.raises(BatchError, match=accepted + given):
            function()


# ---- §6 honest warnings -----------------------------------------------------------------


def deficient_layers(stats, floor: float) -> set[str]:
    """Layers whose input covariance has an eigenvalue below floor · λ_max (numpy's eigh)."""
    import numpy as np

    found = set()
    for layer, leader in stats.leader_of.items():
        eigvals = np.linalg.eigvalsh(stats.sums[leader].numpy())
        if (eigvals < floor * eigvals.max()).any():
            found.add(layer)
    return found


def test_rank_deficient_covariance_is_reported_once(caplog):
    from flexrank.compress.config import EIGEN_FLOOR

    model = llama64()
    repeated = [torch.full((4, 32), 7)]  # one token: every layer's input spans few directions
    stats = collect_covariances(model, repeated, progress=False)
    expected = deficient_layers(stats, EIGEN_FLOOR)
    assert expected  # the reference sees the deficiency the warning must report
    with caplog.at_level(logging.WARNING, logger="flexrank.compress.surgery"):
        factorize_(model, stats, progress=False)
    records = [r.getMessage() for r in caplog.records if "rank-deficient" in r.getMessage()]
    assert len(records) == 1
    assert records[0].startswith(f"{len(expected)} layers read a rank-deficient input "
                                 "covariance")

    caplog.clear()
    healthy = llama64()
    varied = token_batches(VOCAB, num=16, batch=4, seq=64)
    stats = collect_covariances(healthy, varied, progress=False)
    assert not deficient_layers(stats, EIGEN_FLOOR)
    with caplog.at_level(logging.WARNING, logger="flexrank.compress.surgery"):
        factorize_(healthy, stats, progress=False)
    assert "rank-deficient" not in caplog.text


def clamped_report(caplog, model, batches):
    """(warning records, info records) of factorize_'s rank-deficiency report, and the
    layers numpy's eigh finds deficient in the same covariances."""
    from flexrank.compress.config import EIGEN_FLOOR

    stats = collect_covariances(model, batches, progress=False)
    expected = deficient_layers(stats, EIGEN_FLOOR)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flexrank.compress.surgery"):
        factorize_(model, stats, progress=False)
    records = [r for r in caplog.records if r.name == "flexrank.compress.surgery"]
    return ([r.getMessage() for r in records if r.levelno == logging.WARNING],
            [r.getMessage() for r in records if r.levelno == logging.INFO], expected)


def test_a_dead_input_feature_with_enough_tokens_is_conditioning_not_missing_data(caplog):
    """One input feature of q/k/v held at zero (its norm weight zeroed: 1 of 32 directions,
    3 %) over 128 varied tokens per dimension: no warning that asks for more text, one info
    line counting the layers numpy finds deficient."""
    model = llama64()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[5] = 0.0
    warnings, infos, expected = clamped_report(
        caplog, model, token_batches(VOCAB, num=16, batch=4, seq=64))
    assert expected == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2)
                        for p in "qkv"}
    assert not [w for w in warnings if "rank-deficient" in w], warnings
    assert len(infos) == 1 and infos[0].startswith(f"{len(expected)} layers' inputs have a few "
                                                   "directions of variance below"), infos


def test_identical_sequences_are_warned_however_many_tokens(caplog):
    """One 8-token sequence repeated to 2048 tokens (64 per dimension of the widest input):
    enough tokens, but every input spans at most 8 directions, so the warning asks for
    varied text, naming every layer numpy finds deficient."""
    row = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    same = [{"input_ids": row.repeat(4, 1), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
            for _ in range(64)]
    warnings, infos, expected = clamped_report(caplog, llama64(), same)
    assert len(expected) == 14  # 7 layers in each of the 2 blocks
    (warning,) = [w for w in warnings if "rank-deficient" in w]
    assert warning.startswith(f"{len(expected)} layers read a rank-deficient input covariance")
    assert "varied" in warning and not infos


def test_few_tokens_warning_counts_the_tokens_seen(caplog):
    model = llama64()
    batch = ids(2, 16)
    mask = torch.ones_like(batch)
    mask[1, 10:] = 0  # 6 padding tokens: 26 real ones
    with caplog.at_level(logging.WARNING, logger="flexrank.compress.covariance"):
        collect_covariances(model, [{"input_ids": batch, "attention_mask": mask}],
                            progress=False)
    # the widest input is the MLP down projection (64): 26 tokens are 0.4 per dimension
    assert "calibration saw 26 tokens for model.layers.0.mlp.down_proj's 64-wide input " \
           "(0.4 per dimension; 8 of 8 inputs below 16 per dimension)" in caplog.text
    caplog.clear()
    enough = [ids(8, 64, seed) for seed in range(2)]  # 1024 tokens = 16 x 64
    with caplog.at_level(logging.WARNING, logger="flexrank.compress.covariance"):
        collect_covariances(model, enough, progress=False)
    assert "calibration saw" not in caplog.text


def test_few_tokens_warning_of_a_pooler_asks_for_more_sequences(caplog):
    """A BERT pooler reads one token per sequence: with 16 per dimension everywhere else,
    the warning names it and asks for more sequences, not longer ones."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=64)).eval()
    batches = [ids(8, 64, seed) for seed in range(2)]  # 1024 tokens = 32 x 32, 16 sequences
    with caplog.at_level(logging.WARNING, logger="flexrank.compress.covariance"):
        collect_covariances(model, batches, progress=False)
    assert "calibration saw 16 tokens for pooler.dense's 16-wide input (1.0 per dimension; " \
           "1 of " in caplog.text
    assert "calibrate on about 256 tokens or more (it reads 16 tokens where other inputs " \
           "read up to 1024, as a pooler reads one per sequence: more sequences, not longer " \
           "ones)" in caplog.text


# ---- §5 what a budget is a fraction of --------------------------------------------------


def hand_count(config, ranks: dict[str, int] | None = None) -> int:
    """Parameters of the tiny Llama counted from its config by hand (tied embedding once),
    with each factorised m x n layer at rank r counted as r(m + n - r) when `ranks` names it."""
    h, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (inner, h), "mlp.up_proj": (inner, h),
              "mlp.down_proj": (h, inner)}
    total = vocab * h + h  # embedding (= lm_head) and the final norm
    for layer in range(config.num_hidden_layers):
        total += 2 * h  # the two norms
        for name, (m, n) in shapes.items():
            r = (ranks or {}).get(f"model.layers.{layer}.{name}")
            total += m * n if r is None else r * (m + n - r)
    return total


@pytest.fixture(scope="module")
def half_budget(factorised64):
    """(plan, whole-model parameters at β 0.5 by hand, the dense model's by hand)."""
    teacher, _, plan = factorised64
    dense = hand_count(teacher.config)
    assert dense == sum(p.numel() for p in teacher.parameters())  # the hand count is right
    return plan, hand_count(teacher.config, plan.ranks_for(0.5)), dense


def row_of(table: str, first: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [first])


def test_plan_summary_shows_the_whole_model_beside_beta(half_budget):
    plan, whole, dense = half_budget
    table = plan.summary_table(model_params=dense)
    assert "budget = kept fraction of the factorised layers' deployed parameters" in table
    cells = row_of(table, "0.500")
    assert int(cells[4].replace(",", "")) == whole
    assert float(cells[5]) == pytest.approx(whole / dense, abs=5e-5)
    assert float(cells[6]) == pytest.approx(whole * 4 / 1e6, rel=5e-3)  # float32 MB
    assert whole / dense > 0.55  # not β itself: the embedding and norms are kept whole
    assert row_of(plan.summary_table(), "0.500")[4:7] == ["-", "-", "-"]


def test_dry_run_decision_and_bench_tables_show_the_whole_model(factorised64, half_budget,
                                                                tmp_path, capsys):
    from flexrank.cli import export_main, main

    _, student, plan = factorised64
    _, whole, dense = half_budget
    checkpoint = tmp_path / "ckpt"
    ElasticModel(student, plan, char_tokenizer(), model_id="tiny-64").save_pretrained(checkpoint)
    assert export_main([str(checkpoint), "--profile", "pixel8", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "beta = kept fraction of the factorised layers' deployed parameters" in table
    assert "whole kept" in table and "weights MB" in table
    cells = row_of(table, "0.5")  # β 0.5 fp32: ... size MB, ok, fits, whole kept
    assert cells[1] == "fp32" and cells[-2] == "yes"
    assert float(cells[-1]) == pytest.approx(whole / dense, abs=5e-5)
    assert float(cells[-4]) == pytest.approx(whole * 4 / 1e6, rel=5e-3)

    dist = tmp_path / "dist"
    assert export_main([str(checkpoint), "--profile", "pixel8", "--budget", "all",
                        "--format", "onnx", "-o", str(dist)]) == 0
    capsys.readouterr()
    assert main(["bench", str(dist), "--profiles", "pixel8", "--tokens", "2"]) == 0
    table = capsys.readouterr().out
    assert "beta = kept fraction of the factorised layers' deployed parameters" in table
    cells = row_of(table, "pixel8")  # the first row: the largest budget, β 1
    assert cells[2:5] == ["1", "1.0000", f"{dense * 4 / 1e6:.3g}"]
    half = next(line.split() for line in table.splitlines() if line.split()[2:3] == ["0.5"])
    assert float(half[3]) == pytest.approx(whole / dense, abs=5e-5)
    assert float(half[4]) == pytest.approx(whole * 4 / 1e6, rel=5e-3)
    # the manifest says what β counts and gives the whole model beside it
    manifest = load_manifest(dist)
    for entry in manifest["budgets"]:
        params = entry["params"]
        assert params["kept_of"].startswith("deployed parameters of the factorised layers")
        assert params["whole_model_dense"] == dense  # the hand count of the original model
        deployed = params["factorised"] + params["other"]
        assert params["whole_model"] == deployed
        assert params["whole_model_kept"] == pytest.approx(deployed / dense)
        if entry["beta"] == 1.0:
            assert params["whole_model_kept"] == pytest.approx(1.0)
        else:  # embeddings and norms are kept whole: more of the model than β
            assert params["kept"] < params["whole_model_kept"] < 1.0
