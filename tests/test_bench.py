"""`mlgate bench`: four configurations measured in one run, their paired ratios, and what each one does."""

from __future__ import annotations

import json

import pytest

from mlgate.cli import main


def test_bench_reports_four_configurations_and_their_ratios(capsys):
    assert main(["bench", "--steps", "4", "--warmup", "1", "--batch", "8", "--diagnostics-every", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    configs = {"reference", "mlgate", "mlgate_diagnostics", "mlgate_logging"}
    assert set(result["steps_per_s"]) == configs and all(v > 0 for v in result["steps_per_s"].values())
    assert set(result["peak_memory_mb"]["gpu"]) == configs and result["peak_memory_mb"]["host"] > 0
    sps, ratios, passes = result["steps_per_s"], result["ratios"], result["pass_seconds"]
    # Steps/s from each configuration's median pass; ratios pair the passes of each round (3 rounds).
    assert all(len(passes[c]) == 3 and sps[c] == pytest.approx(4 / sorted(passes[c])[1]) for c in configs)

    def paired(slower, faster):
        return sorted(a / b for a, b in zip(passes[slower], passes[faster]))[1]

    assert ratios["speedup_vs_reference"] == pytest.approx(paired("reference", "mlgate"))
    assert ratios["diagnostics_overhead"] == pytest.approx(paired("mlgate_diagnostics", "mlgate") - 1)
    assert ratios["logging_overhead"] == pytest.approx(paired("mlgate_logging", "mlgate_diagnostics") - 1)
    assert result["images_per_s"]["mlgate"] == pytest.approx(8 * sps["mlgate"])
    # The metric sender's own CPU time is measured (a few log_batch calls: tens of ms), not left out.
    assert result["sender_cpu_ms_per_step"] > 0
    assert ratios["logging_cpu"] == pytest.approx(result["sender_cpu_ms_per_step"] / 1e3 * sps["mlgate_diagnostics"])
    assert main(["bench", "--method", "maple", "--steps", "1", "--warmup", "0", "--batch", "4"]) == 0
    assert "speed-up vs reference" in capsys.readouterr().out
    assert main(["bench", "--steps", "0"]) == 2
    assert main(["bench", "--diagnostics-every", "0"]) == 2


def test_the_bench_reference_encodes_every_prompt_in_one_pass(monkeypatch):
    # The reference trainers have no chunking, no shared prefix and no packing: their text pass, and its
    # memory, grows with the label set. mlgate's packs its CoOp prompts and chunks them (here every 4
    # prompts' rows; 256 by default); the reference never takes those paths.
    from mlgate.bench import bench
    from mlgate.bench.reference import ReferenceCLIP
    from mlgate.model import PromptedCLIP

    passes = []
    chunked = PromptedCLIP._chunked

    def spy(self, encode, x, eot, args_for, chunk=None):
        passes.append((type(self).__name__, x.shape[0], chunk or self.text_chunk))
        return chunked(self, encode, x, eot, args_for, chunk)

    full = []
    encode = ReferenceCLIP.encode_text_embeddings
    monkeypatch.setattr(PromptedCLIP, "_chunked", spy)
    monkeypatch.setattr(PromptedCLIP, "text_chunk", 4)
    monkeypatch.setattr(ReferenceCLIP, "encode_text_embeddings",
                        lambda self, x, *a, **k: full.append(x.shape[0]) or encode(self, x, *a, **k))
    bench(steps=1, warmup=1, rounds=1, batch=4, configs=("reference", "mlgate"))
    assert full == [10, 10]  # two steps (warm-up and timed), all 10 prompts in one pass each
    assert passes and {name for name, _, _ in passes} == {"PromptedCLIP"}
    assert all(chunk < 10 for _, _, chunk in passes)


def test_bench_without_the_logging_configuration_needs_no_mlflow():
    # A GPU machine with torch alone (no MLflow) can still run the step benchmarks.
    import subprocess
    import sys

    code = ("import sys; from mlgate.bench import bench; "
            "r = bench(steps=2, warmup=1, rounds=1, batch=4, configs=('reference', 'mlgate', 'mlgate_diagnostics')); "
            "assert r['ratios']['logging_overhead'] is None and r['sender_cpu_ms_per_step'] is None, r; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
