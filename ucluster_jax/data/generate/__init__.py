"""`ucluster generate`: simulated boosted W, Z and top jets (optionally light-quark and gluon jets),
or whole events (QCD dijets, a W' -> X Y resonance) in the LHC Olympics 2020 R&D layout.

Pythia 8 (13 TeV pp) + FastJet (anti-kT R=0.8) on the visible final state, written in the hls4ml
raw layout of SPEC section 1 (`jetConstituentList` [N,100,16], `jets` [N,59] and the two name
arrays), one HDF5 file per completed chunk, or as parquet shards. See docs/GENERATE.md.

Work is split into chunks (default 1000 jets, mixed over the requested processes). Every chunk
starts fresh Pythia instances seeded from (seed, rank, chunk, process), so a chunk's content
depends only on those and the settings: the same command gives identical files, and a rerun after
an interruption skips the chunks already written and regenerates exactly the missing ones.
Each chunk file is written under a hidden temporary name and renamed when complete.

pythia8mc and fastjet are an optional extra (`pip install 'ucluster-jax[generate]'`) and are
imported only inside the functions that need them.

Modules: spec (what to simulate), physics (Pythia + FastJet), jobs (chunks and their seeds),
runner (workers, ranks, resuming, progress), writers (files), events and lhco (the event processes and their file layout), cli (the command's
arguments).
"""
from ucluster_jax.data.generate.cli import add_args, config_from_args, run
from ucluster_jax.data.generate.events import EventJob, generate_events
from ucluster_jax.data.generate.jobs import Job, generate, pythia_seed
from ucluster_jax.data.generate.physics import JetSimulator, constituent_features, import_backends
from ucluster_jax.data.generate.lhco import read_lhco
from ucluster_jax.data.generate.runner import GenerateResult
from ucluster_jax.data.generate.spec import (
    EVENT_PROCESSES, JET_FEATURE_NAMES, LABELS, PARTICLE_FEATURE_NAMES, PROCESS_ORDER, PYTHIA_SEED_MAX,
    EventConfig, GenConfig,
)
from ucluster_jax.data.generate.writers import h5_to_parquet, merge_h5, read_h5

__all__ = ["EVENT_PROCESSES", "EventConfig", "EventJob", "GenConfig", "GenerateResult", "JET_FEATURE_NAMES",
           "JetSimulator", "Job", "LABELS", "PARTICLE_FEATURE_NAMES", "PROCESS_ORDER", "PYTHIA_SEED_MAX",
           "add_args", "config_from_args", "constituent_features", "generate", "generate_events",
           "h5_to_parquet", "import_backends", "merge_h5", "pythia_seed", "read_h5", "read_lhco", "run"]
