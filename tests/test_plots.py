"""Every plot the project draws goes through the one style helper: headless, and labelled with the sample."""
import matplotlib
import numpy as np

from ucluster_jax import plots, plotstyle


def test_every_plot_is_drawn_headless_with_the_sample_label(tmp_path, monkeypatch):
    figs = []

    def keep(fig, path, *args, **kwargs):
        figs.append(fig)
        return plotstyle.save(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots, "save", keep)
    rng = np.random.default_rng(0)
    names = ("W", "Z", "top")
    cluster, label = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    recs = [{"epoch": e, "loss": 1.0 / (e + 1), "focal": 0.5, "kmeans": 0.1, "test_acc": 0.5} for e in range(3)]
    rows = [{"joint_samples": 256 * i, "test_acc": 0.6, "test_kmeans": 0.2, "boundary_density": 0.1}
            for i in range(1, 4)]
    rows.append({"joint_samples": 1024, "boundary_density": 0.08})  # a selection point of a run without test data
    written = [plots.latent_plot(rng.normal(size=(300, 2)), cluster, label, None, tmp_path / "latent.png", names),
               plots.mass_plot(rng.uniform(0, 200, 300), cluster, label, 3, tmp_path / "mass.png", names),
               plots.training_curves(recs, tmp_path / "training.png"),
               plots.accuracy_vs_samples({"run": rows}, tmp_path / "curve.png")]
    assert matplotlib.get_backend().lower() == "agg"
    assert all(p.stat().st_size > 1000 for p in written) and len(figs) == 4
    for fig in figs:
        for ax in fig.axes:
            texts = [t.get_text() for t in ax.texts]
            assert {"UCluster", "Simulation"} <= set(texts)
            assert "W/Z/top jets (13 TeV)" in texts
