#!/usr/bin/env bash
# Provision one VM: install Shoal from the synced folder, then create or join the cluster through
# the same code path the lab uses (shoal.lab.provision → swarmd_argv).
set -euo pipefail
/vagrant/scripts/setup
exec /vagrant/.venv/bin/python -m shoal.lab.provision "$@"
