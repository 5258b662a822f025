"""The anomaly task: its figures of merit, and the per-particle model trained and evaluated end to end."""
import json
import subprocess

import numpy as np
import pytest

from conftest import BIN, REPO, mpirun
from ucluster_jax.anomaly import best_mass_window, report, selection
from ucluster_jax.config import load_config
from ucluster_jax.train.state import learning_rate, phase

ANOMALY_TINY = ["model.num_points=30", "model.k=5", "train.batch_size=64", "train.epochs=3",
                "train.pretrain_epochs=2", "train.learning_rate=1e-3", "train.lr_decay_samples=2000",
                "train.bn_decay_samples=2000", "train.shuffle=true", "train.kmeans_restarts=3"]


def test_anomaly_config_is_the_original_seg_run():
    """scripts/train_kmeans_seg.py: focal only through epoch 10 (MAX_PRETRAIN), then focal + k-means with
    alpha 10 (epoch - 10 + 1); lr 0.01 halved per 1 M samples, floor 1e-5; batch 1024; gamma 2, alpha_f 10."""
    cfg = load_config("configs/anomaly.yaml")
    assert [phase(cfg, e) for e in (0, 10)] == [(0.0, 0.0, 0.0)] * 2
    assert phase(cfg, 11) == (20.0, 1.0, 0.0) and phase(cfg, 99) == (900.0, 1.0, 0.0)
    assert (cfg.loss.focal_gamma, cfg.loss.focal_alpha, cfg.loss.point_reduce) == (2.0, 10.0, "max_per_class")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.num_clusters, cfg.model.pooling) == (1024, 100, 2, "max")
    assert float(learning_rate(0, cfg.train)) == pytest.approx(1e-2)
    assert float(learning_rate(2_500_000, cfg.train)) == pytest.approx(2.5e-3)
    assert load_config("configs/anomaly_cpu.yaml").model == cfg.model


def masses(rng, n_sig, n_bkg):
    """(heavier, lighter) jet masses: a 500/100 GeV resonance pair on a falling QCD-like spectrum."""
    sig = np.stack([rng.normal(500, 15, n_sig), rng.normal(100, 5, n_sig)], 1)
    bkg = np.sort(np.exp(rng.uniform(np.log(10), np.log(800), (n_bkg, 2))), axis=1)[:, ::-1]
    return np.concatenate([sig, bkg]), np.r_[np.ones(n_sig, bool), np.zeros(n_bkg, bool)]


def test_selection_figures_and_the_mass_window_reference():
    rng = np.random.default_rng(0)
    m, signal = masses(rng, 300, 20000)
    s = selection(m[:, 0] > 400, signal)
    n_s, n_b = signal.sum(), (~signal).sum()
    assert s["signal"] == ((m[:, 0] > 400) & signal).sum() and s["eff_signal"] == pytest.approx(s["signal"] / n_s)
    assert s["significance_improvement"] == pytest.approx(s["eff_signal"] / np.sqrt(s["background"] / n_b))
    w = best_mass_window(m[:, 0], m[:, 1], signal)
    h, lo = w["window_gev"]["heavier_jet"], w["window_gev"]["lighter_jet"]
    assert h[0] < 500 < h[1] and lo[0] < 100 < lo[1]
    assert w["background"] >= 20 and w["significance_improvement"] > 5 * s["significance_improvement"]
    glob = np.stack([np.log(m[:, 0]), np.zeros(len(m)), np.log(m[:, 1]), np.zeros(len(m))], 1)
    rep = report((m[:, 0] > 400).astype(int), signal.astype(int), glob, 2)
    assert rep["signal_cluster"] == 1 and rep["significance_improvement"] == s["significance_improvement"]
    assert sum(c["eff_signal"] for c in rep["clusters"]) == pytest.approx(1.0)
    km = rep["kmeans_event_features"]  # label-free reference: the heavy-jet events form their own cluster
    assert km["eff_signal"] > 0.9 and km["purity"] > 2 * signal.mean()


def ucluster(*args, **kw):
    return subprocess.run([str(BIN / "ucluster"), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          **kw)


def test_generated_events_prepare_train_under_mpirun_and_evaluate(tmp_path):
    """The whole chain on simulated events: LHCO-layout file -> prepare (anti-kT R=1, per-particle targets)
    -> the anomaly model trained on 2 mpirun ranks -> the enrichment report."""
    events = tmp_path / "events.h5"
    r = ucluster("generate", "--processes", "qcd-dijet,resonance", "--events", "200", "--signal-fraction", "0.2",
                 "--seed", "7", "--out", str(events), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    r = ucluster("prepare", str(events), "--out", str(tmp_path / "data"), "--split", "train=0.68,test=0.32",
                 "--num-points", "30")
    assert r.returncode == 0, r.stderr[-2000:]
    sets = [a for kv in ANOMALY_TINY for a in ("--set", kv)]
    r = mpirun(2, str(BIN / "ucluster"), "train", "--config", "configs/anomaly.yaml", *sets,
               "--data", str(tmp_path / "data" / "train"), "--test-data", str(tmp_path / "data" / "test"),
               "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in recs] == [0.0, 0.0, 20.0]  # 10 (epoch - pretrain + 2) in the joint phase
    assert recs[-1]["kmeans"] > 0 and recs[-1]["focal"] < recs[0]["focal"]
    r = ucluster("evaluate", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "data" / "test"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(signal-rich)" in r.stdout and "jet-mass window" in r.stdout
    s = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    a, n = s["anomaly"], s["n_jets"]
    assert n == 64 and sum(c["events"] for c in a["clusters"]) == n
    assert 0.05 < a["signal_fraction"] < 0.4  # 20 % generated; the generator shuffles the rows
    assert sum(c["eff_signal"] for c in a["clusters"]) == pytest.approx(1.0)
    assert a["significance_improvement"] == a["clusters"][a["signal_cluster"]]["significance_improvement"]
    assert (tmp_path / "run" / "eval" / "mjj.png").stat().st_size > 10_000
    # the multiclass model refuses the anomaly layout in one line
    r = ucluster("train", "--config", "configs/demo.yaml", *sets, "--data", str(tmp_path / "data" / "train"),
                 "--out", str(tmp_path / "run2"))
    assert r.returncode == 2 and "per-particle targets" in r.stderr and len(r.stderr.strip().splitlines()) == 1
