"""`python -m ucluster_jax.bench --worker ...`: one parallel measurement (started by `run_worker`)."""
import sys

from ucluster_jax.bench.workers import worker_parser, worker
from ucluster_jax.host_tuning import tune_process

tune_process()
sys.exit(worker(worker_parser().parse_args()))
