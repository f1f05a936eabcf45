"""scripts/bench.py (make bench) on a tiny eager case: the file it writes and its cost checks.

The timings themselves are not asserted (speed lives in `make bench`, not in tests)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_writes_every_timing_ratio_and_the_cost_checks(tmp_path):
    out = tmp_path / "bench.json"
    bench = load_bench()
    result = bench.main(["--model", "resnet20", "--image-size", "8", "--batch", "4", "--repeats", "2", "--warmup", "0",
                         "--no-compile", "--no-eager", "--threads", "1", "--fq-shape", "4,4,4,4", "--out", str(out)])
    written = json.loads(out.read_text())
    for key in ("fp_step_ms", "lsq_step_ms", "bwrf_step_ms", "bwrf_sampled_step_ms", "fq_ms", "torch_fq_ms"):
        assert written[key] > 0, key
    assert written["device_type"] == "cpu" and written["threads"] == 1 and written["model"] == "resnet20" and written["batch"] == 4
    assert set(written["fq_by_quantizer_over_torch_fq"]) == {"lsq", "lsqplus", "pact", "dorefa", "ewgs"}
    assert set(written["ratios_paired"]) >= set(bench.TARGETS)
    # The method's cost rules, counted at the dispatcher: LP prefix once, no partner weight gradients.
    assert written["checks"]["lp_prefix_computed_once"] and written["checks"]["no_partner_weight_gradients"]
    assert written["checks"]["partner_block_calls_per_step"] == 2  # n - 1 (schedule.batch_paths)
    assert result["bwrf_step_ms"] == written["bwrf_step_ms"]
