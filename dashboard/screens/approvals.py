"""The approvals page: see dashboard/views/approvals.py."""
from dashboard import ui
from dashboard.views import approvals

ui.guarded(ui.context(), approvals.render)
