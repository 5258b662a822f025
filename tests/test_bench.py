"""Smoke tests of `ucluster bench`: tiny model and sizes; fields exist and numbers are positive.

No timing assertions: the figures depend on the machine and its load.
"""
import json

from ucluster_jax.cli import main

TINY = ["--set", "model.num_points=30", "--set", "model.k=5", "--quick", "--cache-dir", "",
        "--batch-sizes", "16", "--eval-batch-sizes", "32", "--jets-per-repeat", "32", "--repeats", "1",
        "--warmup", "0", "--toy-jets", "256", "--replica-batch", "8", "--scaling-steps", "1"]


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_bench_in_process(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", *TINY, "--sections", "train,eval,data,e2e", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    t = res["train"][0]
    assert t["batch"] == 16 and _pos(t["jets_per_s"]) and _pos(t["scan_jets_per_s"]) and _pos(t["step_s"])
    assert t["best_jets_per_s"] >= t["jets_per_s"]  # the best repeat, beside the median
    assert _pos(res["eval"][0]["jets_per_s"])
    assert _pos(res["data"]["read_jets_per_s"]) and _pos(res["data"]["to_device_jets_per_s"])
    assert _pos(res["e2e"]["jets_per_s"])
    f = res["flops"]
    for k in ("model_forward_per_jet", "model_forward_per_edge_per_jet", "peak_gflops", "fraction_of_peak",
              "bound_jets_per_s", "matmul_gflops"):
        assert _pos(f[k]), k
    assert f["model_forward_per_edge_per_jet"] > f["model_forward_per_jet"]
    assert _pos(res["memory"]["peak_rss_mb"])
    assert "jets/s" in capsys.readouterr().out


def test_bench_of_one_section_prints_its_table(tmp_path, capsys):
    """Sections are optional: the table and the FLOP line print what was measured, '-' for the rest."""
    out = tmp_path / "t"
    assert main(["bench", *TINY, "--sections", "train", "--no-scan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "XLA train step" in text and "eval - M" in text
    assert "eval" not in json.loads((out / "bench.json").read_text())


def test_flops_of_the_original_model():
    from ucluster_jax.bench import model_flops_per_jet
    from ucluster_jax.config import ModelConfig

    # the figures: about 62 MFLOP per jet as written (per edge), about 32 per point
    assert abs(model_flops_per_jet(ModelConfig(), edge_per_point=False)["forward"] / 1e6 - 62) < 1
    assert abs(model_flops_per_jet(ModelConfig())["forward"] / 1e6 - 32) < 1


def test_bench_parallel_and_compare(tmp_path, monkeypatch):
    import os

    # the workers compile the step in child processes: cheap XLA optimisation keeps this test short
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                       " --xla_llvm_disable_expensive_passes=true")
    out = tmp_path / "p"
    assert main(["bench", *TINY, "--compare", "single,tpu", "--out", str(out)]) == 2  # before any work
    assert not out.exists()
    # mpi 1,2 ranks (scaling, allreduce, model) and --compare of two paths (single; mpi x2 reused): the
    # other engines' workers are the same code (tests/test_distributed.py checks the engines themselves)
    assert main(["bench", *TINY, "--sections", "mpi", "--ranks", "1,2", "--compare", "single,mpi",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert [r["world"] for r in res["mpi"]] == [1, 2]
    two = res["mpi"][1]
    assert _pos(two["jets_per_s"]) and _pos(two["grad_allreduce_s"]) and _pos(two["small_allreduce_s"])
    assert two["grad_bytes"] > 0 and _pos(two["efficiency"])
    assert res["model"]["check"] and res["model"]["projection"]["points"]
    # the paths asked for, each measured (a failed worker leaves its row out)
    assert sorted(r["engine"] for r in res["compare"]) == ["mpi", "single"]
    assert res["compare"][1]["jets_per_s"] == two["jets_per_s"]  # reused, not measured again
    assert all(_pos(r["jets_per_s"]) and _pos(r["speedup"]) for r in res["compare"])
