"""refimpl.memory: the lesson's 65B table from stated bytes per element."""

from __future__ import annotations

import pytest

from refimpl import memory
from refimpl.memory import LLAMA_65B, estimate


def test_full_fine_tuning_is_12_bytes_per_parameter_and_gives_the_lessons_780_gb():
    est = estimate("full", n_params=65e9)
    assert est.components_gb["weights"] == pytest.approx(130.0, rel=1e-12)
    assert est.components_gb["optimizer state"] == pytest.approx(520.0, rel=1e-12)
    assert est.total_gb == pytest.approx(780.0, rel=1e-12)


def test_lesson_table_is_reproduced_to_the_lessons_rounding():
    rows = memory.lesson_table()
    assert [m for m, _, _ in rows] == ["full", "lora", "qlora"]
    for method, lesson_gb, est in rows:
        rel = est.total_gb / lesson_gb - 1.0
        print(f"{method}: lesson {lesson_gb:.0f} GB, estimate {est.total_gb:.2f} GB ({rel:+.2%})")
        # the lesson quotes whole tens/units of GB: 780, 160, 48 — within 2 % of each
        assert abs(rel) <= 0.02, method
    text = memory.format_lesson_table()
    assert "assumptions:" in text and "Korthikanti" in text


def test_llama_65b_parameter_counts_match_the_published_architecture():
    # 80 layers, hidden 8192, FFN 22016, vocab 32000: 65.29e9 parameters (LLaMA paper: "65.2B")
    assert LLAMA_65B.n_params() == 65_285_660_672
    # LoRA r on q,k,v,o (h→h) and gate, up (h→f), down (f→h): r·(8h + 3(h+f)) per layer
    assert LLAMA_65B.lora_params(1) == 80 * (8 * 8192 + 3 * (8192 + 22016))
    assert LLAMA_65B.lora_params(64) == 64 * LLAMA_65B.lora_params(1)


def test_qlora_constants_are_0127_bits_per_weight_with_double_quantization():
    est = estimate("qlora", n_params=1e9, activations="none")
    bits = est.components_gb["quantization constants"] * 8  # GB per 1e9 weights → bits per weight
    assert bits == pytest.approx(8 / 64 + 32 / (64 * 256), rel=1e-12)
    single = estimate("qlora", n_params=1e9, double_quant=False)
    assert single.components_gb["quantization constants"] * 8 == pytest.approx(0.5, rel=1e-12)


def test_more_memory_for_more_rank_more_activations_and_dora():
    lo = estimate("lora", rank=8).total_gb
    hi = estimate("lora", rank=64).total_gb
    assert hi > lo
    assert estimate("lora", activations="full").total_gb > estimate("lora", activations="checkpointed").total_gb
    assert estimate("lora", activations="checkpointed").total_gb > estimate("lora").total_gb
    assert estimate("qlora", dora=True).trainable_params - estimate("qlora").trainable_params == \
        LLAMA_65B.dora_magnitude_params()
    assert estimate("full").trainable_params == estimate("full").n_params


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="method"):
        estimate("prefix")
    with pytest.raises(ValueError, match="rank"):
        estimate("lora", rank=0)
    with pytest.raises(ValueError, match="activations"):
        estimate("lora", activations="some")
    with pytest.raises(ValueError, match="dora"):
        estimate("full", dora=True)
    with pytest.raises(TypeError, match="n_params"):
        estimate("full", n_params="65B")
    with pytest.raises(ValueError, match="optimizer_bytes"):
        estimate("full", optimizer_bytes=-1)
    with pytest.raises(ValueError, match="seq_len"):
        estimate("lora", activations="full", seq_len=0)


def test_cli_prints_the_table_and_single_estimates(capsys):
    assert memory.main([]) == 0
    out = capsys.readouterr().out
    assert "780.0 GB" in out and "lesson" in out
    assert memory.main(["qlora", "--params", "7e9", "--rank", "16"]) == 0
    assert "total" in capsys.readouterr().out
    assert memory.main(["lora", "--rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
