"""One look for every plot the project draws, so that the figures read like the field's: mplhep's CMS
style and a CMS-like label naming the sample ("UCluster Simulation", "W/Z/top jets (13 TeV)"; not
"CMS": these are no CMS results). Headless (Agg); `save` labels and writes every figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mplhep as hep  # noqa: E402

SAMPLE = "W/Z/top jets"
# the CMS style, scaled to this project's several-panel figures (it is made for one 10-inch panel)
STYLE = [hep.style.CMS, {"font.size": 12, "axes.linewidth": 1, "xtick.major.size": 6, "xtick.minor.size": 3,
                         "ytick.major.size": 6, "ytick.minor.size": 3}]


def subplots(*args, **kwargs):
    """plt.subplots in the style."""
    with plt.style.context(STYLE):
        return plt.subplots(*args, **kwargs)


def save(fig, path: Path, sample: str = SAMPLE, dpi: int = 110) -> Path:
    """Label each panel of `fig` ("UCluster Simulation" left, the sample and 13 TeV right, a panel's own
    title above them), write it as PNG atomically and close it."""
    with plt.style.context(STYLE):
        for ax in (a for a in fig.axes if a.axison):
            ax.set_title(ax.get_title(), pad=22)
            hep.label.exp_label(exp="UCluster", data=False, rlabel=f"{sample} (13 TeV)", ax=ax, fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
