"""benchmarks/scaling_model.py: runs on CPU from the results JSON, and says what
docs/scaling.md quotes (the 2-GPU ratio within 5 %, transfers hidden above the crossover)."""

import json
from pathlib import Path

import pytest

from benchmarks import scaling_model as model


@pytest.fixture(scope="module")
def inputs():
    return model.measured_inputs()


def test_script_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    model.main(["--json", str(out)])
    text = capsys.readouterr().out
    for heading in ("## Measured inputs", "## Crossover", "## Checks against measurements", "## Predictions"):
        assert heading in text
    data = json.loads(out.read_text())
    assert {r["gpus"] for r in data["predictions"]} == {8, 16, 64}
    assert max(r["tokens"] for r in data["predictions"]) == 8 * 1024 * 1024


def test_two_gpu_ratio_within_five_percent(inputs):
    checks = {c["what"]: c for c in model.checks(inputs)}
    two_gpu = [c for what, c in checks.items() if "2 GPUs, 64k tokens, ring / local" in what]
    assert len(two_gpu) == 2 and all(abs(c["error"]) < 0.05 for c in two_gpu), two_gpu
    h100 = checks["H100 2 GPU(s), 64k tokens, TFLOP/s per GPU (contiguous)"]
    assert abs(h100["error"]) < 0.05, h100


def test_inputs_are_plausible(inputs):
    assert 300 < inputs.rate_tflops < 500          # H100 bf16 flash kernels
    assert 0 < inputs.gamma < 0.15
    assert 0.3 < inputs.nvlink_efficiency <= 1.0
    assert model.zigzag_moved_fraction(2) == 0.5 and model.zigzag_moved_fraction(4) == 0.75


def test_transfers_hide_above_the_crossover_only(inputs):
    for gbps in (model.NVLINK_GBPS, model.IB_NDR_GBPS):
        l_star = model.crossover_tokens(inputs, gbps)
        p = 16
        hidden = [model.ring_step(inputs, 2 * l_star * p, p, gbps, rate=inputs.rate_tflops * 1e12)]
        exposed = [model.ring_step(inputs, 0.5 * l_star * p, p, gbps, rate=inputs.rate_tflops * 1e12)]
        (ring, local), = hidden
        assert ring / local == pytest.approx(1 + inputs.gamma, rel=0.02)
        (ring, local), = exposed
        assert ring / local > 1.5 * (1 + inputs.gamma)
    # Compute per hop grows as L², bytes as L: across hosts the crossover is ~9x NVLink's.
    ratio = model.crossover_tokens(inputs, model.IB_NDR_GBPS) / model.crossover_tokens(inputs, model.NVLINK_GBPS)
    assert ratio == pytest.approx(model.NVLINK_GBPS / model.IB_NDR_GBPS)


def test_docs_quote_the_script(inputs):
    # docs/scaling.md quotes the script's tables; rerun the script and paste them when the
    # model or its inputs change.
    doc = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    rows = [line for line in model.report(inputs).splitlines() if line.startswith("| ")]
    missing = [row for row in rows if row not in doc]
    assert len(rows) > 50 and not missing, missing[:5]
