"""Configuration values that would crash or misbehave later are refused up front, naming the key."""
from pathlib import Path

import pytest

from ucluster_jax import cli
from ucluster_jax.config import ConfigError, load_config

BAD = ["train.lr_decay_samples=0", "train.bn_decay_samples=0", "train.kmeans_restarts=0", "train.kmeans_iters=0",
       "train.batch_size=0", "train.eval_batch_size=-1", "train.epochs=0", "train.pretrain_epochs=9",
       "train.learning_rate=0", "train.lr_decay_rate=0", "train.bn_decay_rate=1.5", "train.bn_decay_clip=2",
       "train.shuffle_buffer_row_groups=0", "train.keep_checkpoints=-1", "model.k=0", "model.k=101",
       "model.latent_dim=0", "model.conv1_widths=[64,0]", "model.num_clusters=0", "model.bn_epsilon=0",
       "loss.focal_gamma=-1", "loss.mass_bins=log", "loss.mass_range=[200,30]", "parallel.slices=-1",
       "parallel.slices=3", "train.select_from_epoch=5", "train.select_from_epoch=200", "train.select_jets=0",
       "train.select_by=mass"]


@pytest.mark.parametrize("override", BAD)
def test_bad_value_is_refused_naming_the_key(override):
    key = override.split("=")[0]
    extra = ["train.epochs=8"] if key == "train.pretrain_epochs" else []
    with pytest.raises(ConfigError, match=rf"^{key}=.*: must be "):
        load_config(None, [*extra, override])


@pytest.mark.parametrize("path", [None, "configs/demo.yaml", "configs/wztop.yaml", "configs/wztop_cpu.yaml",
                                  "configs/anomaly.yaml", "configs/anomaly_cpu.yaml"])
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_shipped_search_space_fits_the_cpu_recipe():
    # scripts/wztop_gpu.sh (TUNE_WORKERS) searches it: every key a config key, every range's ends valid
    from ucluster_jax.tune_space import load_space

    space = load_space(Path("configs/space_wztop_cpu.yaml"), Path("configs/wztop_cpu.yaml"), [])
    assert {"train.joint_learning_rate", "loss.beta", "loss.alpha_scale", "loss.mass_bins"} <= set(space)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert cli.main(["info", "--set", "train.kmeans_restarts=0"]) == 2
    err = capsys.readouterr().err
    assert err == "ucluster info: error: train.kmeans_restarts=0: must be >= 1\n"


def test_tensorboard_is_on_by_default_and_a_bool():
    assert load_config(None).train.tensorboard is True
    assert load_config(None, ["train.tensorboard=false"]).train.tensorboard is False
    with pytest.raises(ConfigError, match="cannot use 'maybe' as bool"):
        load_config(None, ["train.tensorboard=maybe"])


def test_sqrt_mass_bins_need_jet_level_targets():
    with pytest.raises(ConfigError, match=r"^loss.mass_bins='sqrt': must be 'prepared' under model.variant anomaly"):
        load_config("configs/anomaly_cpu.yaml", ["loss.mass_bins=sqrt"])


def test_every_select_by_criterion_is_computed_and_drawn():
    from ucluster_jax import plots
    from ucluster_jax.config import SELECT_BY
    from ucluster_jax.train import select

    assert set(select.CRITERIA) == set(SELECT_BY) == set(plots.SELECT_LABELS)
