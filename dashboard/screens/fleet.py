"""The fleet page: see dashboard/views/fleet.py."""
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.views import fleet

ui.guarded(ui.context(), fleet.render)
