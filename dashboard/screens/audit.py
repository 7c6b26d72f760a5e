"""The audit page: see dashboard/views/audit.py."""
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.views import audit

ui.guarded(ui.context(), audit.render)
