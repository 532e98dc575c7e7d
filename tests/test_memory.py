"""refimpl.memory: one set of components for every method, the lesson's 65B figures and which assumptions
reproduce each (spec/memory.md). Expected values are computed by hand in the comments, not read from the code."""

from __future__ import annotations

import pytest

from refimpl import memory
from refimpl.memory import LLAMA_65B, estimate

N = 65e9  # the lesson's nominal 65B
# LoRA r=64 on q,k,v,o (8192→8192), gate, up (8192→22016), down (22016→8192), 80 layers:
# per layer r·(8·8192 + 3·(8192 + 22016)) = 64·(65536 + 90624) = 64·156160 = 9,994,240; ×80 = 799,539,200
P = 799_539_200
# Korthikanti eq. 2, s=512, b=1, h=8192, a=64: one layer 512·8192·(34 + 5·64·512/8192) = 512·8192·54 bytes
ONE_LAYER = 226_492_416
ACT_FULL = 80 * ONE_LAYER  # 18,119,393,280 B
ACT_CKPT = 80 * 2 * 512 * 8192 + ONE_LAYER  # 671,088,640 + 226,492,416 = 897,581,056 B
NF4 = N * 0.5  # 32.5 GB
DQ = N * (8 / 64 + 32 / (64 * 256)) / 8  # 0.126953125 bits/weight → 1.031494140625 GB


def gb(x: float) -> float:
    return x / 1e9


def test_parameter_and_activation_arithmetic_by_hand():
    assert LLAMA_65B.n_params() == 65_285_660_672  # LLaMA paper: "65.2B"
    assert LLAMA_65B.lora_params(64) == P
    assert memory.activation_bytes(LLAMA_65B, mode="full", seq_len=512, batch=1) == ACT_FULL
    assert memory.activation_bytes(LLAMA_65B, mode="checkpointed", seq_len=512, batch=1) == ACT_CKPT
    assert memory.activation_bytes(LLAMA_65B, mode="none", seq_len=512, batch=1) == 0.0
    # batch 2 doubles everything; seq 1024 makes the attention term 5·64·1024/8192 = 40: 1024·8192·74 per layer
    assert memory.activation_bytes(LLAMA_65B, mode="full", seq_len=512, batch=2) == 2 * ACT_FULL
    assert memory.activation_bytes(LLAMA_65B, mode="full", seq_len=1024, batch=1) == 80 * 1024 * 8192 * 74


def test_full_fine_tuning_components():
    c = estimate("full", n_params=N, activations="checkpointed").components_gb
    assert c["weights"] == pytest.approx(130.0, rel=1e-12)  # 65e9 × 2 B
    assert c["gradients"] == pytest.approx(130.0, rel=1e-12)  # 65e9 × 2 B
    assert c["optimizer states"] == pytest.approx(520.0, rel=1e-12)  # 65e9 × 8 B (AdamW m, v in fp32)
    assert c["activations"] == pytest.approx(0.897581056, rel=1e-12)
    assert c["adapters"] == c["quantization constants"] == 0.0
    assert estimate("full", n_params=N, activations="none").total_gb == pytest.approx(780.0, rel=1e-12)


@pytest.mark.parametrize(("dtype", "a"), [("bf16", 2), ("fp16", 2), ("fp32", 4)])
def test_adapter_components_per_precision(dtype, a):
    for method, weights in (("lora", 130.0), ("qlora", 32.5)):
        c = estimate(method, n_params=N, adapter_dtype=dtype).components_gb
        assert c["weights"] == pytest.approx(weights, rel=1e-12)
        assert c["adapters"] == pytest.approx(gb(P * a), rel=1e-12)  # 1.5990784 (16-bit) / 3.1981568 (fp32)
        assert c["gradients"] == pytest.approx(gb(P * a), rel=1e-12)
        assert c["optimizer states"] == pytest.approx(6.3963136, rel=1e-12)  # P × 8 B whatever the dtype
    assert estimate("qlora", n_params=N).components_gb["quantization constants"] == pytest.approx(1.031494140625)


def test_qlora_constants_are_0127_bits_per_weight_with_double_quantization():
    est = estimate("qlora", n_params=1e9, activations="none")
    assert est.components_gb["quantization constants"] * 8 == pytest.approx(0.126953125, rel=1e-12)
    single = estimate("qlora", n_params=1e9, double_quant=False)
    assert single.components_gb["quantization constants"] * 8 == pytest.approx(0.5, rel=1e-12)  # 32/64 bits


def test_paged_optimizer_moves_the_states_off_the_gpu_total():
    resident = estimate("qlora", n_params=N)
    paged = estimate("qlora", n_params=N, paged_optimizer=True)
    assert paged.components_gb["optimizer states"] == 0.0
    assert paged.cpu_gb == {"paged optimizer states": pytest.approx(6.3963136, rel=1e-12)}
    assert resident.cpu_gb == {}
    # 44.023545596625 − 6.3963136
    assert paged.total_gb == pytest.approx(37.627231996625, rel=1e-12)
    assert "paged optimizer states (CPU)" in paged.table()


def test_the_issues_figures_under_one_assumption_per_row():
    # one activation assumption for every row (issue 18): LoRA checkpointed, QLoRA without checkpointing
    lora_ckpt = 130 + 2 * 3.1981568 + 6.3963136 + gb(ACT_CKPT)  # fp32 adapters: 143.690208256
    qlora_full = 32.5 + 1.031494140625 + 2 * 3.1981568 + 6.3963136 + gb(ACT_FULL)  # 64.443514620625
    qlora_16 = 32.5 + 1.031494140625 + 2 * 1.5990784 + 6.3963136 + gb(ACT_CKPT)  # 44.023545596625
    assert estimate("lora", n_params=N, adapter_dtype="fp32").total_gb == pytest.approx(lora_ckpt, rel=1e-12)
    assert estimate("qlora", n_params=N, adapter_dtype="fp32", activations="full").total_gb == pytest.approx(
        qlora_full, rel=1e-12
    )
    assert estimate("qlora", n_params=N, adapter_dtype="bf16").total_gb == pytest.approx(qlora_16, rel=1e-12)
    assert (round(lora_ckpt, 1), round(qlora_full, 1), round(qlora_16, 1)) == (143.7, 64.4, 44.0)


def test_the_row_by_row_fit_reproduces_the_lessons_numbers():
    rows = {m: (gb_, e.total_gb) for m, gb_, e in memory.lesson_table()}
    assert rows["full"] == (780.0, pytest.approx(780.0, rel=1e-12))
    assert rows["lora"] == (160.0, pytest.approx(130 + 2 * 3.1981568 + 6.3963136 + gb(ACT_FULL), rel=1e-12))  # 160.9
    assert rows["qlora"] == (
        48.0,
        pytest.approx(32.5 + 1.031494140625 + 2 * 3.1981568 + 6.3963136 + gb(ACT_CKPT), rel=1e-12),
    )  # 47.2
    for lesson_gb, total in rows.values():
        assert abs(total / lesson_gb - 1) <= 0.02


def test_which_assumption_sets_reproduce_each_lesson_figure():
    fits = memory.lesson_fits()
    got = {m: {(kw["adapter_dtype"], kw["activations"], kw["paged_optimizer"]) for kw, _ in v} for m, v in fits.items()}
    # 780: 12 B/param, resident AdamW, activations none (780.0) or checkpointed (780.9); full gives 798.1 (+2.3 %)
    assert got["full"] == {(d, a, False) for d in ("fp32", "bf16") for a in ("none", "checkpointed")}
    # 160: only without checkpointing: fp32 adapters 160.9, 16-bit adapters 157.7
    assert got["lora"] == {("fp32", "full", False), ("bf16", "full", False)}
    # 48: only fp32 adapters + checkpointing, resident (47.2); 16-bit adapters give 44.0 (−8.3 %)
    assert got["qlora"] == {("fp32", "checkpointed", False)}
    # ... so no single assumption set reproduces all three
    assert got["full"] & got["lora"] & got["qlora"] == set()
    assert len(memory.assumption_grid()) == 12


def test_consistent_table_uses_one_set_and_the_same_activations_in_every_row():
    rows = {m: e for m, _, e in memory.consistent_table()}
    assert rows["full"].total_gb == pytest.approx(780 + gb(ACT_CKPT), rel=1e-12)  # 780.9
    assert rows["lora"].total_gb == pytest.approx(130 + 2 * 1.5990784 + 6.3963136 + gb(ACT_CKPT), rel=1e-12)  # 140.5
    assert rows["qlora"].total_gb == pytest.approx(44.023545596625, rel=1e-12)
    acts = {e.components_gb["activations"] for e in rows.values()}
    assert len(acts) == 1 and acts.pop() == pytest.approx(gb(ACT_CKPT), rel=1e-12)
    assert all(set(e.components_gb) == set(memory.COMPONENTS) for e in rows.values())
    # the defaults of estimate are the consistent set
    assert estimate("qlora", n_params=N).total_gb == rows["qlora"].total_gb
    # fp16 and bf16 adapters are the same size
    assert estimate("qlora", n_params=N, adapter_dtype="fp16").total_gb == rows["qlora"].total_gb


def test_more_memory_for_more_rank_more_activations_and_dora():
    assert estimate("lora", rank=64).total_gb > estimate("lora", rank=8).total_gb
    assert estimate("lora", activations="full").total_gb > estimate("lora", activations="checkpointed").total_gb
    assert estimate("lora", activations="checkpointed").total_gb > estimate("lora", activations="none").total_gb
    assert estimate("qlora", dora=True).trainable_params - estimate("qlora").trainable_params == 80 * (
        5 * 8192 + 2 * 22016
    )  # 6,799,360 magnitudes
    assert estimate("full").trainable_params == estimate("full").n_params


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="method"):
        estimate("prefix")
    with pytest.raises(ValueError, match="rank"):
        estimate("lora", rank=0)
    with pytest.raises(ValueError, match="activations"):
        estimate("lora", activations="some")
    with pytest.raises(ValueError, match="adapter_dtype"):
        estimate("lora", adapter_dtype="int8")
    with pytest.raises((TypeError, ValueError), match="paged_optimizer"):
        estimate("lora", paged_optimizer="yes")
    with pytest.raises(ValueError, match="dora"):
        estimate("full", dora=True)
    with pytest.raises(TypeError, match="n_params"):
        estimate("full", n_params="65B")
    with pytest.raises(ValueError, match="optimizer_bytes"):
        estimate("full", optimizer_bytes=-1)
    with pytest.raises(ValueError, match="seq_len"):
        estimate("lora", activations="full", seq_len=0)


def test_cli_prints_both_tables_and_single_estimates(capsys):
    assert memory.main([]) == 0
    out = capsys.readouterr().out
    assert "780.0*" in out and "160.9*" in out and "47.2*" in out and "no single row fits all three" in out
    assert "780.9 GB" in out and "140.5 GB" in out and "44.0 GB" in out and "37.6 GB" in out
    assert memory.main(["qlora", "--params", "7e9", "--rank", "16"]) == 0
    assert "total" in capsys.readouterr().out
    assert memory.main(["qlora", "--params", "65e9", "--paged", "--adapter-dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "37.63 GB" in out and "6.40 GB" in out and "paged optimizer states (CPU)" in out
    assert memory.main(["lora", "--rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        memory.main(["lora", "--adapter-dtype", "int4"])
    assert exc.value.code == 2


def test_memory_experiment_bars_share_one_assumption_set(tmp_path):
    pytest.importorskip("matplotlib")
    from refimpl.lab import experiments

    res = experiments.run_memory(tmp_path)
    assert [r["method"] for r in res.rows] == ["full", "lora", "qlora"]
    assert len({r["activations"] for r in res.rows}) == 1  # no bar gets a different activation assumption
    assert [r["estimate_gb"] for r in res.rows] == [780.9, 140.49, 44.02]
    assert [r["lesson_fit_gb"] for r in res.rows] == [780.0, 160.91, 47.22]
    assert any(f.name == "memory.png" and f.stat().st_size > 0 for f in res.files)
