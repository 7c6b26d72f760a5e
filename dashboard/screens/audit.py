"""The audit page: see dashboard/views/audit.py."""
from dashboard import ui
from dashboard.views import audit

ui.guarded(ui.context(), audit.render)
