"""The decisions page: see dashboard/views/decisions.py."""
from dashboard import ui
from dashboard.views import decisions

ui.guarded(ui.context(), decisions.render)
