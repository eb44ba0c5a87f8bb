"""How lm.distributed decides to start jax.distributed, from the config and the environment."""

from __future__ import annotations

import pytest

from lm import distributed
from lm.distributed import Cluster, DistributedError, detect_cluster

SETTINGS = {"coordinator_address": "", "num_processes": None, "process_id": None, "auto": True}


def settings(**changes):
  return {**SETTINGS, **changes}


def test_a_plain_machine_runs_one_process():
  assert detect_cluster(settings(), {}) == Cluster("single")


def test_explicit_settings_come_from_the_config_or_the_environment():
  explicit = Cluster("explicit", "10.0.0.2:1234", 4, 3)
  assert detect_cluster(settings(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3), {}) == explicit
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert detect_cluster(settings(), env) == explicit
  assert detect_cluster(settings(process_id=1), env) == Cluster("explicit", "10.0.0.2:1234", 4, 1)  # config wins


@pytest.mark.parametrize("changes,env,match", [
    (dict(coordinator_address="10.0.0.2:1234"), {}, "num_processes and process_id is not"),
    (dict(coordinator_address="10.0.0.2:1234", num_processes=2), {}, "process_id is not"),
    (dict(coordinator_address="10.0.0.2", num_processes=2, process_id=0), {}, "needs a port"),
    (dict(coordinator_address="10.0.0.2:1", num_processes=2, process_id=2), {}, r"must be in \[0, num_processes=2\)"),
    (dict(num_processes=2), {}, "no coordinator address"),
    ({}, {"JAX_NUM_PROCESSES": "two", "JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_incomplete_settings_are_explained(changes, env, match):
  with pytest.raises(DistributedError, match=match):
    detect_cluster(settings(**changes), env)


def test_slurm_and_open_mpi_jobs_are_detected():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0"}
  assert detect_cluster(settings(), slurm) == Cluster("slurm", num_processes=2, process_id=1)
  assert detect_cluster(settings(), {**slurm, "SLURM_NTASKS": "1"}) == Cluster("single")  # one task: nothing to join
  assert detect_cluster(settings(auto=False), slurm) == Cluster("single")
  mpi = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
         "OMPI_COMM_WORLD_RANK": "2"}
  assert detect_cluster(settings(), mpi) == Cluster("open_mpi", num_processes=4, process_id=2)


def test_single_process_initialize_is_a_no_op_and_checks_pass():
  assert distributed.initialize(settings()).how in ("single", "tpu_vm")
  distributed.check_same_on_all_processes({"config": {"a": 1}})  # one process: nothing to compare


def test_fingerprints_are_stable_and_order_free():
  assert distributed.fingerprint({"a": 1, "b": [1, 2]}) == distributed.fingerprint({"b": [1, 2], "a": 1})
  assert distributed.fingerprint({"a": 1}) != distributed.fingerprint({"a": 2})
