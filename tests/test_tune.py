"""`ucluster tune` (issue 13): real Optuna storage, real training, tiny toy jets.

The space varies only what the compiled step does not bake in (the cluster weight, the alpha ramp,
k-means restarts, the seed), so a worker's later trials reuse its compiled step (`step_key`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import optuna
import pytest
import yaml

from conftest import BIN, REPO, mpirun
from ucluster_jax import checkpoint
from ucluster_jax.cli import main
from ucluster_jax.config import load_config
from ucluster_jax.data.toy import write_toy

BASE = ["model.num_points=20", "model.k=5", "train.batch_size=64", "train.epochs=2", "train.pretrain_epochs=1",
        "train.kmeans_iters=20", "train.eval_batch_size=128", "train.lr_decay_samples=2000",
        "train.bn_decay_samples=2000"]
SPACE = {"loss.beta": {"type": "float", "low": 0.5, "high": 5.0},
         "loss.alpha_scale": {"type": "float", "low": 1.0, "high": 8.0, "log": True},
         "train.kmeans_restarts": {"type": "int", "low": 1, "high": 2},
         "train.seed": {"type": "categorical", "choices": [0, 1]}}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    write_toy(root / "train", 256, 1, num_points=20, row_group_size=64)
    write_toy(root / "test", 128, 2, num_points=20, row_group_size=64)
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return root


def tune_args(root, out, *extra):
    sets = [a for s in BASE for a in ("--set", s)]
    return ["tune", "--config", str(REPO / "configs" / "demo.yaml"), "--space", str(root / "space.yaml"),
            "--data", str(root / "train"), "--test-data", str(root / "test"), "--out", str(out), *sets, *extra]


def journal_trials(out):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "journal.log")))
    return optuna.load_study(study_name="ucluster", storage=storage).get_trials()


def test_study_writes_a_trainable_best_config_and_a_rerun_continues_past_a_dead_worker(toy, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(tune_args(toy, out, "--trials", "3", "--seed", "5")) == 0
    trials = journal_trials(out)
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    assert best["value"] == max(t.value for t in trials if t.state.name == "COMPLETE")
    for key, spec in SPACE.items():  # the best parameters lie inside the space
        v = best["params"][key]
        assert v in spec["choices"] if "choices" in spec else spec["low"] <= v <= spec["high"]
    cfg = load_config(out / "best.yaml")  # ready for `ucluster train --config`
    assert cfg.loss.beta == best["params"]["loss.beta"] and cfg.train.seed == best["params"]["train.seed"]
    rec = json.loads((out / best["run"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["test_acc"] == best["value"]  # the objective is the run's own final test accuracy
    assert {"history.png", "parallel.png"} <= set(summary["plots"]) and (out / "history.png").stat().st_size
    shown = capsys.readouterr().out
    assert "trial 2 " in shown and "budget 3" in shown and f"best: trial {best['number']}" in shown

    # a worker killed in trial 3: the trial stays RUNNING in the storage and its heartbeat goes stale
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "journal.log")))
    assert optuna.load_study(study_name="ucluster", storage=storage).ask().number == 3
    (out / "trial-0003").mkdir()
    (out / "trial-0003" / "heartbeat").touch()
    os.utime(out / "trial-0003" / "heartbeat", (time.time() - 600, time.time() - 600))
    assert main(tune_args(toy, out, "--trials", "4", "--seed", "5")) == 0  # the same study continues
    states = [t.state.name for t in journal_trials(out)]
    assert states[3] == "FAIL" and states[4] in ("COMPLETE", "PRUNED") and len(states) == 5  # FAIL: not counted
    assert "trial 3: no heartbeat" in capsys.readouterr().out
    counts = json.loads((out / "summary.json").read_text())["trials"]
    assert counts["complete"] + counts["pruned"] == 4 and counts["fail"] == 1 and counts["running"] == 0


def test_bad_space_exits_2_with_one_line_naming_file_and_key(toy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss.beta: {type: float, low: 2.0, high: 1.0}\n")
    p = subprocess.run([str(BIN / "ucluster"), *tune_args(toy, tmp_path / "s", "--space", str(bad))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "loss.beta" in lines[0] and "low" in lines[0], p.stderr
    assert not (tmp_path / "s").exists()


def test_a_sigkilled_worker_loses_only_its_running_trial(toy, tmp_path, capsys):
    out = tmp_path / "study"
    args = tune_args(toy, out, "--trials", "2", "--seed", "3", "--stale-after", "5")
    worker = subprocess.Popen([str(BIN / "ucluster"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    beat = out / "trial-0000" / "heartbeat"
    try:
        deadline = time.time() + 120
        while not beat.exists() and worker.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert beat.exists(), worker.communicate(timeout=60)[0][-3000:]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    assert [t.state.name for t in journal_trials(out)] == ["RUNNING"]  # killed mid-trial
    time.sleep(max(0.0, beat.stat().st_mtime + 5.5 - time.time()))  # no worker touches it any more
    assert main(args) == 0  # the same command again
    states = [t.state.name for t in journal_trials(out)]  # the journal the killed worker wrote is readable
    assert states[0] == "FAIL" and len(states) == 3 and set(states[1:]) <= {"COMPLETE", "PRUNED"}
    assert "trial 0: no heartbeat" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    c = summary["trials"]
    assert c["complete"] + c["pruned"] == 2 and c["fail"] == 1 and c["running"] == 0  # the budget reached
    assert summary["best"] is not None and (out / "best.yaml").exists()


def test_groups_of_two_mpirun_ranks_train_each_trial_data_parallel(toy, tmp_path):
    # also the concurrent workers' test: the two groups share one journal study (--ranks-per-trial 1,
    # the default, makes every rank such a worker, each training single-process)
    out = tmp_path / "study"
    p = mpirun(4, str(BIN / "ucluster"), *tune_args(toy, out, "--trials", "2", "--ranks-per-trial", "2"),
               timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    trials = journal_trials(out)
    assert len(trials) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    ranks = {t.user_attrs["worker"].split(" pid")[0].split()[-1] for t in trials}
    assert ranks == {"0", "2"}  # each group ran one trial, its rank 0 the worker Optuna sees
    assert sorted(d.name for d in out.glob("trial-*")) == [f"trial-{n:04d}" for n in range(2)]
    for t in trials:  # every trial trained once, on its group's 2 ranks
        run = out / f"trial-{t.number:04d}"
        meta = checkpoint.read_verified(checkpoint.list_checkpoints(run)[-1])[1]
        assert (meta["world"], meta["replicas"], meta["engine"]) == (2, 2, "mpi") and t.user_attrs["ranks"] == 2
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # train.epochs=2: one line each
    assert json.loads((out / "summary.json").read_text())["trials"]["running"] == 0
    assert p.stdout.count("best: trial") == 1  # rank 0 reports once, after every group's last trial
