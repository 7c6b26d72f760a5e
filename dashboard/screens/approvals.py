"""The approvals page: see dashboard/views/approvals.py."""
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.views import approvals

ui.guarded(ui.context(), approvals.render)
