"""python -m headroom_sidecar.controlplane.policy lint|test|replay: the same commands as `headroom-controlplane policy ...`."""
import sys

from headroom_sidecar.controlplane.policy.cli import main

sys.exit(main(["policy", *sys.argv[1:]]))
