"""`python -m controlplane serve|query ...`"""
import sys

from controlplane.cli import main

sys.exit(main())
