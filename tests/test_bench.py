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
    # The default case composes bqat-train's config; 10 planned updates keep its auto rules eager.
    result = bench.main(["--model", "resnet20", "--image-size", "8", "--batch", "4", "--repeats", "2", "--warmup", "0",
                         "--no-compile", "--no-eager", "--threads", "1", "--fq-shape", "4,4,4,4", "--out", str(out),
                         "--train-overrides", "trainer.epochs=1", "trainer.limit_train_batches=10"])
    written = json.loads(out.read_text())
    for key in ("fp_step_ms", "lsq_step_ms", "bwrf_step_ms", "bwrf_sampled_step_ms", "fq_ms", "torch_fq_ms"):
        assert written[key] > 0, key
    assert written["device_type"] == "cpu" and written["threads"] == 1 and written["model"] == "resnet20" and written["batch"] == 4
    assert set(written["fq_by_quantizer_over_torch_fq"]) == {"lsq", "lsqplus", "pact", "dorefa", "ewgs"}
    assert set(written["ratios_paired"]) >= set(bench.TARGETS)
    # The method's cost rules, counted at the dispatcher: LP prefix once, no partner weight gradients.
    assert written["checks"]["lp_prefix_computed_once"] and written["checks"]["no_partner_weight_gradients"]
    assert result["bwrf_step_ms"] == written["bwrf_step_ms"]

    # The default case: bqat-train's settings, auto rules included (eager here), guard on the device.
    default = written["default"]
    assert default["planned_updates"] == 10 and default["compile"] is False and default["quant_compile"] is False
    assert default["guard"].startswith("on the device") and default["clip_grad"] == 5.0
    assert default["fp_step_ms"] > 0 and default["lsq_step_ms"] > 0 and default["bwrf_step_ms"] > 0 and "guard_ms" in default
    assert written["ratios_paired"]["default_lsq_over_fp"] > 0

    # Operators per eager step: the twin dispatches more than the FP network, the prefix more than
    # the twin alone; the guard adds a handful.
    ops = written["aten_ops_per_step"]
    assert ops["lsq"] > ops["fp"] > 0 and ops["bwrf"] > ops["lsq"] and 0 < ops["guard"] < 20
    # resnet20: 3 blocks; unbatched prefix paths call F_2, F_3 (path 1) and F_3 (path 2); the
    # default objective distils from the partner, whose own forward adds F_1, F_2, F_3.
    calls, expected = written["partner_block_calls_per_step"], written["partner_block_calls_expected"]
    assert calls["bwrf"] == expected["bwrf"] == 3 + 3
    if written["batch_paths"]:  # schedule.batch_paths exists: n-1 suffix calls (+ z_0's 3, apart on CPU)
        assert calls["bwrf_batched"] == expected["bwrf_batched"] == 2 + 3 and written["bwrf_batched_step_ms"] > 0
        assert written["checks"]["batched_each_partner_block_once"]
    else:
        assert written["bwrf_batched_step_ms"] is None and written["ratios_paired"]["bwrf_batched_overhead_over_fp"] is None
