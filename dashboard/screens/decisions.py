"""The decisions page: see dashboard/views/decisions.py."""
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.views import decisions

ui.guarded(ui.context(), decisions.render)
