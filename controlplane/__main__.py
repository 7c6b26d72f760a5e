"""`headroom-controlplane serve|query ...`"""
import sys

from headroom_sidecar.controlplane.cli import main

sys.exit(main())
